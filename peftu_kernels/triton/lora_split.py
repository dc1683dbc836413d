"""LoRA as two ops (Triton), for sites that share an input: one shrink over their A's stacked along R, then
an expand per site. Semantics: ops/reference.py::lora_shrink / lora_expand. Inference only (the engine
fuses sites only while no gradient is wanted); with a gradient the reference runs.
Decode (one token per row, Segments with tiles): the SGMV/BGMV kernels of sgmv.py; otherwise the row
kernels of lora.py. h of rows without a slot is never written (never read).
"""
from __future__ import annotations

import torch

from ..ops import reference
from . import lora as _lo
from . import sgmv
from .autograd import _needs_grad, _rank
from .configs import decode_config, gpu_name


def lora_shrink(x, A, scale, slots, rank=None, seg=None):
    if _needs_grad(x, A):
        return reference.lora_shrink(x, A, scale, slots, rank, seg)
    rank = _rank(rank, A)
    if sgmv.decode_shaped(x, seg):
        if seg.n_active == 0:
            return torch.zeros(x.shape[0], 1, A.shape[1], dtype=torch.float32, device=x.device)
        cfg = decode_config(seg.n_active, int(seg.slot.numel()), A.shape[2], A.shape[1], A.shape[1], gpu_name(x))
        hp = sgmv.shrink(x, A, scale, slots, rank, seg, cfg)
        return (hp.sum(0) if hp.shape[0] > 1 else hp[0])[:, None, :]
    return _lo.shrink(x, A, slots.contiguous(), rank, scale, zero=False)


def lora_expand(y, h, B, slots, rank=None, seg=None):
    if _needs_grad(y, h, B):
        return reference.lora_expand(y, h, B, slots, rank, seg)
    rank = _rank(rank, B.transpose(1, 2))
    if sgmv.decode_shaped(y, seg):
        if seg.n_active == 0:
            return y
        cfg = decode_config(seg.n_active, int(seg.slot.numel()), B.shape[2], B.shape[1], B.shape[2], gpu_name(y))
        return sgmv.expand_(y, h[:, 0][None], B, slots, rank, seg, cfg)
    return _lo.expand_(y, h, B, slots.contiguous(), rank)


OPS = {"lora_shrink": lora_shrink, "lora_expand": lora_expand}
