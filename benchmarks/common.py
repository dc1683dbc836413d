"""What every benchmark shares: the environment block, timing, markdown tables, JSON lines."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from peftu_kernels.envinfo import environment  # noqa: F401  (re-exported for the benchmarks)


def timeit(fn, device="cpu", warmup: int = 2, reps: int = 7) -> dict:
    """Median / p20 / p80 milliseconds. GPU: triton's do_bench; CPU: wall clock over `reps` runs."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench
        p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "p20": p20, "p80": p80}
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]
    return {"ms": statistics.median(ts), "p20": q(0.2), "p80": q(0.8)}


def interleaved(fns: dict, device="cpu", rounds: int = 5, reps: int = 3) -> dict:
    """Time several contenders in alternation so that machine noise hits them alike; median per name."""
    for fn in fns.values():
        fn()
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(timeit(fn, device, warmup=0, reps=reps)["ms"])
    return {k: statistics.median(v) for k, v in out.items()}


def table(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_jsonl(path, rows: list[dict], env: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "env": env}) + "\n")
