"""The OpenAI-style wire format: request bodies (every field honoured or refused by name, unknown fields too),
their translation into a scheduler Request, and the JSON of answers, whole or streamed.

Differences from OpenAI's completions API, on purpose: `model` names the user; an omitted `temperature` is
greedy (0), so answers stay deterministic unless sampling is asked for; `stop` also takes token ids (a list of
ids: each a one-token stop; a list of lists: sequences); `top_k` is an extension; `echo`, `suffix`,
`logit_bias`, penalties and `user` are refused (an encoder-decoder's answer does not continue its prompt, and
here `model` is the user). Log-probabilities are the model's own (log_softmax of its logits, before temperature,
top-p and top-k), as vLLM reports them.
"""
from __future__ import annotations

import math
import time
from typing import Union

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import MAX_LOGPROBS, Sampling
from .scheduler import Choice, Request

Prompt = Union[str, list[int]]
Stop = Union[str, list[str], list[int], list[list[int]], None]
MAX_STOP, MAX_STOP_LEN = 8, 64  # stop entries per request; characters (strings) or ids (sequences) each


class Refused(ValueError):
    """A field this server does not honour (the HTTP layer answers 400 naming it)."""


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no bool-to-int or str-to-number coercion
    model: str = Field(min_length=1)
    prompt: Prompt
    max_tokens: int | None = Field(None, ge=1)  # default: 16, or the server's cap if lower
    stream: bool = False
    timeout: float | None = Field(None, gt=0)  # seconds; lowers the server's --request-timeout for this request
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    n: int = Field(1, ge=1)
    stop: Stop = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # accepted only with the values that mean "not used": anything else is refused by name
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no bool-to-int or str-to-number coercion
    model: str = Field(min_length=1)
    prompt: Prompt
    labels: list[Prompt] = Field(min_length=1)
    timeout: float | None = Field(None, gt=0)


