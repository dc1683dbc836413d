"""Greedy generation and per-row sampling with a KV cache, and label scoring in one batched decoder pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import GREEDY, Sampling, pick, row_generator
from .t5 import T5


class NonFiniteRowsError(RuntimeError):
    """Rows whose logits were not all finite (a module whose weights are finite but overflow in the forward):
    those rows have no answer. `rows` (indices), `users` (their users, None = base model) name them; `result`
    is the whole output, every other row served as usual, the flagged rows filled with pad (greedy) or NaN
    (score_labels)."""

    def __init__(self, rows: list[int], users: list, result: torch.Tensor):
        self.rows, self.users, self.result = rows, users, result
        named = ", ".join(f"row {r} (user {u!r})" for r, u in zip(rows[:8], users[:8]))
        more = f" and {len(rows) - 8} more" if len(rows) > 8 else ""
        super().__init__(f"logits are not finite for {named}{more}: their modules overflow in the forward; "
                         f"the other rows are in .result")


def _finite_or_raise(bad: torch.Tensor, result: torch.Tensor, fill, peft) -> torch.Tensor:
    """One host sync per call: raise NonFiniteRowsError for the rows flagged in `bad` (B,) bool."""
    if not bool(bad.any()):
        return result
    rows = bad.nonzero().flatten().tolist()
    who = getattr(peft, "rows", None)
    result = result.clone()
    result[bad] = fill
    raise NonFiniteRowsError(rows, [who[r] if who is not None else None for r in rows], result)


@torch.no_grad()
def greedy(model: T5, input_ids, attention_mask=None, max_new_tokens: int = 16, peft=None,
           stop_at_eos: bool = True) -> torch.Tensor:
    """New tokens (B, <= max_new_tokens), pad after each row's EOS, as HF's greedy `generate` gives them
    (without the start token). Cross-attention keys/values are computed once per request. stop_at_eos=False
    always runs max_new_tokens steps (fixed work, for timing). Rows whose logits are not finite at any step
    raise NonFiniteRowsError (naming them and their users) with every other row's tokens in its `result`."""
    cfg = model.cfg
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    enc, mask = model.encode(input_ids, attention_mask, peft)
    cache = model.new_cache(enc, mask, peft, max_new_tokens)
    B = input_ids.shape[0]
    tok = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    bad = torch.zeros_like(done)  # on the device: the check costs no sync per step
    out = []
    for _ in range(max_new_tokens):
        logits = model.decode(tok, enc, mask, peft, cache)[:, -1]
        bad |= ~torch.isfinite(logits).all(-1)
        nxt = logits.argmax(-1).masked_fill(done, cfg.pad_token_id)
        out.append(nxt)
        done |= nxt == cfg.eos_token_id
        if stop_at_eos and bool(done.all()):
            break
        tok = nxt[:, None]
    return _finite_or_raise(bad, torch.stack(out, 1), cfg.pad_token_id, peft)


def check_labels(labels, vocab_size: int) -> None:
    if not isinstance(labels, (list, tuple)) or not labels:
        raise ValueError(f"labels must be a non-empty list of candidates (lists of token ids), got {labels!r}")
    for c, lab in enumerate(labels):
        if not isinstance(lab, (list, tuple)) or not lab:
            raise ValueError(f"label candidate {c} must be a non-empty list of token ids, got {lab!r}")
        bad = [t for t in lab if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"label candidate {c} has ids {bad[:4]} outside this model's vocabulary "
                             f"[0, {vocab_size})")


def pack_labels(labels: list[list[int]], device=None):
    """Candidates packed side by side in one decoder row: inputs, targets, local positions and the
    block-diagonal causal mask (each candidate sees only its own earlier tokens)."""
    L = max(len(x) for x in labels)
    C = len(labels)
    tgt = torch.full((C, L), -100, dtype=torch.long)
    for c, lab in enumerate(labels):
        if not lab:
            raise ValueError(f"label candidate {c} is empty")
        tgt[c, :len(lab)] = torch.tensor(lab)
    local = torch.arange(L).repeat(C)
    block = torch.arange(C).repeat_interleave(L)
    allowed = (block[None, :] == block[:, None]) & (local[None, :] <= local[:, None])
    return tgt.to(device), local.to(device), allowed[None].to(device)


@torch.no_grad()
def score_labels(model: T5, input_ids, attention_mask, labels: list[list[int]], peft=None) -> torch.Tensor:
    """(B, C) log-likelihood of each candidate label (token ids, EOS included if given) for each row.
    All candidates share one decoder pass per row: no copies of the encoder output. Rows whose logits are not
    finite raise NonFiniteRowsError, with every other row's scores in its `result`."""
    check_labels(labels, model.cfg.vocab_size)
    enc, mask = model.encode(input_ids, attention_mask, peft)
    return score_encoded(model, enc, mask, labels, peft)


