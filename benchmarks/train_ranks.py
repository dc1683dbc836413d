"""Users trained per hour with 1 process and with N processes (torchrun, users sharded by rank).

python -m benchmarks.train_ranks [--ranks 2] [--tasks tweeteval,studemo] [--methods lora,ia3]
Runs `bench_suite.run` on the same tasks, users and settings once per process count, from the same cached
global model (built first, untimed), in fresh output folders; the CPU's cores are shared out equally
(OMP_NUM_THREADS = cores / processes). Reports users x methods trained and evaluated per hour, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import environment, table, write_jsonl


def run(args, out, cache, procs, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [sys.executable, "-m", "bench_suite.run", *args, "--out", str(out), "--cache", str(cache), "--no-progress"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), *cmd[1:]]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stdout[-2000:] + r.stderr[-2000:])
    secs = time.perf_counter() - t0
    rows = [json.loads(x) for x in open(out / "results.jsonl")]
    return secs, sum(r["n_users"] for r in rows if r["method"] not in ("zero-shot", "few-shot", "majority"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tasks", default="tweeteval,studemo")
    ap.add_argument("--methods", default="lora,ia3")
    ap.add_argument("--users-per-task", default="12")
    ap.add_argument("--epochs", default="6")
    ap.add_argument("--out", default="results/train_ranks.jsonl")
    a = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    args = ["--tasks", a.tasks, "--methods", a.methods, "--users-per-task", a.users_per_task, "--epochs", a.epochs,
            "--workload-rows", "8"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(args + ["--methods", "majority"], tmp / "warm", tmp / "cache", 1, cores)  # the global model, untimed
        rows = []
        for procs in (1, a.ranks):
            secs, users = run(args, tmp / f"p{procs}", tmp / "cache", procs, max(1, cores // procs))
            rows.append({"processes": procs, "threads_each": max(1, cores // procs), "seconds": secs,
                         "users_trained": users, "users_per_hour": users / secs * 3600})
    rows[1]["vs_one_process"] = rows[1]["users_per_hour"] / rows[0]["users_per_hour"]
    env = environment("cpu")
    print(f"device: {env['device']}, torch {env['torch']}; tasks {a.tasks}, methods {a.methods}")
    print(table(rows, ["processes", "threads_each", "seconds", "users_trained", "users_per_hour", "vs_one_process"]))
    write_jsonl(a.out, rows, env)


if __name__ == "__main__":
    main()
