"""PEFT-U data: 13 tasks from 11 corpora (raw files), four LeWiDi tasks, splits, prompts, metric."""
from __future__ import annotations

from pathlib import Path

from . import corpora, lewidi
from .core import DataError, MissingData, Task, data_root
from .metric import correct, macro_accuracy, parse, user_accuracy
from .prompts import build_prompts
from .split import split_list, split_users

PEFTU_TASKS = list(corpora.SPEC)
EXTRA_TASKS = list(lewidi.LEWIDI)
ALL_TASKS = PEFTU_TASKS + EXTRA_TASKS


def load_task(name: str, root=None) -> Task:
    """Load one task from the data root (raises MissingData naming the files it needs)."""
    root = Path(data_root(root))
    if name in EXTRA_TASKS:
        return lewidi.load(name, root / "lewidi" / "raw")
    if name.startswith("subjectivediscourse_"):
        return corpora.subjectivediscourse(root / "peftu" / "raw")[name]
    if name not in corpora.LOADERS:
        raise KeyError(f"unknown task {name!r}; known: {ALL_TASKS}")
    return corpora.LOADERS[name](root / "peftu" / "raw")


def available(root=None, names=None) -> dict[str, Task | MissingData | DataError]:
    """Every task that loads; for the others the MissingData saying which files they need, or the DataError
    naming the corrupt file (one bad file costs its task, not the run)."""
    out = {}
    for n in names or ALL_TASKS:
        try:
            out[n] = load_task(n, root)
        except (MissingData, DataError) as e:
            out[n] = e
    return out


__all__ = ["Task", "DataError", "MissingData", "data_root", "load_task", "available", "split_list", "split_users",
           "build_prompts", "parse", "correct", "user_accuracy", "macro_accuracy", "PEFTU_TASKS", "EXTRA_TASKS",
           "ALL_TASKS"]