def refusals(b: CompletionBody) -> None:
    """Refused: every option set to a value this server would not honour."""
    if b.echo:
        raise Refused("echo: not supported (an encoder-decoder model's answer does not continue its prompt)")
    if b.best_of is not None and b.best_of != b.n:
        raise Refused(f"best_of: only best_of == n is supported (all choices are returned), got {b.best_of}")
    if b.suffix:
        raise Refused("suffix: not supported (no insertion mode)")
    if b.logit_bias:
        raise Refused("logit_bias: not supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(b, name):
            raise Refused(f"{name}: not supported (only 0)")
    if b.user is not None:
        raise Refused("user: not supported (`model` names the user whose adapter answers)")


def stop_lists(stop: Stop, has_tokenizer: bool) -> tuple[list[str], list[tuple[int, ...]]]:
    """(stop strings, stop id sequences) from the `stop` field."""
    if stop is None:
        return [], []
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > MAX_STOP:
        raise Refused(f"stop: at most {MAX_STOP} entries, got {len(items)}")
    strs, seqs = [], []
    for i, s in enumerate(items):
        if isinstance(s, str):
            if not s or len(s) > MAX_STOP_LEN:
                raise Refused(f"stop[{i}]: a stop string must have 1 to {MAX_STOP_LEN} characters")
            strs.append(s)
        else:
            seq = (s,) if isinstance(s, int) else tuple(s)
            if not seq or len(seq) > MAX_STOP_LEN:
                raise Refused(f"stop[{i}]: a stop sequence must have 1 to {MAX_STOP_LEN} token ids")
            seqs.append(seq)
    if strs and not has_tokenizer:
        raise Refused("stop: strings need a server with a tokenizer; send token ids")
    return strs, seqs


def completion_request(b: CompletionBody, user, ids: list[int], max_tokens: int,
                       tokenizer=None) -> tuple[Request, "Texts"]:
    """The scheduler Request for a completions body, and how its answers become text (Refused / ValueError
    naming the field when it cannot be honoured)."""
    refusals(b)
    strs, seqs = stop_lists(b.stop, tokenizer is not None)
    s = Sampling(temperature=b.temperature or 0.0, top_p=1.0 if b.top_p is None else b.top_p,
                 top_k=b.top_k or 0, seed=b.seed, stop=tuple(seqs), logprobs=b.logprobs)
    texts = Texts(tokenizer, strs, seqs)
    stop_when = (lambda tokens: any(x in texts.decode(tokens) for x in strs)) if strs else None  # step thread
    return Request(user, ids, max_tokens, sampling=s, n=b.n, stop_when=stop_when, timeout=b.timeout), texts


class Texts:
    """Token ids to the text a client sees: decoded, cut at the first stop string, and while a choice runs,
    without a tail that may still become a stop string or a multi-byte character."""

    def __init__(self, tokenizer, stop_strings: list[str], stop_seqs: list[tuple[int, ...]]):
        self.tok, self.strs, self.seqs = tokenizer, stop_strings, stop_seqs

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True) if self.tok is not None else ""

    def final(self, tokens) -> str:
        text = self.decode(tokens)
        cut = min((text.find(s) for s in self.strs if s in text), default=-1)
        return text if cut < 0 else text[:cut]

    def visible(self, c: Choice) -> tuple[list[int], str]:
        """What may be sent of a choice snapshot now: (tokens, text)."""
        toks = list(c.tokens)
        if c.finish_reason is not None:
            return toks, self.final(toks)
        hold = max((k for s in self.seqs for k in range(1, len(s)) if len(toks) >= k and tuple(toks[-k:]) == s[:k]),
                   default=0)  # a partial stop sequence: it may yet be left out
        toks = toks[:len(toks) - hold]
        text = self.final(toks)
        keep = max((k for s in self.strs for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[:len(text) - keep]
        return toks, text.rstrip("\ufffd")  # an incomplete multi-byte character waits for its next token


def logprobs_json(c: Choice, texts: Texts, start: int = 0, end: int | None = None) -> dict | None:
    """OpenAI's completions `logprobs` object for tokens [start, end) of a choice (plus `token_ids` and
    `top_token_ids`, which name tokens exactly where strings may collide)."""
    if c.logprobs is None:
        return None
    ids = list(c.tokens)[start:end]
    lps, tops = list(c.logprobs)[start:end], list(c.top_logprobs)[start:end]
    strs = [texts.decode([t]) if texts.tok is not None else str(t) for t in ids]
    name = (lambda t: texts.decode([t])) if texts.tok is not None else str
    offsets, at = [], 0
    for s in strs:
        offsets.append(at)
        at += len(s)
    return {"tokens": strs, "token_logprobs": lps, "top_logprobs": [{name(t): lp for t, lp in top} for top in tops],
            "text_offset": offsets, "token_ids": ids, "top_token_ids": [[[t, lp] for t, lp in top] for top in tops]}


def choice_json(c: Choice, texts: Texts) -> dict:
    out = {"index": c.index, "text": texts.final(c.tokens), "tokens": list(c.tokens),
           "finish_reason": c.finish_reason, "logprobs": logprobs_json(c, texts)}
    if c.stop_reason is not None:
        out["stop_reason"] = c.stop_reason
    return out


def completion_json(req: Request, model: str, texts: Texts, **extra) -> dict:
    """The OpenAI-style body of a finished generate request."""
    done = sum(len(c.tokens) for c in req.choices)
    return {"id": req.id, "object": "text_completion", "model": model, "created": int(time.time()), **extra,
            "choices": [choice_json(c, texts) for c in req.choices],
            "usage": {"prompt_tokens": len(req.input_ids), "completion_tokens": done,
                      "total_tokens": len(req.input_ids) + done}}


def score_json(req: Request, model: str, **extra) -> dict:
    """Each label's log-likelihood (`scores`) and its probability normalized over the labels."""
    top = max(req.scores)
    z = top + math.log(sum(math.exp(s - top) for s in req.scores))
    return {"id": req.id, "object": "score", "model": model, **extra, "scores": req.scores,
            "probabilities": [math.exp(s - z) for s in req.scores],
            "best": int(max(range(len(req.scores)), key=req.scores.__getitem__))}
