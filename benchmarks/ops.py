"""Op microbenchmark: the mixed-user LoRA / adapter / IA3 ops, Triton vs reference vs HF PEFT's per-adapter loop.

python -m benchmarks.ops [--shape flan-t5-base] [--check] [--quick]
Sweeps popularity (distinct, uniform, zipf, identical), batch and rank at Flan-T5-base / -large sizes
(one q-projection: K = N = d_model). On a GPU it reports achieved GB/s and TFLOP/s against the card's
measured ceilings (a large copy and a large bf16 matmul timed in the same run); on CPU only the reference
and the loop run (Triton on CPU is its interpreter, not a speed).
"""
from __future__ import annotations

import argparse
import math

import torch

from benchmarks import roofline
from benchmarks.common import environment, table, timeit, write_jsonl
from peftu_kernels import ops
from peftu_kernels.config import T5Config
from peftu_kernels.ops.segments import make_segments


def slots_for(pop: str, B: int, S: int, g) -> torch.Tensor:
    if pop == "distinct":
        return torch.randperm(S, generator=g)[:B] if B <= S else torch.arange(B) % S
    if pop == "identical":
        return torch.zeros(B, dtype=torch.long)
    if pop == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64)
        return torch.multinomial(p / p.sum(), B, replacement=True, generator=g)
    return torch.randint(0, S, (B,), generator=g)


def peft_loop(y, x, A, B, scale, slots):
    """HF PEFT's mixed batch: one pass per distinct adapter over the rows that use it."""
    out = y.clone()
    for s in slots.unique().tolist():
        if s < 0:
            continue
        rows = (slots == s).nonzero().squeeze(1)
        out[rows] += (x[rows] @ A[s].T @ B[s].T) * scale[s]
    return out


def ceilings(dev) -> dict:
    if dev.type != "cuda":
        return {}
    from triton.testing import do_bench
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a))
    m = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm = do_bench(lambda: m @ m)
    return {"copy_GBps": 2 * a.numel() / ms / 1e6, "bf16_TFLOPs": 2 * 8192 ** 3 / mm / 1e9}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="flan-t5-base,flan-t5-large")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check", action="store_true", help="verify every contender against the reference first")
    ap.add_argument("--quick", action="store_true", help="a few points only")
    ap.add_argument("--roofline", action="store_true", help="the roofline report of every op (benchmarks/roofline.py)")
    ap.add_argument("--out", default="results/ops.jsonl")
    a = ap.parse_args(argv)
    if a.roofline:
        return roofline.main(["--device", a.device] + (["--quick"] if a.quick else []))
    dev = torch.device(a.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    backends = ["reference"] + (["triton"] if dev.type == "cuda" else [])
    if dev.type == "cuda":
        try:
            ops.resolve("cuda")
            backends.append("cuda")
        except Exception as e:  # not built: say so in the table
            print(f"cuda backend unavailable: {e}")
    ceil = ceilings(dev)
    rows, g = [], torch.Generator().manual_seed(0)
    points = [(64, 128, 16), (64, 1, 16), (64, 128, 64), (256, 1, 8)] if a.quick else \
        [(B, L, r) for B in (1, 16, 64, 256) for L in (1, 128) for r in (8, 16, 64)]
    for shape in a.shapes.split(","):
        D = T5Config.from_name(shape).d_model
        for B, L, r in points:
            S = max(B, 64)
            A = (torch.randn(S, r, D, generator=g) / math.sqrt(D)).to(dev, dt)
            Bw = (torch.randn(S, D, r, generator=g) / math.sqrt(r)).to(dev, dt)
            scale = torch.full((S,), 2.0, device=dev)
            x = torch.randn(B, L, D, generator=g).to(dev, dt)
            y = torch.randn(B, L, D, generator=g).to(dev, dt)
            for pop in ("distinct", "uniform", "zipf", "identical"):
                slots = slots_for(pop, B, S, g).to(dev)
                seg = make_segments(slots)
                fns = {b: (lambda f=ops.get("lora", b): f(y, x, A, Bw, scale, slots, seg=seg)) for b in backends}
                fns["peft_loop"] = lambda: peft_loop(y, x, A, Bw, scale, slots)
                if a.check:
                    ref = ops.get("lora", "reference")(y.float(), x.float(), A.float(), Bw.float(), scale, slots)
                    for k, f in fns.items():
                        torch.testing.assert_close(f().float(), ref, rtol=3e-2, atol=3e-2)
                row = {"bench": "ops.lora", "shape": shape, "B": B, "L": L, "r": r, "pop": pop}
                c = roofline.cost("lora", B * L, D, int(slots.unique().numel()), x.element_size(), r=r)
                bytes_moved, flops = c["bytes"], c["flops"]
                with torch.inference_mode():
                    for k, f in fns.items():
                        ms = timeit(f, dev)["ms"]
                        row[f"{k}_ms"] = ms
                        if k == "triton" and ceil:
                            row["triton_GBps"] = bytes_moved / ms / 1e6
                            row["triton_TFLOPs"] = flops / ms / 1e9
                            row["triton_bw_frac"] = row["triton_GBps"] / ceil["copy_GBps"]
                best = "triton" if "triton" in backends else "reference"
                row["vs_loop"] = row["peft_loop_ms"] / row[f"{best}_ms"]
                rows.append(row)
    # the headline ratio: a 64-row batch of distinct users against the same batch with one shared adapter
    for r0 in rows:
        if r0["pop"] == "distinct" and r0["B"] == 64:
            same = next((r1 for r1 in rows if r1["pop"] == "identical" and all(r1[k] == r0[k] for k in ("shape", "B", "L", "r"))), None)
            if same:
                b = "triton" if "triton" in backends else "reference"
                r0["distinct_vs_identical"] = r0[f"{b}_ms"] / same[f"{b}_ms"]
    env = {**environment(dev), **ceil}
    print(f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}; ceilings {ceil or 'n/a (CPU)'}")
    cols = ["shape", "B", "L", "r", "pop"] + [f"{b}_ms" for b in backends] + ["peft_loop_ms", "vs_loop",
                                                                             "distinct_vs_identical"]
    if ceil:
        cols += ["triton_GBps", "triton_TFLOPs", "triton_bw_frac"]
    print(table(rows, cols))
    write_jsonl(a.out, rows, env)


if __name__ == "__main__":
    main()
