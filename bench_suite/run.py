"""python -m bench_suite.run: the PEFT-U benchmark (quality against throughput and memory).

With no arguments it runs the embedded default (a tiny T5 trained here on the tasks, a few users per task,
every method) in the time README states (measured on this project's 2-core machine; docs/benchmark.md). --full
runs every user with the paper's settings.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


from . import report
from peftu_kernels import distributed as dist
from peftu_kernels.envinfo import environment
from peftu_kernels.io import save_json

from .data import ALL_TASKS, DataError, MissingData, available, data_root
from .data.fetch import missing_table
from .methods import ALL_METHODS, BASELINES, DEFAULT_METHODS, Outcome, run_baseline, run_peft
from .model import embedded_default, from_checkpoint
from .workload import run_users, tokenize


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _lrs(s: str) -> dict[str, float]:
    """'prompt=0.3,lora=1e-3' -> {method: lr}; each method known, each lr a positive number."""
    out = {}
    for item in s.split(","):
        k, eq, v = item.partition("=")
        if not eq or k not in ALL_METHODS:
            raise argparse.ArgumentTypeError(f"{item!r}: expected METHOD=LR with METHOD one of {ALL_METHODS}")
        try:
            out[k] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: learning rate {v!r} is not a number") from None
        if not 0 < out[k] < float("inf"):
            raise argparse.ArgumentTypeError(f"{item!r}: learning rate must be positive and finite")
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench_suite.run", description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=None, help=f"comma-separated (default: every available one of {ALL_TASKS})")
    ap.add_argument("--methods", default=None, help=f"comma-separated from {','.join(ALL_METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    ap.add_argument("--model", default=None, help="HF checkpoint folder or hub id (default: the embedded tiny T5)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="reference | triton | cuda | auto (default: PEFTU_BACKEND or auto)")
    ap.add_argument("--data-dir", default=None, help="data root (default: $PEFTU_DATA, then ../shared/data)")
    ap.add_argument("--out", default="runs/default", help="output folder (reused: finished parts are kept)")
    ap.add_argument("--cache", default=None, help="model cache folder (default: <out>/../cache)")
    ap.add_argument("--full", action="store_true",
                    help="every user, every example, the paper's lengths (512 in, 128 out), unless given here")
    # many users per task (what the multi-user trainer is for), each with fewer examples and epochs, so that
    # the intervals narrow within the same time budget (docs/benchmark.md)
    # users drawn first among those with >= 10 test examples (--min-test): measured against 12 of any size, the
    # paired half-widths fell from 3.2 to 2.0 points in about the same time; the validation cap (--max-val) then
    # paid for 12 users instead of 10 (docs/benchmark.md, Levers)
    ap.add_argument("--users-per-task", type=_positive, default=12)
    ap.add_argument("--max-train", type=_positive, default=20, help="train examples per user (embedded default)")
    # validation only picks each module's best epoch; on tasks whose users rated hundreds of texts it was most
    # of the training time (convabuse: 152 examples per user, 6 passes): capped, measured in docs/benchmark.md
    ap.add_argument("--max-val", type=_positive, default=40,
                    help="validation examples per user (a seeded subsample; embedded default)")
    ap.add_argument("--min-test", type=int, default=10,
                    help="sample users among those with at least this many test examples first (0: any)")
    ap.add_argument("--epochs", type=_positive, default=6)
    ap.add_argument("--max-len", type=_positive, default=96)
    ap.add_argument("--max-new-tokens", type=_positive, default=12)
    ap.add_argument("--eval-batch", type=_positive, default=64)
    ap.add_argument("--workload-rows", type=_positive, default=64,
                    help="rows of the fixed mixed-user workload that times each method against the base model")
    ap.add_argument("--time-all", action="store_true", help="time the workload on every task, not only the first")
    ap.add_argument("--users-per-step", type=_positive, default=None)
    ap.add_argument("--lr", type=_lrs, default={}, help="learning-rate overrides, e.g. prompt=0.3,lora=1e-3")
    ap.add_argument("--global-examples-per-task", type=_positive, default=None)
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="span-corruption steps on the data root's train texts before the global fine-tune")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="name every missing data file in full")
    a = ap.parse_args(argv)
    if a.full:  # the paper's settings, for every one of these not given on the command line
        for k, v in (("users_per_task", None), ("max_train", None), ("max_val", None), ("max_len", 512),
                     ("max_new_tokens", 128)):
            if getattr(a, k) == ap.get_default(k):
                setattr(a, k, v)
    a.progress = not a.no_progress
    return a


def global_settings(a) -> dict | None:
    """The global model's settings these options change (None: the embedded default's)."""
    return {**({"examples_per_task": a.global_examples_per_task} if a.global_examples_per_task else {}),
            **({"pretrain_steps": a.pretrain_steps} if a.pretrain_steps is not None else {})} or None


def merge(outcomes: list) -> Outcome:
    """One outcome from every rank's (each over its own users): per-user results joined, training wall time
    the slowest rank's and throughput the sum, the timed workload rank 0's."""
    from dataclasses import replace
    first = next((o for o in outcomes if o.per_example), outcomes[0])
    per_example = {u: v for o in outcomes for u, v in o.per_example.items()}
    if len(outcomes) == 1:
        return first
    return replace(first, per_example=per_example, throughput=outcomes[0].throughput, train_seconds=max(o.train_seconds for o in outcomes),
                   train_examples_per_s=sum(o.train_examples_per_s for o in outcomes),
                   ranks={u: r for r, o in enumerate(outcomes) for u in o.per_example})


def _read_part(part: Path, run_key: str) -> dict | None:
    """A finished part of this run's settings, or None (absent, other settings, or unreadable: redone)."""
    if not part.is_file():
        return None
    try:
        d = json.loads(part.read_text())
        return d["row"] if d.get("run_key") == run_key else None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"{part}: unreadable ({type(e).__name__}), this part is run again", flush=True)
        return None


