"""Shared test helpers: small random T5s and their transformers twins."""
from __future__ import annotations

import torch

from peftu_kernels.checkpoint import load_state
from peftu_kernels.config import T5Config
from peftu_kernels.t5 import T5

# The one tolerance table (rtol = atol), per kind of comparison and dtype:
#   model    a model's output against a reference from the same inputs and precision (sums reordered only);
#   kernel   a kernel against the fp32 reference: tl.dot / tensor-core tiles accumulate in another order, and
#            16-bit outputs are rounded once more than the reference;
#   fixture  logits recorded by another library (AdapterHub) in another process, summed in another order.
TOLERANCES = {
    "model": {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2},
    "kernel": {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2},
    "fixture": {torch.float32: 5e-4},
}


def tol(dtype=torch.float32, kind: str = "model") -> dict:
    r = TOLERANCES[kind][dtype]
    return dict(rtol=r, atol=r)


TOL = {dt: tol(dt) for dt in TOLERANCES["model"]}  # the common case, by dtype

SMALL_CONFIGS = {
    "gated-untied": dict(vocab_size=101, d_model=40, d_kv=12, d_ff=72, num_layers=2, num_heads=3,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "relu-tied": dict(vocab_size=97, d_model=33, d_kv=7, d_ff=50, num_layers=3, num_decoder_layers=2, num_heads=5,
                      feed_forward_proj="relu", tie_word_embeddings=True),
    "gated-silu-odd": dict(vocab_size=64, d_model=24, d_kv=5, d_ff=31, num_layers=1, num_decoder_layers=3,
                           num_heads=7, feed_forward_proj="gated-silu", tie_word_embeddings=False,
                           relative_attention_num_buckets=6, relative_attention_max_distance=9),
}


def small_cfg(name="gated-untied", **kw) -> T5Config:
    return T5Config(**{**SMALL_CONFIGS[name], **kw})


def hf_twin(cfg: T5Config, seed: int = 0):
    """A transformers T5 with random weights, its own lm_head when untied, and our T5 holding the same weights."""
    import transformers
    torch.manual_seed(seed)
    hcfg = transformers.T5Config(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    hf = transformers.T5ForConditionalGeneration(hcfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # HF's init gives tiny attention weights; widen so the test has teeth
            p.add_(torch.randn_like(p) * 0.05)
    if not cfg.tie_word_embeddings:
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * 0.1)
    ours = load_state(T5(cfg), dict(hf.state_dict())).eval()
    return hf, ours


def padded_batch(vocab: int, B: int = 4, L: int = 11):
    """Random ids with left padding on one row and right padding on another."""
    ids = torch.randint(3, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, -4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def assert_rel_close(got, ref, rel: float = 1e-5, msg=None):
    """Within `rel` relative to the output's scale (fp32 reorderings of large activations differ by ulps)."""
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * float(ref.detach().abs().max()), msg=msg)
