"""Models that come with dgemma, found by name from any directory, and the one rule that turns a `--model` /
`from_pretrained` argument into a source.

`dgemma-code-tiny` (`models/dgemma-code-tiny` in the source tree) is the default model of `dgemma generate` and
`dgemma serve`. It is looked for in the source checkout this package runs from (a development or editable
install) and in the installation's data directory (`<prefix>/share/dgemma/`, where a wheel built from the
source tree puts it).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from .config import PRESETS, ConfigError

SHIPPED = ("dgemma-code-tiny",)
DEFAULT_MODEL = "dgemma-code-tiny"


def shipped_dir(name: str) -> Path | None:
    """The directory of the shipped model `name`, or None (not a shipped name, or not installed)."""
    if name not in SHIPPED:
        return None
    for root in _roots():
        d = root / name
        if (d / "config.json").is_file():
            return d
    return None


_SOURCE_MODELS = Path(__file__).resolve().parents[2] / "models"  # a source checkout: src/dgemma/shipped.py
DATA_SUBDIR = ("share", "dgemma")  # under the installation's data directory; pyproject.toml's data-files


def _roots() -> list[Path]:
    return [_SOURCE_MODELS, Path(sysconfig.get_paths()["data"]).joinpath(*DATA_SUBDIR)]


def resolve(name: str | Path) -> tuple[str, Path | str]:
    """("directory", path) or ("preset", name) for a model argument: an existing path first, then a shipped
    model's name, then a preset (random weights). Raises FileNotFoundError (ConfigError for an empty name or a path
    that is not a directory)."""
    text = str(name)
    if not text.strip():
        raise ConfigError("empty model name: give a checkpoint directory, a shipped model "
                          f"({', '.join(SHIPPED)}) or a preset ({', '.join(PRESETS)})")
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{text}: not a model directory")
        if (path / "adapter_config.json").is_file() and not (path / "config.json").exists():
            raise ConfigError(f"{text}: a LoRA adapter, not a model: merge it into its base with `dgemma train merge "
                              f"{text} --out DIR` (or train with --merge) and load DIR")
        return "directory", path
    shipped = shipped_dir(text)
    if shipped is not None:
        return "directory", shipped
    if text in PRESETS:
        return "preset", text
    if text in SHIPPED:
        raise FileNotFoundError(f"{text}: the shipped model is not installed here (looked in "
                                f"{', '.join(str(r) for r in _roots())}); give its directory instead")
    raise FileNotFoundError(f"{text}: no such model directory (shipped models: {', '.join(SHIPPED)}; "
                            f"presets, random weights: {', '.join(PRESETS)})")
