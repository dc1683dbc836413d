"""Flan-T5 / T5 encoder-decoder, short and readable.

Module names equal Hugging Face's (`encoder.block.0.layer.0.SelfAttention.q` ...), so HF checkpoints and
HF PEFT adapter keys map one to one. Every linear, attention and sub-layer knows its `site` (that path);
the optional `peft` argument (a `tenancy.PeftBatch`) changes them per row: LoRA / IA3 in `Linear`,
bottleneck adapters in the residual, prefixes in attention, prompts at the encoder input.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import activations
from .config import T5Config



def relative_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucketing of `rel = key_pos - query_pos`: exact for small distances, log-spaced up to max_distance."""
    out = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    exact = num_buckets // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return out + torch.where(rel < exact, rel, large)


def mask_to_bias(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """bool (.., Lq, Lk) -> additive bias: 0 where allowed, dtype's min elsewhere (like HF, no -inf NaNs)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _clamp_fp16(x):
    # HF clamps fp16 hidden states once anything overflowed, so that training does not NaN; we match it
    if x.dtype == torch.float16 and torch.isinf(x).any():
        m = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-m, m)
    return x


def attention(q, k, v, bias):
    """softmax(q k^T + bias) v, unscaled as in T5."""
    if q.requires_grad and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # PyTorch's CPU flash-attention backward is ~4x slower in 16-bit than this (2.13, AVX-512/AMX)
        s = torch.matmul(q, k.transpose(-1, -2)).float()
        return torch.matmul((s if bias is None else s + bias).softmax(-1).to(q.dtype), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def check_inputs(cfg: T5Config, input_ids, attention_mask=None) -> torch.Tensor:
    """Refuse what the model would silently mis-read; returns the mask as bool. Costs one host sync."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be a 2-D integer tensor (batch, length), got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}")
    B, L = input_ids.shape
    if B == 0 or L == 0:
        raise ValueError(f"input_ids is empty: shape {(B, L)} (need at least one row and one token)")
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {(B, L)}, got "
                             f"{tuple(getattr(attention_mask, 'shape', ()))}")
        mask = attention_mask.bool()
    lo, hi, empty = torch.stack([input_ids.min(), input_ids.max(), (~mask.any(1)).sum()]).tolist()
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"input_ids hold ids in [{lo}, {hi}], outside this model's vocabulary [0, {cfg.vocab_size})")
    if empty:
        rows = (~mask.any(1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows[:8]} have no tokens (attention_mask all zero): nothing to answer")
    return mask


def held(peft, rows: int):
    """An entry point's hold on its batch handle (tenancy.PeftBatch.hold: the engine's lock, the handle's users
    checked), so that no registry change interleaves with a forward; nothing without a handle."""
    return nullcontext() if peft is None else peft.hold(rows)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class Linear(nn.Linear):
    """Bias-free linear; with `peft`, that batch's LoRA / IA3 for this site applies per row."""
    site = ""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x, peft=None):
        return F.linear(x, self.weight) if peft is None else peft.linear(self.site, x, self.weight)


class Attention(nn.Module):
    site = ""

    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q, self.k, self.v = (Linear(cfg.d_model, cfg.inner_dim) for _ in range(3))
        self.o = Linear(cfg.inner_dim, cfg.d_model)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def heads(self, t):
        return t.view(t.shape[0], t.shape[1], self.n_heads, self.d_kv).transpose(1, 2)

    def project_kv(self, src, peft=None):
        return self.heads(self.k(src, peft)), self.heads(self.v(src, peft))

    def forward(self, x, bias, peft=None, kv=None, cache=None, pos=0):
        """x (B, Lq, D); bias additive (B|1, H|1, Lq, Lk): position bias + mask.
        kv: precomputed (k, v) (cross-attention); cache: a LayerCache whose self k/v get x's at `pos`."""
        q = self.heads(self.q(x, peft))
        if kv is None:
            k, v = self.project_kv(x, peft)
            if cache is not None:
                k, v = cache.write(k, v, pos)
            elif peft is not None:
                k, v = peft.prefix_kv(self.site, k, v)
        else:
            k, v = kv
        out = attention(q, k, v, bias)
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1), peft)


class FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated, self.act = cfg.is_gated, activations.fn(cfg.act)
        if cfg.is_gated:
            self.wi_0, self.wi_1 = Linear(cfg.d_model, cfg.d_ff), Linear(cfg.d_model, cfg.d_ff)
        else:
            self.wi = Linear(cfg.d_model, cfg.d_ff)
        self.wo = Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x, peft=None):
        h = self.act(self.wi_0(x, peft)) * self.wi_1(x, peft) if self.gated else self.act(self.wi(x, peft))
        return self.wo(h.to(self.wo.weight.dtype), peft)


class SubLayer(nn.Module):
    """Pre-norm residual sub-layer; `peft.residual` places bottleneck adapters around the add."""
    site = ""

    def __init__(self, cfg: T5Config, name: str, inner: nn.Module):
        super().__init__()
        setattr(self, name, inner)
        self.inner_name = name
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, peft=None, **kw):
        f = getattr(self, self.inner_name)(self.layer_norm(x), peft=peft, **kw)
        return _clamp_fp16(x + f if peft is None else peft.residual(self.site, x, f))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, decoder: bool, has_bias: bool):
        super().__init__()
        layers = [SubLayer(cfg, "SelfAttention", Attention(cfg, has_bias))]
        if decoder:
            layers.append(SubLayer(cfg, "EncDecAttention", Attention(cfg, False)))
        layers.append(SubLayer(cfg, "DenseReluDense", FeedForward(cfg)))
        self.layer = nn.ModuleList(layers)

    def forward(self, x, bias, peft=None, cross_kv=None, cross_bias=None, cache=None, pos=0):
        x = self.layer[0](x, peft, bias=bias, cache=cache, pos=pos)
        if cross_kv is not None:
            x = self.layer[1](x, peft, bias=cross_bias, kv=cross_kv)
        return self.layer[-1](x, peft)


class Stack(nn.Module):
    def __init__(self, cfg: T5Config, n_layers: int, decoder: bool):
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        self.block = nn.ModuleList(Block(cfg, decoder, i == 0) for i in range(n_layers))
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def position_bias(self, qpos: torch.Tensor, kpos: torch.Tensor, delta=None) -> torch.Tensor:
        """(1|B, H, Lq, Lk) bias from layer 0's table, shared by every layer (as in T5). `qpos` (Lq,) shared, or
        (B, Lq) per row (serving: rows at their own positions). `delta` shifts each row's (B,) or each row and
        key's (B, Lk) relative positions (AdapterHub's prefix tuning places a row's real keys after its
        prefix)."""
        rel = (kpos[None, :] - qpos[:, None])[None] if qpos.dim() == 1 else kpos[None, None, :] - qpos[:, :, None]
        if delta is not None:  # (B,) per row, or (B, Lk) per row and key column
            rel = rel + (delta[:, None, None] if delta.dim() == 1 else delta[:, None, :])
        b = relative_bucket(rel, not self.decoder, self.cfg.relative_attention_num_buckets,
                            self.cfg.relative_attention_max_distance)
        # contiguous: a permuted bias would make every layer's attention copy the (B, H, Lq, Lk) sum again
        return self.block[0].layer[0].SelfAttention.relative_attention_bias(b).permute(0, 3, 1, 2).contiguous()


