"""Roofline report: for every multi-tenant op and shape, the bytes it must move and the FLOPs it must do
(from the shapes alone), the achieved GB/s and TFLOP/s, and their share of the card's measured ceilings.

python -m benchmarks.roofline [--quick] [--device cuda]      (also: python -m benchmarks.ops --roofline)
Ceilings are measured in the same run: a 256 MiB device copy (read + write) and a large matmul in the
ops' dtype (bf16 on a GPU, fp32 on the CPU). An op whose intensity (FLOPs / byte) is under the ridge point
(peak FLOPs / bandwidth) is memory-bound: its target is a share of the copy bandwidth. The byte counts are
ideal (each input read once, each output written once, each distinct user's weights read once); a kernel
that re-reads a user's weights per row shows up as a low share.
"""
from __future__ import annotations

import argparse
import math

import torch

from benchmarks.common import environment, table, timeit, write_jsonl
from peftu_kernels import ops
from peftu_kernels.config import T5Config
from peftu_kernels.ops import dora as _dora  # noqa: F401  (registers the DoRA ops)
from peftu_kernels.ops.segments import make_segments


def cost(op: str, T: int, D: int, U: int, e: int, r: int = 8, m: int = 48, P: int = 20, H: int = 12,
         dk: int = 64, B: int = 1) -> dict:
    """Ideal bytes and FLOPs of one op call: T tokens (B rows), width D (K = N = D), U distinct users,
    e bytes per element; r = LoRA rank, m = bottleneck, P = prompt / prefix length, H x dk = attention."""
    if op in ("lora", "dora"):
        b = e * (T * D + 2 * T * D + U * r * 2 * D)      # x; y read + written; A and B of each user
        f = 2 * T * r * 2 * D
        if op == "dora":
            b, f = b + e * U * D, f + T * D               # the gains; one multiply per output
        return {"bytes": b, "flops": f}
    if op == "ia3_scale":
        return {"bytes": e * (2 * T * D + U * D), "flops": T * D}
    if op == "adapter":
        return {"bytes": e * (3 * T * D + U * (2 * m * D + m + D)), "flops": 2 * T * m * 2 * D}
    if op == "prompt_prepend":
        L = T // B
        return {"bytes": e * (B * L * D + B * P * D + B * (P + L) * D), "flops": 0}
    if op == "prefix_gather":
        return {"bytes": e * 2 * 2 * B * H * P * dk, "flops": 0}  # keys and values: read and written
    raise ValueError(f"no cost model for op {op!r}")


def ceilings(dev: torch.device, dtype) -> dict:
    """Measured copy bandwidth (GB/s) and matmul peak (TFLOP/s) of this device, in this run."""
    n = 256 * 2**20 if dev.type == "cuda" else 64 * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    copy_ms = timeit(lambda: b.copy_(a), dev)["ms"]
    k = 8192 if dev.type == "cuda" else 1024
    w = torch.randn(k, k, device=dev, dtype=dtype)
    mm_ms = timeit(lambda: w @ w, dev)["ms"]
    return {"copy_GBps": 2 * n / copy_ms / 1e6, "matmul_TFLOPs": 2 * k ** 3 / mm_ms / 1e9}


def _inputs(op, B, L, D, U, r, dev, dt, g):
    S = max(U, 1)
    slots = (torch.arange(B) % S)[torch.randperm(B, generator=g)].to(dev)
    x = torch.randn(B, L, D, generator=g).to(dev, dt)
    y = torch.randn(B, L, D, generator=g).to(dev, dt)
    if op in ("lora", "dora"):
        A = (torch.randn(S, r, D, generator=g) / math.sqrt(D)).to(dev, dt)
        Bw = (torch.randn(S, D, r, generator=g) / math.sqrt(r)).to(dev, dt)
        args = (y, x, A, Bw, torch.full((S,), 2.0, device=dev))
        if op == "dora":
            args += ((1 + torch.rand(S, D, generator=g)).to(dev),)
        return args + (slots,), {"rank": torch.full((S,), r, device=dev), "seg": make_segments(slots)}
    if op == "ia3_scale":
        return (x, (1 + torch.rand(S, D, generator=g)).to(dev, dt), slots), {"seg": make_segments(slots)}
    m = 48
    down, up = (torch.randn(S, m, D, generator=g) / math.sqrt(D)).to(dev, dt), \
        (torch.randn(S, D, m, generator=g) / math.sqrt(m)).to(dev, dt)
    return (x, y, down, torch.zeros(S, m, device=dev, dtype=dt), up, torch.zeros(S, D, device=dev, dtype=dt),
            "relu", slots), {"seg": make_segments(slots)}


def report(device: str, quick: bool, shape: str = "flan-t5-base", backend: str | None = None) -> tuple[list, dict]:
    dev = torch.device(device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    backend = backend or ops.resolve(None, dev.type)
    ceil = ceilings(dev, dt)
    ridge = ceil["matmul_TFLOPs"] * 1e3 / ceil["copy_GBps"]  # FLOPs per byte where the roofs meet
    D, e, g = T5Config.from_name(shape).d_model, torch.finfo(dt).bits // 8, torch.Generator().manual_seed(0)
    points = [(64, 1, 64), (64, 1, 1), (64, 128, 64)] if quick else \
        [(B, L, U) for B in (1, 16, 64, 256) for L in (1, 128) for U in {1, B}]
    rows = []
    for op in ("lora", "dora", "ia3_scale", "adapter"):
        fn = ops.get(op, backend)
        for B, L, U in points:
            args, kw = _inputs(op, B, L, D, U, 8, dev, dt, g)
            c = cost(op, B * L, D, U, e)
            with torch.inference_mode():
                ms = timeit(lambda: fn(*args, **kw), dev)["ms"]
            gbps, tflops = c["bytes"] / ms / 1e6, c["flops"] / ms / 1e9
            rows.append({"op": op, "B": B, "L": L, "users": U, "MB": c["bytes"] / 1e6, "MFLOP": c["flops"] / 1e6,
                         "intensity": c["flops"] / c["bytes"], "bound": "compute" if c["flops"] / c["bytes"] > ridge
                         else "memory", "ms": ms, "GBps": gbps, "TFLOPs": tflops,
                         "pct_bw": 100 * gbps / ceil["copy_GBps"], "pct_peak": 100 * tflops / ceil["matmul_TFLOPs"],
                         "backend": backend})
    return rows, {**ceil, "ridge_flop_per_byte": ridge, "dtype": str(dt), "shape": shape}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="flan-t5-base")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/roofline.jsonl")
    a = ap.parse_args(argv)
    rows, meta = report(a.device, a.quick, a.shape, a.backend)
    env = {**environment(a.device), **meta}
    print(f"device: {env['device']}; copy {meta['copy_GBps']:.0f} GB/s, matmul {meta['matmul_TFLOPs']:.2f} TFLOP/s "
          f"({meta['dtype']}), ridge {meta['ridge_flop_per_byte']:.1f} FLOP/byte")
    print(table(rows, ["op", "backend", "B", "L", "users", "MB", "MFLOP", "intensity", "bound", "ms", "GBps", "TFLOPs",
                       "pct_bw", "pct_peak"]))
    write_jsonl(a.out, rows, env)
    return rows


if __name__ == "__main__":
    main()
