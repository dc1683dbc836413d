"""Uncertainty for per-user accuracies: a two-level bootstrap (users, then examples within each user).

A cell's accuracy is the mean over users of each user's accuracy on its own test examples (PEFT-U's metric).
Its 95% interval resamples users with replacement and, within each drawn user, that user's examples with
replacement; the percentile interval of the resampled means. Paired comparisons (a method against the
majority floor or the zero-shot model) resample the same users and the same example indices for both, so the
interval is of the difference on the same data. A difference is significant when its interval excludes 0.
An average over tasks resamples each task independently and averages the replicates.
"""
from __future__ import annotations

import zlib

import numpy as np

B = 2000


def task_seed(task: str) -> int:
    """Each task's bootstrap seed (stable across runs and machines): tasks resampled independently, so an
    average over tasks is not one draw of user indices repeated in every task."""
    return zlib.crc32(task.encode("utf-8"))


def replicates(per_example: dict[str, list[float]], b: int = B, seed: int = 0) -> np.ndarray:
    """b bootstrap means over users of per-user means: users drawn with replacement, and for every drawn
    user (each occurrence anew) its examples drawn with replacement."""
    keys = sorted(per_example)
    rng = np.random.default_rng(seed)
    users = rng.integers(0, len(keys), size=(b, len(keys)))
    out = np.zeros(users.shape)
    for u, k in enumerate(keys):
        x = np.asarray(per_example[k], dtype=float)
        sel = users == u
        if sel.any():
            out[sel] = x[rng.integers(0, len(x), size=(int(sel.sum()), len(x)))].mean(1)
    return out.mean(1)


def cell(per_example: dict[str, list[int]], b: int = B, seed: int = 0) -> dict:
    """Accuracy x100 with its 95% interval."""
    keys = sorted(per_example)
    mean = float(np.mean([np.mean(per_example[k]) for k in keys]))
    r = replicates(per_example, b, seed)
    return {"mean": 100 * mean, "lo": 100 * float(np.percentile(r, 2.5)), "hi": 100 * float(np.percentile(r, 97.5)),
            "replicates": r}


def paired(a: dict[str, list[int]], b_: dict[str, list[int]], b: int = B, seed: int = 0) -> dict:
    """a - b on the same users and examples, x100: mean, 95% interval, users improving, significance."""
    keys = sorted(set(a) & set(b_))
    for k in keys:
        if len(a[k]) != len(b_[k]):
            raise ValueError(f"user {k}: {len(a[k])} vs {len(b_[k])} test examples; a paired comparison needs the same")
    diff = {k: np.asarray(a[k], float) - np.asarray(b_[k], float) for k in keys}
    r = replicates(diff, b, seed)
    lo, hi = 100 * float(np.percentile(r, 2.5)), 100 * float(np.percentile(r, 97.5))
    return {"diff": 100 * float(np.mean([d.mean() for d in diff.values()])), "lo": lo, "hi": hi,
            "improve": int(sum(d.mean() > 0 for d in diff.values())),
            "worse": int(sum(d.mean() < 0 for d in diff.values())), "users": len(keys),
            "significant": bool(lo > 0 or hi < 0), "replicates": r}


def average(cells: list[dict]) -> dict:
    """Mean over tasks of cells (each with its replicates), with the interval of the averaged replicates."""
    if not cells:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    r = 100 * np.mean([c["replicates"] for c in cells], axis=0)
    return {"mean": float(np.mean([c["mean"] for c in cells])), "lo": float(np.percentile(r, 2.5)),
            "hi": float(np.percentile(r, 97.5))}


def average_paired(pairs: list[dict]) -> dict:
    """Mean over tasks of paired differences, with the interval of the averaged replicates."""
    if not pairs:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "significant": False}
    r = 100 * np.mean([p["replicates"] for p in pairs], axis=0)
    lo, hi = float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))
    return {"diff": float(np.mean([p["diff"] for p in pairs])), "lo": lo, "hi": hi,
            "improve": sum(p["improve"] for p in pairs), "users": sum(p["users"] for p in pairs),
            "significant": bool(lo > 0 or hi < 0)}
