"""Per-row decoding settings and the token pick of one decoder step: every row of a batch its own temperature,
top-p, top-k, seed, stop sequences and log-probabilities; greedy rows beside sampling rows cost only their
argmax.

Semantics (the reference; nothing else picks tokens):
  greedy row (temperature 0): tok = argmax(logits)
  sampling row: p = softmax(logits / T); keep the top_k most likely (top_k > 0) and the smallest set, most likely
  first, whose mass reaches top_p; tok = the inverse CDF of the kept, renormalized p at u ~ U[0, 1), u drawn
  from the row's own generator (one draw per step): a seeded row gives the same tokens whatever shares its batch.
  logprobs: log_softmax(logits) of the model itself (before temperature, top-p, top-k), the picked token's and
  the `logprobs` most likely ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's completions API allows 5)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0                # (0, 1]
    top_k: int = 0                    # 0: off
    seed: int | None = None           # None: a fresh random stream per row
    stop: tuple[tuple[int, ...], ...] = ()   # token-id sequences that end a row (left out of its tokens)
    logprobs: int | None = None       # None: none; k: the picked token's log-probability and the k most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self, vocab_size: int) -> "Sampling":
        """Self if every field is in range; else ValueError naming the field."""
        def num(name, v, lo, hi, lo_open=False):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if lo_open else lo <= v) \
                    or not v <= hi or v != v:
                raise ValueError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
        num("temperature", self.temperature, 0, 2)
        num("top_p", self.top_p, 0, 1, lo_open=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= vocab_size:
            raise ValueError(f"top_k must be an int in [0, {vocab_size}] (0: off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2 ** 63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an int in [0, {MAX_LOGPROBS}], got {lp!r}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, tuple) or not s or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in s):
                raise ValueError(f"stop sequence {i} must be a non-empty list of token ids in [0, {vocab_size}), "
                                 f"got {s!r}")
        return self

    def stopped(self, tokens: list[int]) -> tuple[int, ...] | None:
        """The stop sequence `tokens` ends with, if any."""
        for s in self.stop:
            if len(tokens) >= len(s) and tuple(tokens[-len(s):]) == s:
                return s
        return None

    def cut_stop(self, tokens: list[int], *per_token: list | None) -> tuple[int, ...] | None:
        """If `tokens` ends with a stop sequence, remove it from `tokens` and from each per-token list beside it
        (log-probabilities; None lists skipped), in place; returns the sequence or None."""
        hit = self.stopped(tokens)
        if hit is not None:
            for lst in (tokens, *per_token):
                if lst is not None:
                    del lst[len(lst) - len(hit):]
        return hit


GREEDY = Sampling()


def row_generator(seed: int | None, choice: int = 0) -> torch.Generator:
    """A row's own random stream: from (seed, choice) when seeded (choice i of a request with n > 1 differs
    from choice 0, each reproducible), else from the OS."""
    if seed is None:
        s = int.from_bytes(os.urandom(8), "little") >> 1
    else:
        s = (seed * 0x9E3779B97F4A7C15 + choice) % 2 ** 63
    return torch.Generator().manual_seed(s)


@dataclass
class Picked:
    tokens: list[int]
    logprob: list[float | None]              # the picked token's, for rows that asked
    top: list[list[tuple[int, float]] | None]  # the most likely (id, log-probability), for rows that asked


def pick(logits: torch.Tensor, rows: list[Sampling], gens: list[torch.Generator | None]) -> Picked:
    """One token per row of logits (B, V), each row by its own settings (one host sync)."""
    B, V = logits.shape
    tok = logits.argmax(-1)
    samp = [i for i, s in enumerate(rows) if not s.greedy]
    if samp:
        idx = torch.tensor(samp, device=logits.device)
        u = torch.cat([torch.rand(1, generator=gens[i]) for i in samp]).to(logits.device)
        tok[idx] = sample_rows(logits[idx], [rows[i] for i in samp], u)
    want = [i for i, s in enumerate(rows) if s.logprobs is not None]
    toks = tok.tolist()
    lp: list = [None] * B
    top: list = [None] * B
    if want:
        idx = torch.tensor(want, device=logits.device)
        logp = torch.log_softmax(logits[idx].float(), -1)
        chosen = logp.gather(1, tok[idx][:, None]).squeeze(1).tolist()
        k = max(rows[i].logprobs for i in want)
        tv, ti = logp.topk(min(max(k, 1), V), -1) if k else (None, None)
        tv, ti = (tv.tolist(), ti.tolist()) if k else (None, None)
        for j, i in enumerate(want):
            lp[i] = chosen[j]
            n = rows[i].logprobs
            top[i] = list(zip(ti[j][:n], tv[j][:n])) if n else []
    return Picked(toks, lp, top)


def sample_rows(logits: torch.Tensor, rows: list[Sampling], u: torch.Tensor) -> torch.Tensor:
    """Sampled token per row (the semantics above); u (B,) uniforms in [0, 1)."""
    dev = logits.device
    T = torch.tensor([s.temperature for s in rows], device=dev)
    p = torch.softmax(logits.float() / T[:, None], -1)
    sp, si = p.sort(-1, descending=True)
    before = sp.cumsum(-1) - sp   # mass of the more likely tokens
    top_p = torch.tensor([s.top_p for s in rows], device=dev)[:, None]
    keep = (before < top_p) | (top_p >= 1)  # top_p 1 keeps all (a cumsum may pass 1.0 by rounding)
    k = torch.tensor([s.top_k or logits.shape[1] for s in rows], device=dev)
    keep &= torch.arange(logits.shape[1], device=dev)[None, :] < k[:, None]
    keep[:, 0] = True             # the most likely token is always kept (top_p tiny, or p underflowed)
    sp = sp * keep
    cdf = sp.cumsum(-1)
    j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    j = torch.minimum(j, keep.sum(-1) - 1)  # u * total rounds to total: the last kept token
    return si.gather(1, j[:, None]).squeeze(1)
