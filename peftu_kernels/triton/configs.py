"""Launch configs: a heuristic per op and shape, overridden by autotuned entries cached per GPU name.

`python -m benchmarks.autotune` times each of `candidates()` on the card it runs on and writes
`tuned/<gpu name>.json` beside this file (commit it: the next run on that kind of card reads it). Keys bucket
the sizes that matter (rows to a power of two, K / N / R exact), so a decode step of 48 rows uses the entry
tuned for 64. Under the interpreter every config is the smallest one (a correctness run, not a speed).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from functools import lru_cache
from pathlib import Path

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TUNED = Path(__file__).parent / "tuned"
SMS_DEFAULT = 132  # H100 / H200; the real count is read from the device when there is one


def sm_count(device=None) -> int:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(device or 0).multi_processor_count
    except (RuntimeError, AssertionError):
        pass
    return SMS_DEFAULT


def gpu_file(name: str) -> Path:
    return TUNED / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() + ".json")


@lru_cache(maxsize=None)
def _tuned(name: str) -> dict:
    f = gpu_file(name)
    return json.loads(f.read_text()) if f.is_file() else {}


def key(op: str, rows: int, K: int, N: int, R: int, grouped: bool) -> str:
    return f"{op}:rows{triton.next_power_of_2(max(rows, 1))}:K{K}:N{N}:R{R}:{'sgmv' if grouped else 'bgmv'}"


# fp32 values a thread may hold in a program's live tiles (accumulators and operand tiles): above it ptxas
# spills (benchmarks.kernel_resources on sm_80 / sm_90: 48 a thread spilled with 16-bit tensor-core dots, 24-28
# with fp32 ones, which Triton lowers to FMAs that keep far more live than the tiles). `fit` keeps every
# heuristic config within it, half of it for fp32 (IEEE) dots; tests/test_kernel_compile.py checks the result.
TILE_BUDGET = 32


def fit(blocks: dict, tiles, shrink, warps: int = 4, ieee: bool = False) -> tuple[dict, int]:
    """Block sizes and num_warps such that the program's live tiles (each a pair of block names or numbers,
    e.g. ("BLOCK_M", "BLOCK_R")) hold at most TILE_BUDGET fp32 values a thread (half for fp32 dots, `ieee`):
    first more warps (up to 8), then the blocks in `shrink` order are halved (never below 16). Returns
    (blocks, num_warps)."""
    b, budget = dict(blocks), TILE_BUDGET // 2 if ieee else TILE_BUDGET
    live = lambda: sum(math.prod(b[d] if isinstance(d, str) else d for d in t) for t in tiles)  # noqa: E731
    while live() > budget * 32 * warps:
        if warps < 8:
            warps *= 2
            continue
        d = next((d for d in shrink if b[d] > 16), None)
        if d is None:
            break
        b[d] //= 2
    return b, warps


def gpu_name(t) -> str | None:
    """The name of the card holding tensor `t` (the tuned file's key), None off a GPU."""
    if getattr(t, "is_cuda", False):
        import torch
        return torch.cuda.get_device_name(t.device)
    return None


def candidates(K: int, quick: bool = False):
    """The decode configs autotuning times (and the compile check builds): SGMV / BGMV, K splits, N blocks."""
    splits = [1, 2] if quick else [1, 2, 4, 8]
    for grouped, split, bn in itertools.product([True, False], splits, [16, 32] if quick else [32, 64, 128, 256]):
        if K // split >= 16:
            yield dict(grouped=grouped, split_k=split, BLOCK_K=16 if quick else 64, BLOCK_N=bn,
                       num_warps=1 if quick else 4)


def decode_config(rows: int, n_segments: int, K: int, N: int, R: int, gpu: str | None = None, sms: int | None = None):
    """Decode-shaped LoRA (one token per row): SGMV tiles when users repeat (rows of a user share one read of
    its A and B), BGMV (a program per row) when every row differs; split K (shrink) and N (expand) until the
    grid has about two programs per SM, because 8-64 programs leave most of a 132-SM card idle."""
    grouped = rows >= 2 * max(n_segments, 1)
    tiles = (n_segments * 2 if grouped else rows) or 1  # about two tiles of 16 per user when grouped
    if INTERPRET:
        cfg = dict(grouped=grouped, split_k=2 if K > 32 else 1, BLOCK_K=16, BLOCK_N=16, num_warps=1)
        return _with_tuned(cfg, gpu, rows, K, N, R, grouped)
    target = 2 * (sms or sm_count())
    split_k = 1
    while tiles * split_k < target and K // (split_k * 2) >= 128:
        split_k *= 2
    bn = 128
    while bn > 32 and tiles * triton.cdiv(N, bn) < target:
        bn //= 2
    br, rr = (16 if grouped else 1), max(16, triton.next_power_of_2(R))
    ks, w1 = fit({"BLOCK_K": 64 if K >= 64 else 32}, [(br, rr), (br, "BLOCK_K"), (rr, "BLOCK_K")], ["BLOCK_K"])
    ns, w2 = fit({"BLOCK_N": bn}, [(br, "BLOCK_N"), (br, rr), (rr, "BLOCK_N")], ["BLOCK_N"])
    cfg = dict(grouped=grouped, split_k=split_k, **ks, **ns, num_warps=max(w1, w2))  # shrink and expand share it
    return _with_tuned(cfg, gpu, rows, K, N, R, grouped)


def _with_tuned(cfg: dict, gpu, rows, K, N, R, grouped) -> dict:
    """The GPU's tuned entry for this shape, where its file has one, over the heuristic's config."""
    if gpu:
        cfg.update(_tuned(gpu).get(key("lora_decode", rows, K, N, R, grouped), {}))
    return cfg


def save_tuned(gpu: str, entries: dict) -> Path:
    """Merge `entries` (key -> config) into the GPU's file."""
    f = gpu_file(gpu)
    f.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(f.read_text()) if f.is_file() else {}
    f.write_text(json.dumps({**old, **entries}, indent=1, sort_keys=True) + "\n")
    _tuned.cache_clear()
    return f