def main(argv=None):
    a = parse(argv)
    a.device = dist.init(a.device)  # under torchrun: join the group, one device per rank
    n_ranks = dist.world()[1]
    t_start = time.perf_counter()
    out = Path(a.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    methods = a.methods.split(",") if a.methods else DEFAULT_METHODS
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; known: {ALL_METHODS}")
    loaded = available(a.data_dir, a.tasks.split(",") if a.tasks else None)
    notes = [f"{n}: not run ({e})" for n, e in loaded.items() if isinstance(e, (MissingData, DataError))]
    tasks = {n: t for n, t in loaded.items() if not isinstance(t, (MissingData, DataError))}
    notes += [f"{n} is partial: {t.partial}" for n, t in tasks.items() if t.partial]
    short = missing_table(loaded, data_root(a.data_dir), a.verbose)
    if not tasks:
        raise SystemExit("no task could be loaded from the data root:\n" + short)
    if short and dist.is_main():
        print(short, flush=True)
    if a.model:
        model, tok, minfo = from_checkpoint(a.model, a.device)
    else:
        g = global_settings(a)
        if not dist.is_main():
            dist.barrier()  # rank 0 trains (or loads) the global model first; the others read its cache
        model, tok, minfo = embedded_default(tasks, Path(a.cache or out.parent / "cache"), a.device,
                                             a.progress and dist.is_main(), g)
        if dist.is_main():
            dist.barrier()
    trained_global = [r for r, fresh in enumerate(dist.gather(not minfo.get("cached", True))) if fresh]
    env = {**environment(a.device), "ranks": n_ranks, "global_model_trained_by_ranks": trained_global,
           "model": minfo["model"], "model_dir": minfo.get("cache"),
           "data_root": str(data_root(a.data_dir)),
           "settings": {k: v for k, v in vars(a).items() if k not in ("progress",)}}
    run_key = json.dumps({"v": 2, "model": minfo.get("cache", minfo["model"]), **{k: getattr(a, k) for k in (
        "users_per_task", "max_train", "max_val", "epochs", "max_len", "max_new_tokens", "full", "lr", "min_test")}},
        sort_keys=True)
    rows, timed = [], set()
    for name, task in tasks.items():
        users = run_users(task, vars(a))
        if not users:
            notes.append(f"{name}: no user with train and test data")
            continue
        tokenize(users, tok, a.max_len, truncate_left=not a.full)
        for m in methods:
            part = out / "parts" / f"{name}__{m}.json"
            done = _read_part(part, run_key)
            if done is not None:
                rows.append(done)  # finished earlier: reused
                timed.update([m] if "infer_ratio" in done else [])
                continue
            if dist.is_main():
                print(f"[{name}] {m}: {len(users)} users" + (f" over {n_ranks} ranks" if n_ranks > 1 else ""),
                      flush=True)
            # throughput is timed once per method (on the first task it runs), or on every task with --time-all;
            # under torchrun by rank 0 alone, so that it times one process
            a.measure_throughput = (a.time_all or m not in timed) and dist.is_main()
            timed.add(m)
            mine = [ud for ud in users if ud.user in set(dist.shard([u.user for u in users]))]
            if not mine:  # more ranks than users
                oc = Outcome({})
            elif m in BASELINES:
                oc = run_baseline(m, model, tok, task, mine, a)
            else:
                oc = run_peft(m, model, tok, task, mine, a, out / "train" / name / m)
            oc = merge(dist.gather(oc))
            row = {"task": name, "method": m, "partial": bool(task.partial), **oc.row(),
                   "per_user": oc.per_user}
            if dist.is_main():
                save_json(part, {"run_key": run_key, "row": row})  # atomic: a kill never leaves half a part
            rows.append(row)
    if not dist.is_main():
        dist.finish()
        return
    avg = report.add_stats(rows)  # intervals and paired comparisons into every row
    report.write_jsonl(out / "results.jsonl", rows, env)
    md = report.summary_md(rows, methods, env, notes, avg)
    (out / "summary.md").write_text(md)
    report.plot(rows, methods, out / "quality_vs_throughput.png", avg)
    print(md)
    print(f"wrote {out / 'results.jsonl'}, {out / 'summary.md'}, {out / 'quality_vs_throughput.png'} "
          f"in {time.perf_counter() - t_start:.0f} s")
    dist.finish()


if __name__ == "__main__":
    main()
