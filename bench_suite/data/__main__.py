"""python -m bench_suite.data --stats [--data-dir DIR] [--tasks a,b]: per-task statistics.
python -m bench_suite.data fetch [--data-dir DIR] [--tasks a,b]: download every corpus from its public release."""
from __future__ import annotations

import argparse

from . import ALL_TASKS, DataError, MissingData, available, data_root
from .fetch import missing_table
from .stats import task_stats


def fetch_main(a) -> int:
    from .fetch import fetch, summary
    root = data_root(a.data_dir)
    tasks = a.tasks.split(",") if a.tasks else None
    unknown = [t for t in tasks or [] if t not in ALL_TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {ALL_TASKS}")
    out = fetch(root, tasks, show=not a.no_progress)
    print(summary(out))
    return 1 if any(o.state == "failed" for o in out) else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("command", nargs="?", choices=["fetch"], help="fetch: download the corpora into the data root")
    ap.add_argument("--stats", action="store_true", help="print per-task statistics")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    ap.add_argument("--verbose", action="store_true", help="name every missing file in full")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.command == "fetch":
        raise SystemExit(fetch_main(a))
    if not a.stats:
        ap.print_help()
        return
    tasks = a.tasks.split(",") if a.tasks else ALL_TASKS
    cols = ["task", "status", "users", "users_kept", "annotations", "texts", "labels", "annotations_per_user",
            "users_per_text", "alpha"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    notes = []
    loaded = available(a.data_dir, tasks)
    for name, t in loaded.items():
        if isinstance(t, (MissingData, DataError)):
            state = "missing" if isinstance(t, MissingData) else "corrupt"
            print(f"| {name} | {state} | " + " | ".join([""] * (len(cols) - 2)) + " |")
            continue
        s = task_stats(t)
        print("| " + " | ".join(f"{s[c]:.3g}" if isinstance(s[c], float) else str(s[c]) for c in cols) + " |")
        if s["note"]:
            notes.append(f"{name} (partial): {s['note']}")
    for n in notes:
        print(f"- {n}")
    table = missing_table(loaded, data_root(a.data_dir), a.verbose)
    if table:
        print("\n" + table)


if __name__ == "__main__":
    main()
