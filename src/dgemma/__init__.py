"""dgemma: DiffusionGemma text diffusion in PyTorch — model, canvas sampler, engine, CLI."""

from .api import DiffusionGemma, GenerateOutput
from .config import ConfigError, DiffusionGemmaConfig, GenerationConfig, TextConfig, preset
from .engine.generate import CanvasCommit, DenoiseStep, GenerationResult
from .media import MediaError
from .model.weights import CheckpointError
from .processor import Processor
from .sampling.grammar import Constraint, ConstraintError
from .tokenizer import IncrementalDetokenizer, Tokenizer, split_reasoning

__version__ = "0.1.0"

__all__ = [
    "CanvasCommit", "CheckpointError", "ConfigError", "Constraint", "ConstraintError", "DenoiseStep",
    "DiffusionGemma", "DiffusionGemmaConfig", "GenerateOutput", "GenerationConfig", "GenerationResult",
    "IncrementalDetokenizer", "MediaError", "Processor", "TextConfig", "Tokenizer",
    "preset", "split_reasoning",
]
