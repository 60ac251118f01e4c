"""Training and fine-tuning DiffusionGemma: data, the diffusion + AR objective, the loop, checkpoints, LoRA.

    from dgemma.train import TrainConfig, train
    train(TrainConfig(data=["corpus/"], out="runs/a", model="tiny", steps=1000, ext=[".py"]))
"""

from .config import TrainConfig
from .data import DataError
from .loop import train

__all__ = ["DataError", "TrainConfig", "train"]