@torch.no_grad()
def score_encoded(model: T5, enc, mask, labels: list[list[int]], peft=None, check_finite: bool = True) -> torch.Tensor:
    """score_labels from an encoder output (the serving engine encodes once for every kind of request);
    check_finite=False leaves non-finite rows as NaN for a caller that fails them itself."""
    cfg = model.cfg
    tgt, local, allowed = pack_labels(labels, enc.device)
    C, L = tgt.shape
    dec_in = torch.full_like(tgt, cfg.pad_token_id)
    dec_in[:, 0] = cfg.decoder_start_token_id
    dec_in[:, 1:] = tgt[:, :-1].clamp(min=0)
    B = enc.shape[0]
    logits = model.decode(dec_in.reshape(1, -1).expand(B, -1), enc, mask, peft, positions=local, allowed=allowed)
    bad = ~torch.isfinite(logits).flatten(1).all(1)
    logp = torch.log_softmax(logits.float(), -1).view(B, C, L, -1)
    t = tgt.clamp(min=0)[None, :, :, None].expand(B, C, L, 1)
    tok = logp.gather(-1, t).squeeze(-1) * (tgt != -100)
    return _finite_or_raise(bad, tok.sum(-1), float("nan"), peft) if check_finite else tok.sum(-1)


@dataclass
class Generation:
    """What `sample` gives each row: its tokens (EOS included when it ended there, a stop sequence left out),
    why it ended ("stop" | "length"), and with logprobs asked, per token the picked token's log-probability and
    the most likely (id, log-probability) pairs."""
    tokens: list[list[int]]
    finish_reason: list[str]
    logprobs: list[list[float] | None]
    top_logprobs: list[list[list[tuple[int, float]]] | None]


@torch.no_grad()
def sample(model: T5, input_ids, attention_mask=None, settings: Sampling | list[Sampling] = GREEDY,
           max_new_tokens: int | list[int] = 16, peft=None, generators: list | None = None) -> Generation:
    """Per-row decoding (`sampling.Sampling`: temperature, top_p, top_k, seed, stop, logprobs) with a KV cache;
    `settings` / `max_new_tokens` one for all rows or one per row. Greedy rows give `greedy`'s tokens. A seeded
    row gives the same tokens in any batch. One host sync per step (stop sequences and finished rows are
    checked on the host). Rows with non-finite logits raise NonFiniteRowsError (`result`: None here)."""
    cfg = model.cfg
    B = input_ids.shape[0]
    rows = list(settings) if isinstance(settings, (list, tuple)) else [settings] * B
    caps = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * B
    if len(rows) != B or len(caps) != B:
        raise ValueError(f"settings and max_new_tokens need one entry per row ({B}), got {len(rows)} / {len(caps)}")
    for c in caps:
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"max_new_tokens must be positive ints, got {c!r}")
    for s in rows:
        if not isinstance(s, Sampling):
            raise TypeError(f"settings must be Sampling, got {type(s).__name__}")
        s.check(cfg.vocab_size)
    gens = generators or [row_generator(s.seed) if not s.greedy else None for s in rows]
    enc, mask = model.encode(input_ids, attention_mask, peft)
    cache = model.new_cache(enc, mask, peft, max(caps))
    tok = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    out = Generation([[] for _ in range(B)], [None] * B, [[] if s.logprobs is not None else None for s in rows],
                     [[] if s.logprobs is not None else None for s in rows])
    live = set(range(B))
    for step in range(max(caps)):
        logits = model.decode(tok, enc, mask, peft, cache)[:, -1]
        bad = (~torch.isfinite(logits).all(-1)).nonzero().flatten().tolist()
        bad = [i for i in bad if i in live]
        if bad:
            who = getattr(peft, "rows", None)
            raise NonFiniteRowsError(bad, [who[r] if who is not None else None for r in bad], None)
        got = pick(logits, rows, gens)
        for i in sorted(live):
            t = got.tokens[i]
            out.tokens[i].append(t)
            if out.logprobs[i] is not None:
                out.logprobs[i].append(got.logprob[i])
                out.top_logprobs[i].append(got.top[i])
            s = rows[i].cut_stop(out.tokens[i], out.logprobs[i], out.top_logprobs[i])
            if t == cfg.eos_token_id or s is not None:
                out.finish_reason[i] = "stop"
            elif step + 1 >= caps[i]:
                out.finish_reason[i] = "length"
            if out.finish_reason[i] is not None:
                live.discard(i)
        if not live:
            break
        tok = torch.tensor(got.tokens, device=input_ids.device)[:, None]
    return out
