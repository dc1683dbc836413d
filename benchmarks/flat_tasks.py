"""Why a task's rows can all be the same number: how much each user's data departs from the user's majority
label, and how often each method's answers depart from the majority floor's, per task of a bench_suite run.

python -m benchmarks.flat_tasks runs/default [--tasks hs_brexit,armis,convabuse]
    -> a table per task: users, minority-label train examples per user (what a module could learn a departure
       from), the test rows whose gold is not the user's majority label (what a departure could win), and per
       method the test rows it scores differently from the majority floor (right where the floor is wrong, or
       the reverse).
Reads the run's results.jsonl (its settings choose the same users and examples) and the data root.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def minority_counts(users) -> list[tuple[str, int, int, int, int]]:
    """Per user: (user, train examples, train examples without the majority label, test examples, test
    examples without it)."""
    rows = []
    for ud in users:
        miss = lambda split: sum(ud.majority not in ud.gold[sid] for sid, _, _ in ud.prompts[split])  # noqa: E731
        rows.append((ud.user, len(ud.prompts["train"]), miss("train"), len(ud.prompts["test"]), miss("test")))
    return rows


def departures(rows: list[dict], task: str) -> dict[str, int]:
    """Per method: test rows where its correctness differs from the majority floor's on the same example."""
    by = {r["method"]: r["per_example"] for r in rows if r["task"] == task}
    floor = by.get("majority")
    if floor is None:
        return {}
    return {m: sum(a != b for u in floor for a, b in zip(pe.get(u, []), floor[u]))
            for m, pe in by.items() if m != "majority"}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.flat_tasks", description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="runs/default")
    ap.add_argument("--tasks", default=None, help="comma-separated (default: every task of the run)")
    a = ap.parse_args(argv)
    from bench_suite.data import load_task
    from bench_suite.workload import run_users
    res = Path(a.out) / "results.jsonl"
    if not res.is_file():
        raise SystemExit(f"{res}: no finished run here")
    rows = [json.loads(x) for x in res.read_text().splitlines()]
    s = rows[0]["env"]["settings"]
    tasks = a.tasks.split(",") if a.tasks else list(dict.fromkeys(r["task"] for r in rows))
    for t in tasks:
        counts = minority_counts(run_users(load_task(t, s.get("data_dir")), s))
        n_tr, m_tr = sum(c[1] for c in counts), [c[2] for c in counts]
        n_te, m_te = sum(c[3] for c in counts), sum(c[4] for c in counts)
        print(f"## {t}: {len(counts)} users; train examples without the user's majority label per user "
              f"{min(m_tr)}-{max(m_tr)} (mean {sum(m_tr) / len(m_tr):.1f} of {n_tr / len(counts):.0f}); "
              f"test rows without it {m_te} of {n_te} ({100 * m_te / max(n_te, 1):.1f}%)")
        dep = departures(rows, t)
        if dep:
            print("| method | test rows scored unlike the majority floor |\n|---|---|")
            for m, k in dep.items():
                print(f"| {m} | {k} of {n_te} |")
        print()


if __name__ == "__main__":
    main()
