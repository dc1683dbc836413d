"""Autotune the decode LoRA kernels on this GPU and cache the winners in the repo
(peftu_kernels/triton/tuned/<gpu name>.json), where `configs.decode_config` reads them.

python -m benchmarks.autotune [--shapes flan-t5-base,flan-t5-large] [--ranks 8,16]
For each decode shape (rows 16-256, distinct or shared users) every candidate (SGMV/BGMV x split_k x BLOCK_N)
is checked against the reference first, then timed; the fastest is kept. Commit the JSON it writes.
"""
from __future__ import annotations

import argparse
import math

import torch

from benchmarks.common import table, timeit
from peftu_kernels.config import T5Config
from peftu_kernels.ops import reference as R
from peftu_kernels.ops.segments import make_segments
from peftu_kernels.triton import configs, sgmv


def tune(points, device, dtype, timer=None, quick=False) -> tuple[dict, list]:
    """points: (rows, users, K, N, R). Returns (key -> best config, table rows)."""
    timer = timer or (lambda fn: timeit(fn, device)["ms"])
    best, rows, g = {}, [], torch.Generator().manual_seed(0)
    for B, U, K, N, r in points:
        S = max(U, 1)
        slots = (torch.arange(B) % S)[torch.randperm(B, generator=g)].to(device)
        seg = make_segments(slots)
        A = (torch.randn(S, r, K, generator=g) / math.sqrt(K)).to(device, dtype)
        Bw = (torch.randn(S, N, r, generator=g) / math.sqrt(r)).to(device, dtype)
        x, y = torch.randn(B, 1, K, generator=g).to(device, dtype), torch.randn(B, 1, N, generator=g).to(device, dtype)
        scale, rank = torch.full((S,), 2.0, device=device), torch.full((S,), r, device=device)
        ref = R.lora(y.float(), x.float(), A.float(), Bw.float(), scale, slots)
        timed = []
        for cfg in configs.candidates(K, quick):
            got = sgmv.lora_decode_(y.clone(), x, A, Bw, scale, slots, rank, seg, cfg)
            torch.testing.assert_close(got.float(), ref, rtol=3e-2, atol=3e-2)  # a wrong config never wins
            timed.append((timer(lambda c=cfg: sgmv.lora_decode_(y.clone(), x, A, Bw, scale, slots, rank, seg, c)), cfg))
        ms, cfg = min(timed, key=lambda t: t[0])
        heur = configs.decode_config(B, int(seg.slot.numel()), K, N, r)  # no GPU name: the heuristic alone
        best[configs.key("lora_decode", B, K, N, r, heur["grouped"])] = cfg  # the key decode_config looks up
        h_ms = timer(lambda: sgmv.lora_decode_(y.clone(), x, A, Bw, scale, slots, rank, seg, heur))
        rows.append({"rows": B, "users": U, "K": K, "N": N, "r": r, "best_ms": ms, "heuristic_ms": h_ms,
                     "heuristic_vs_best": h_ms / ms, **{f"best_{k}": v for k, v in cfg.items()}})
    return best, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="flan-t5-base,flan-t5-large")
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--dry-run", action="store_true", help="print, do not write the JSON")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("autotune needs a CUDA GPU (the interpreter's speed says nothing about a card)")
    dev, gpu = torch.device("cuda"), torch.cuda.get_device_name()
    points = [(B, U, D, D, r) for s in a.shapes.split(",") for D in [T5Config.from_name(s).d_model]
              for r in map(int, a.ranks.split(",")) for B in (16, 64, 256) for U in (1, B)]
    best, rows = tune(points, dev, torch.bfloat16)
    print(f"device: {gpu}")
    print(table(rows, list(rows[0])))
    if not a.dry_run:
        print(f"wrote {configs.save_tuned(gpu, best)}")


if __name__ == "__main__":
    main()
