"""Every Triton launch path of this package, driven once at GPU-sized shapes: what the compile check
(compile.py) records under the interpreter and builds for real targets. Each op through the registered Triton
backend (prefill and decode, SGMV and BGMV, one user, grouped sites of two and three, every activation,
training backward) and each autotune candidate (tagged "candidate").
"""
from __future__ import annotations

import torch

from .. import activations, ops
from ..ops.segments import make_segments
from . import configs, sgmv

SHAPES = ((768, 768, 2048),)            # flan-t5-base: d_model, inner (heads * d_kv), d_ff
RANKS = (8, 64)
ROWS = ((64, 1, "distinct"), (64, 1, "grouped"), (8, 1, "one user"), (4, 128, "distinct"), (4, 128, "one user"))


def _slots(B: int, pattern: str) -> torch.Tensor:
    if pattern == "distinct":
        return torch.arange(B)
    if pattern == "grouped":
        return torch.arange(B) // 8
    return torch.zeros(B, dtype=torch.long)


def exercise(rec=None, dtypes=("float32", "float16", "bfloat16"), candidates: bool = True) -> None:
    get = lambda name: ops.get(name, "triton")  # noqa: E731
    for dt in (getattr(torch, d) for d in dtypes):
        new = lambda *s: torch.randn(*s).to(dt)  # noqa: E731
        for D, N, F in SHAPES:
            for r in RANKS:
                for B, L, pattern in ROWS:
                    slots = _slots(B, pattern)
                    S = int(slots.max()) + 1
                    seg = make_segments(slots)
                    x, y = new(B, L, D), new(B, L, N)
                    A, Bw = new(S, r, D), new(S, N, r)
                    scale, rank = torch.ones(S), torch.full((S,), r)
                    get("lora")(y, x, A, Bw, scale, slots, rank, seg)
                    h = get("lora_shrink")(x, A, scale, slots, rank, seg)
                    get("lora_expand")(y, h, Bw, slots, rank, seg)
                    for n in (2, 3):
                        hs = get("lora_shrink")(x, torch.cat([A] * n, 1), None, slots, None, seg)
                        get("lora_expand_group")([new(B, L, N) for _ in range(n)], hs, [Bw] * n,
                                                 [i * r for i in range(n)], slots, [rank] * n, seg)
                    get("dora")(y, x, A, Bw, scale, new(S, N).abs(), slots, rank, seg)
                    get("ia3_scale")(x, new(S, D), slots, seg)
                    for act in activations.NAMES[:7]:
                        get("adapter")(x, x, new(S, 48, D), new(S, 48), new(S, D, 48), new(S, D), act, slots, seg)
                    _train(get, dt, x, y, A, Bw, scale, slots, rank, seg, S, D)
                    if L == 1 and rec is not None and candidates:
                        _candidates(rec, y, x, A, Bw, scale, slots, rank, seg)


def _train(get, dt, x, y, A, Bw, scale, slots, rank, seg, S, D):
    with torch.enable_grad():
        A, Bw = A.clone().requires_grad_(True), Bw.clone().requires_grad_(True)
        x = x.clone().requires_grad_(True)
        get("lora")(y, x, A, Bw, scale, slots, rank, seg).float().sum().backward()
        down = torch.randn(S, 16, D).to(dt).requires_grad_(True)
        up = torch.randn(S, D, 16).to(dt).requires_grad_(True)
        get("adapter")(x, x, down, torch.zeros(S, 16).to(dt), up, torch.zeros(S, D).to(dt), "relu", slots,
                       seg).float().sum().backward()
        vec = torch.ones(S, D).to(dt).requires_grad_(True)
        get("ia3_scale")(x, vec, slots, seg).float().sum().backward()


def _candidates(rec, y, x, A, Bw, scale, slots, rank, seg):
    tag, rec.tag = rec.tag, "candidate"
    try:
        for cfg in configs.candidates(A.shape[2]):
            sgmv.lora_decode_(y, x, A, Bw, scale, slots, rank, seg, cfg)
    finally:
        rec.tag = tag
