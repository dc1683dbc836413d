"""Per-task statistics, Krippendorff's alpha with MASI distance included."""
from __future__ import annotations

from collections import Counter

from .core import Task
from .split import split_users


def masi_distance(a: frozenset, b: frozenset) -> float:
    """1 - Jaccard * monotonicity (1 equal, 0.67 subset, 0.33 overlap, 0 disjoint), as Passonneau defines it."""
    if a == b:
        return 0.0
    inter, union = len(a & b), len(a | b)
    m = 0.67 if (a <= b or b <= a) else (0.33 if inter else 0.0)
    return 1.0 - inter / union * m


def krippendorff_alpha(task: Task) -> float:
    """Krippendorff's alpha over (user, sample, frozenset(labels)) triples, from the coincidence of pairable
    values (items with >= 2 annotations), which handles users who skipped items."""
    per_item: dict[str, Counter] = {}
    for samples in task.users.values():
        for sid, s in samples.items():
            per_item.setdefault(sid, Counter())[frozenset(s["label"])] += 1
    n_c: Counter = Counter()
    Do, n = 0.0, 0
    for vals in per_item.values():
        m = sum(vals.values())
        if m < 2:
            continue
        n += m
        n_c.update(vals)
        Do += sum(a * b * masi_distance(x, y) for x, a in vals.items() for y, b in vals.items()) / (m - 1)
    if n < 2:
        return float("nan")
    De = sum(a * b * masi_distance(x, y) for x, a in n_c.items() for y, b in n_c.items()) / (n - 1)
    return 1.0 - Do / De if De > 0 else 1.0


def task_stats(task: Task) -> dict:
    texts = {sid for s in task.users.values() for sid in s}
    per_text = Counter(sid for s in task.users.values() for sid in s)
    kept = split_users(task.users)
    return {"task": task.name, "status": "partial" if task.partial else "full",
            "users": len(task.users), "users_kept": len(kept),
            "annotations": task.n_annotations, "texts": len(texts), "labels": len(task.labels),
            "annotations_per_user": task.n_annotations / max(1, len(task.users)),
            "users_per_text": sum(per_text.values()) / max(1, len(per_text)),
            "alpha": krippendorff_alpha(task), "note": task.partial or ""}