class LayerCache:
    """One decoder layer's self-attention keys/values (preallocated) and its cross-attention keys/values."""

    def __init__(self, k, v, cross_kv):
        self.k, self.v, self.cross_kv = k, v, cross_kv

    def write(self, k, v, pos: int):
        end = pos + k.shape[2]
        self.k[:, :, pos:end], self.v[:, :, pos:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass
class RowState:
    """What a request's decoder rows need besides their tokens, from T5.row_state: per decoder layer the
    cross-attention keys/values (B, H, W, d_kv) and the cross key mask (B, W); the decoder prefix (per layer
    keys/values (B, H, P, d_kv), its mask (B, P)) and the rows' relative-position shift (B,) when the batch's
    users have prefixes."""
    cross_kv: list
    cross_mask: torch.Tensor
    prefix_len: int = 0
    prefix_kv: list | None = None
    prefix_mask: torch.Tensor | None = None
    delta: torch.Tensor | None = None


class DecoderCache:
    """KV cache for greedy decoding: prefix keys first (if any), then one slot per generated token; the
    cross-attention bias, built once per request."""

    def __init__(self, layers, key_mask, pos: int, cross_bias=None):
        self.layers, self.key_mask, self.pos, self.cross_bias = layers, key_mask, pos, cross_bias


class T5(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, cfg.num_layers, decoder=False)
        self.decoder = Stack(cfg, cfg.n_dec_layers, decoder=True)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.input_groups: dict[str, tuple[str, ...]] = {}  # site -> the linears that always get its input tensor
        for name, m in self.named_modules():
            if isinstance(m, (Linear, Attention, SubLayer)):
                m.site = name
            grp = ()
            if isinstance(m, Attention):  # self-attention: q, k, v of x; cross-attention: k, v of the encoder
                grp = tuple(f"{name}.{p}" for p in ("qkv" if name.endswith("SelfAttention") else "kv"))
            elif isinstance(m, FeedForward) and m.gated:
                grp = (f"{name}.wi_0", f"{name}.wi_1")
            self.input_groups.update({s: grp for s in grp})

    # --- encoder -----------------------------------------------------------------------------------
    def encode(self, input_ids, attention_mask=None, peft=None):
        """-> (hidden (B, L', D), mask (B, L') bool); L' includes prompt-tuning tokens when peft adds them."""
        mask = check_inputs(self.cfg, input_ids, attention_mask)
        with held(peft, input_ids.shape[0]):
            return self._encode(input_ids, mask, peft)

    def _encode(self, input_ids, mask, peft):
        x = self.shared(input_ids)
        plen, delta, kmask = 0, None, mask
        if peft is not None:
            width = x.shape[1]
            x, mask = peft.prompt(x, mask)
            plen, kmask = peft.prefix_len("encoder"), mask
            if plen:  # encoder prefixes (AdapterHub): keys only, visible to every query
                kmask = torch.cat([peft.prefix_mask("encoder"), mask], 1)
                delta = peft.prefix_delta("encoder", x.shape[1] - width, x.shape[1])
        kpos = torch.arange(plen + x.shape[1], device=x.device)
        bias = self.encoder.position_bias(kpos[plen:], kpos, delta).to(x.dtype) + \
            mask_to_bias(kmask[:, None, None, :], x.dtype)
        for blk in self.encoder.block:
            x = blk(x, bias, peft)
        return self.encoder.final_layer_norm(x), mask

    # --- decoder -----------------------------------------------------------------------------------
    def cross_kv(self, enc, peft=None):
        kv = [blk.layer[1].EncDecAttention.project_kv(enc, peft) for blk in self.decoder.block]
        if peft is not None and peft.prefix_len("cross"):
            kv = [peft.prefix_kv(blk.layer[1].EncDecAttention.site, *x) for blk, x in zip(self.decoder.block, kv)]
        return kv

    def cross_bias(self, enc_mask, dtype, peft=None):
        if peft is not None and peft.prefix_len("cross"):
            enc_mask = torch.cat([peft.prefix_mask("cross"), enc_mask], 1)
        return mask_to_bias(enc_mask[:, None, None, :], dtype)

    def new_cache(self, enc, enc_mask, peft=None, max_new_tokens: int = 16) -> DecoderCache:
        """Cross-attention keys/values once per request; self-attention slots for prefix + new tokens."""
        with held(peft, enc.shape[0]):
            return self._new_cache(enc, enc_mask, peft, max_new_tokens)

    def _new_cache(self, enc, enc_mask, peft, max_new_tokens):
        B, dev, dt = enc.shape[0], enc.device, enc.dtype
        plen = peft.prefix_len("decoder") if peft is not None else 0
        cap, layers = plen + max_new_tokens, []
        for blk, ckv in zip(self.decoder.block, self.cross_kv(enc, peft)):
            att = blk.layer[0].SelfAttention
            k = torch.zeros(B, att.n_heads, cap, att.d_kv, device=dev, dtype=dt)
            c = LayerCache(k, torch.zeros_like(k), ckv)
            if plen:
                empty = k[:, :, :0]
                c.write(*peft.prefix_kv(att.site, empty, empty), 0)
            layers.append(c)
        key_mask = torch.ones(B, cap, dtype=torch.bool, device=dev)
        if plen:
            key_mask[:, :plen] = peft.prefix_mask("decoder")
        return DecoderCache(layers, key_mask, plen, self.cross_bias(enc_mask, dt, peft))

    def row_state(self, enc, enc_mask, peft=None) -> RowState:
        """Everything decode_rows needs of these rows beyond their tokens, computed once per request (the
        server keeps it in its KV pool): cross-attention keys/values and mask, the decoder prefix if any."""
        with held(peft, enc.shape[0]):
            cmask = enc_mask
            if peft is not None and peft.prefix_len("cross"):
                cmask = torch.cat([peft.prefix_mask("cross"), enc_mask], 1)
            state = RowState(self.cross_kv(enc, peft), cmask)
            P = peft.prefix_len("decoder") if peft is not None else 0
            if P:
                empty = enc.new_zeros(enc.shape[0], self.cfg.num_heads, 0, self.cfg.d_kv)
                state.prefix_len, state.prefix_mask = P, peft.prefix_mask("decoder")
                state.prefix_kv = [peft.prefix_kv(b.layer[0].SelfAttention.site, empty, empty) for b in self.decoder.block]
                state.delta = peft.prefix_delta("decoder")
            return state

    def decode_rows(self, tokens, rows, peft=None):
        """One decoder step for rows that each sit at their own position, with their own encoder length, cache
        and user (continuous batching). tokens (B,) the rows' last tokens; `rows` is a per-row cache: `qpos`
        (B,) each row's query position, `length` the keys to attend, `delta` (B,) or None, `self_valid`
        (B, length) and `cross_mask` (B, W) bool, `layer(i)` a self-attention cache (write(k, v, pos)) and
        `cross(i)` the cross keys/values of decoder layer i. -> logits (B, V)."""
        with held(peft, tokens.shape[0]):
            x = self.shared(tokens[:, None])
            kpos = torch.arange(rows.length, device=x.device)
            allow = rows.self_valid & (kpos[None, :] <= rows.qpos[:, None])
            bias = self.decoder.position_bias(rows.qpos[:, None], kpos, rows.delta).to(x.dtype) + \
                mask_to_bias(allow[:, None, None, :], x.dtype)
            cross_bias = mask_to_bias(rows.cross_mask[:, None, None, :], x.dtype)
            for i, blk in enumerate(self.decoder.block):
                x = blk(x, bias, peft, rows.cross(i), cross_bias, rows.layer(i), 0)
            return self.head(x)[:, -1]

    def decode(self, dec_ids, enc, enc_mask, peft=None, cache: DecoderCache | None = None, positions=None,
               allowed=None):
        """Decoder logits (B, L, V). Teacher-forced when `cache` is None; else appends to the cache.
        `positions` (L,) / `allowed` (B|1, L, L) bool override the causal layout (label scoring packs
        several candidates in a row)."""
        if dec_ids.dim() != 2 or dec_ids.shape[0] != enc.shape[0] or dec_ids.shape[1] < 1:
            raise ValueError(f"decoder ids must be (B={enc.shape[0]}, L>=1), got {tuple(dec_ids.shape)}")
        with held(peft, dec_ids.shape[0]):
            return self._decode(dec_ids, enc, enc_mask, peft, cache, positions, allowed)

    def _decode(self, dec_ids, enc, enc_mask, peft, cache, positions, allowed):
        x = self.shared(dec_ids)
        B, L, dev, dt = *dec_ids.shape, x.device, x.dtype
        if cache is not None:
            start = cache.pos
            kpos = torch.arange(start + L, device=dev)
            qpos = kpos[start:]
            allow = (kpos[None, :] <= qpos[:, None])[None] & cache.key_mask[:, None, :start + L]
            cross = [c.cross_kv for c in cache.layers]
        else:
            plen = peft.prefix_len("decoder") if peft is not None else 0
            local = torch.arange(L, device=dev) if positions is None else positions
            qpos = plen + local
            kpos = torch.cat([torch.arange(plen, device=dev), qpos])
            allow = (local[None, :] <= local[:, None])[None] if allowed is None else allowed
            allow = allow.expand(B, L, L)
            if plen:
                allow = torch.cat([peft.prefix_mask("decoder")[:, None, :].expand(B, L, plen), allow], -1)
            cross = self.cross_kv(enc, peft)
        delta = peft.prefix_delta("decoder") if peft is not None and peft.prefix_len("decoder") else None
        bias = self.decoder.position_bias(qpos, kpos, delta).to(dt) + mask_to_bias(allow[:, None], dt)
        cross_bias = cache.cross_bias if cache is not None and cache.cross_bias is not None else \
            self.cross_bias(enc_mask, dt, peft)
        for i, blk in enumerate(self.decoder.block):
            x = blk(x, bias, peft, cross[i], cross_bias, cache.layers[i] if cache else None,
                    cache.pos if cache else 0)
        if cache is not None:
            cache.pos += L
        return self.head(x)

    def head(self, x):
        """Vocabulary logits of the decoder's last hidden states."""
        x = self.decoder.final_layer_norm(x)
        if self.lm_head is None:  # tied head: T5 rescales the decoder output
            return F.linear(x * self.cfg.d_model ** -0.5, self.shared.weight)
        return self.lm_head(x)

    def forward(self, input_ids, decoder_input_ids, attention_mask=None, peft=None):
        check_inputs(self.cfg, decoder_input_ids)
        with held(peft, input_ids.shape[0]):  # one hold: nothing changes between the encoder and the decoder
            enc, mask = self.encode(input_ids, attention_mask, peft)
            return self.decode(decoder_input_ids, enc, mask, peft)

    def shift_right(self, labels):
        """Decoder inputs for teacher forcing: start token, then labels[:-1] with -100 turned into pad."""
        d = torch.full_like(labels, self.cfg.pad_token_id)
        d[:, 0] = self.cfg.decoder_start_token_id
        d[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, self.cfg.pad_token_id)
        return d

    @torch.no_grad()
    def init_weights(self, seed: int = 0):
        """Random weights of HF's scales (std per fan-in), for throughput work without a checkpoint."""
        g = torch.Generator().manual_seed(seed)
        c = self.cfg
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            fan = {"q": c.d_model * c.d_kv, "wo": c.d_ff, "o": c.inner_dim}.get(name.split(".")[-2], c.d_model)
            std = 1.0 if name.startswith("shared") or "relative" in name else fan ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    @classmethod
    def from_config(cls, cfg: T5Config, dtype=torch.float32, device="cpu", seed: int = 0) -> "T5":
        return cls(cfg).init_weights(seed).to(device=device, dtype=dtype)
