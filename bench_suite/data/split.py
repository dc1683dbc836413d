"""PEFT-U's per-user train / val / test split (SPEC.md section 2), bit for bit: Python's `random`, seed 42."""
from __future__ import annotations

import random

from .core import Users

DROP_THRESHOLD = 10


def split_list(items: list, ratio: float = 0.8, seed: int = 42):
    """Shuffle with a fresh seed; k = max(2, round((1 - ratio) * n)) go to val+test, val = round(k / 2).
    (1 - 0.8 is 0.19999999999999996 and round() is banker's rounding: both matter for small lists.)"""
    items = list(items)
    random.seed(seed)
    random.shuffle(items)
    k = max(2, round((1 - ratio) * len(items)))
    train, rest = items[:-k], items[-k:]
    v = round(0.5 * k)
    return train, rest[:v], rest[v:]


def _merge(dst: dict[str, list], new: tuple[list, list, list]) -> None:
    """First assignment wins: train, then test, then val, each taking only ids in no split yet."""
    taken = lambda: set(dst["train"]) | set(dst["val"]) | set(dst["test"])
    for name, part in (("train", new[0]), ("test", new[2]), ("val", new[1])):
        t = taken()
        dst[name] += [x for x in part if x not in t]


def split_users(users: Users, leakage: bool = True, ratio: float = 0.8, seed: int = 42) -> dict[str, dict[str, list[str]]]:
    """user -> {"train", "val", "test"} lists of sample ids; users with < 10 annotations are dropped."""
    out: dict[str, dict[str, list[str]]] = {}
    if leakage:  # per user, stratified by label: a text can be train for one user and test for another
        for u, samples in users.items():
            parts = {"train": [], "val": [], "test": []}
            for lab in sorted({lab for s in samples.values() for lab in s["label"]}):
                _merge(parts, split_list([sid for sid, s in samples.items() if lab in s["label"]], ratio, seed))
            out[u] = parts
    else:  # one global split of texts: no text is shared between splits
        ids = sorted({sid for s in users.values() for sid in s})
        random.seed(seed)
        random.shuffle(ids)
        tr, va, te = (set(x) for x in split_list(ids, ratio, seed))
        for u, samples in users.items():
            out[u] = {"train": [s for s in samples if s in tr], "val": [s for s in samples if s in va],
                      "test": [s for s in samples if s in te]}
    return {u: p for u, p in out.items() if len(users[u]) >= DROP_THRESHOLD}
