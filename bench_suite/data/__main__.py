"""python -m bench_suite.data --stats [--data-dir DIR] [--tasks a,b]: per-task statistics."""
from __future__ import annotations

import argparse

from . import ALL_TASKS, DataError, MissingData, available
from .stats import task_stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stats", action="store_true", help="print per-task statistics")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    a = ap.parse_args(argv)
    if not a.stats:
        ap.print_help()
        return
    tasks = a.tasks.split(",") if a.tasks else ALL_TASKS
    cols = ["task", "status", "users", "users_kept", "annotations", "texts", "labels", "annotations_per_user",
            "users_per_text", "alpha"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    notes = []
    for name, t in available(a.data_dir, tasks).items():
        if isinstance(t, (MissingData, DataError)):
            state = "missing" if isinstance(t, MissingData) else "corrupt"
            print(f"| {name} | {state} | " + " | ".join([""] * (len(cols) - 2)) + " |")
            notes.append(f"{name}: {t}")
            continue
        s = task_stats(t)
        print("| " + " | ".join(f"{s[c]:.3g}" if isinstance(s[c], float) else str(s[c]) for c in cols) + " |")
        if s["note"]:
            notes.append(f"{name} (partial): {s['note']}")
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
