"""Learning rates chosen on validation loss only: train each method at a few multiples of its default rate on
the embedded default's users (the run's own selection, examples and epochs) and report each setting's best
validation loss, averaged over users and then tasks. No test example is scored.

python -m benchmarks.lr_sweep --methods prompt,ptuning,prefix --factors 1,3,10 [--tasks a,b] [--out DIR]
    -> a table: method, rate, mean best validation loss (over tasks), per task; the lowest per method is marked.
       Further bench_suite.run options (e.g. --users-per-task 6) follow `--`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def best_val_losses(train_dir: Path) -> dict[str, float]:
    """user -> its lowest validation loss, from the trainer's state.json files under train_dir."""
    out = {}
    for f in sorted(Path(train_dir).glob("users/*/state.json")):
        d = json.loads(f.read_text())
        out[d["user"]] = min(d["history"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lr_sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="prompt,ptuning,prefix")
    ap.add_argument("--factors", default="1,3,10", help="multiples of each method's default rate")
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--out", default="runs/lr_sweep", help="work folder (training checkpoints, reused)")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then bench_suite.run options")
    a = ap.parse_args(argv)
    from bench_suite import run
    from bench_suite.data import DataError, MissingData, available
    from bench_suite.methods import DEFAULT_SMALL_LR, SMALL_LR, train_modules
    from bench_suite.model import embedded_default
    from bench_suite.workload import run_users, tokenize
    s = run.parse([x for x in a.rest if x != "--"] + ["--no-progress"])
    tasks = {n: t for n, t in available(s.data_dir, a.tasks.split(",") if a.tasks else None).items()
             if not isinstance(t, (MissingData, DataError))}  # the tasks the run would run
    out = Path(a.out)
    model, tok, _ = embedded_default(tasks, Path(s.cache or out.parent / "cache"), s.device, False,
                                     run.global_settings(s))
    users = {}
    for n, t in tasks.items():
        users[n] = run_users(t, vars(s))
        tokenize(users[n], tok, s.max_len, truncate_left=True)
    factors = [float(f) for f in a.factors.split(",")]
    print("| method | lr | mean best val loss | " + " | ".join(tasks) + " | seconds |")
    print("|---|---|---|" + "---|" * (len(tasks) + 1))
    for m in a.methods.split(","):
        base = s.lr.get(m, SMALL_LR.get(m, DEFAULT_SMALL_LR))
        rows = []
        for f in factors:
            lr = base * f
            s.lr = {**s.lr, m: lr}
            per, t0 = {}, time.perf_counter()
            for n in tasks:
                d = out / f"{m}-{lr:g}" / n
                train_modules(m, model, users[n], s, d)
                per[n] = statistics.mean(best_val_losses(d).values())
            rows.append((lr, statistics.mean(per.values()), per, time.perf_counter() - t0))
        best = min(r[1] for r in rows)
        for lr, mean, per, sec in rows:
            mark = " (lowest)" if mean == best else ""
            print(f"| {m} | {lr:g}{mark} | {mean:.4f} | " + " | ".join(f"{per[n]:.3f}" for n in tasks)
                  + f" | {sec:.0f} |", flush=True)
        s.lr = {k: v for k, v in s.lr.items() if k != m}


if __name__ == "__main__":
    main()
