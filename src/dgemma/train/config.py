"""The settings of a training run (the `dgemma train` options, by the same names)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import ConfigError
from .objective import WEIGHTINGS

DEFAULT_MODEL = "tiny"

# settings a resumed run must share with the run it continues
RESUME_FIXED = ("data", "ext", "eval_data", "holdout_frac", "pack", "seq_len", "batch_size", "seed", "model",
                "config_json", "tokenizer", "lora", "lora_alpha", "dtype", "fsdp")
DTYPES = ("float32", "bfloat16", "float16")
FSDP_DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    model: str = DEFAULT_MODEL
    config_json: str | None = None
    tokenizer: str | None = None
    ext: list[str] | None = None
    eval_data: list[str] = field(default_factory=list)
    holdout_frac: float = 0.01
    pack: bool = True
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.99)
    clip: float = 1.0
    weighting: str = "unweighted"
    diffusion_weight: float = 1.0
    ar_weight: float = 1.0
    infill_prob: float = 0.0
    self_cond_prob: float = 0.5
    eval_every: int = 200
    eval_batches: int = 4
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    lora: int = 0
    lora_alpha: float | None = None
    merge: bool = False
    dtype: str = "float32"  # of the frozen base weights under LoRA (trained weights are always float32)
    grad_checkpoint: bool = False
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (FSDP2; under torchrun)
    fsdp_dtype: str | None = None  # what gathered weights compute in; None: bfloat16 on CUDA, float32 on the CPU
    fsdp_offload: bool = False  # keep the shards and the optimizer state in CPU memory
    export: bool = False  # with fsdp: also write OUT/export, the final weights in the Hugging Face layout
    resume: bool = False
    device: str | None = None

    def validate(self, world_size: int) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        for name in ("steps", "batch_size", "accum", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, ok, rule in (("seq_len", self.seq_len >= 2, ">= 2"), ("seed", self.seed >= 0, ">= 0"),
                               ("lora", self.lora >= 0, ">= 0"), ("warmup", self.warmup >= 0, ">= 0"),
                               ("holdout_frac", 0 <= self.holdout_frac < 1, "in [0, 1)"),
                               ("lr", 0 < self.lr < math.inf, "a number > 0"),
                               ("weight_decay", 0 <= self.weight_decay < math.inf, "a number >= 0"),
                               ("clip", 0 < self.clip, "a number > 0 (inf: no clipping)")):
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(self, name)}")
        if self.lora_alpha is not None and not (self.lora and 0 < self.lora_alpha < math.inf):
            raise ConfigError(f"--lora-alpha needs --lora and a number > 0, got {self.lora_alpha}")
        self._validate_sharding(world_size)
        if self.batch_size < world_size * self.accum:
            raise ConfigError(f"batch size {self.batch_size} is smaller than processes x accumulation steps "
                              f"({world_size} x {self.accum})")
        if self.diffusion_weight < 0 or self.ar_weight < 0 or self.diffusion_weight == self.ar_weight == 0:
            raise ConfigError(f"need --diffusion-weight >= 0 and --ar-weight >= 0, not both 0 (got "
                              f"{self.diffusion_weight} and {self.ar_weight})")
        if not 0 <= self.infill_prob <= 1:
            raise ConfigError(f"--infill-prob must be in [0, 1], got {self.infill_prob}")
        if self.infill_prob > 0 and self.diffusion_weight == 0:
            raise ConfigError("--infill-prob shapes the diffusion loss, which --diffusion-weight 0 turns off")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype != "float32" and not self.lora:
            raise ConfigError(f"--dtype {self.dtype} needs --lora: it is the dtype of the frozen base weights; "
                              "full training keeps every weight in float32 (AdamW's small updates would round "
                              f"away in {self.dtype})")
        if self.merge and not self.lora:
            raise ConfigError("--merge needs --lora")
        if self.config_json is not None and self.model != DEFAULT_MODEL:
            raise ConfigError(f"--config-json makes random weights, so --model {self.model} would be ignored: "
                              "pass one or the other")

    def _validate_sharding(self, world_size: int) -> None:
        for flag, on in (("--fsdp-dtype", self.fsdp_dtype is not None), ("--fsdp-offload", self.fsdp_offload),
                         ("--export", self.export)):
            if on and not self.fsdp:
                raise ConfigError(f"{flag} needs --fsdp")
        if self.fsdp_dtype is not None and self.fsdp_dtype not in FSDP_DTYPES:
            raise ConfigError(f"--fsdp-dtype must be one of {', '.join(FSDP_DTYPES)}, got {self.fsdp_dtype!r}")
        if self.export and self.lora:
            raise ConfigError("--export writes a full model; with --lora, --merge does (the base with the adapter "
                              "merged in)")
        if self.fsdp and self.batch_size % world_size:
            raise ConfigError(f"--fsdp needs a --batch-size that the {world_size} processes divide, got "
                              f"{self.batch_size}: every process runs every pass, since each pass gathers the "
                              "sharded weights from all of them")
