"""Per-user request metrics with bounded cardinality: at most `top_k` users get their own series (the heaviest
by requests, tracked in a bounded Space-Saving sketch); everyone else is summed in one series. Series are keyed
(scope, user): ("user", id) for a named user, ("other", "") for the sum of the rest, ("base", "") for the base
model, so no user id (any string is one) can collide with them. Each series only grows (a Prometheus counter):
a user pushed out of the top-K by a heavier one loses its series, and its later requests count under "other".

top_k = 0 (the default) keeps only the "other" and "base" series (no user id is exported): per-user series are
opt-in.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OTHER, BASE = ("other", ""), ("base", "")


@dataclass
class Hist:
    """A Prometheus histogram's state: counts per upper bound (cumulative at render), sum, count."""
    buckets: tuple = BUCKETS
    counts: list = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += v
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for b, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            acc += c
            out.append((b, acc))
        return out


@dataclass
class Series:
    requests: dict = field(default_factory=dict)   # outcome (finish reason) -> count
    tokens: int = 0
    prompt_tokens: int = 0
    latency: Hist = field(default_factory=Hist)


class UserMetrics:
    def __init__(self, top_k: int = 0, sketch: int | None = None):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
        self.top_k, self.sketch_size = top_k, sketch or max(4 * top_k, 16)
        self.lock = threading.Lock()
        self.sketch: dict[str, int] = {}   # Space-Saving: at most sketch_size users, counts over-estimate
        self.series: dict[tuple, Series] = {OTHER: Series()}

    def _count(self, user: str) -> int:
        sk = self.sketch
        if user in sk:
            sk[user] += 1
        elif len(sk) < self.sketch_size:
            sk[user] = 1
        else:  # replace the lightest: it inherits that count (the sketch's bound on its error)
            low = min(sk, key=sk.__getitem__)
            sk[user] = sk.pop(low) + 1
        return sk[user]

    def _series_for(self, user: str) -> Series:
        key = ("user", user)
        if key in self.series:
            return self.series[key]
        if self.top_k == 0:
            return self.series[OTHER]
        named = [k for k in self.series if k[0] == "user"]
        if len(named) < self.top_k:
            return self.series.setdefault(key, Series())
        low = min(named, key=lambda k: self.sketch.get(k[1], 0))
        if self.sketch.get(user, 0) > self.sketch.get(low[1], 0):
            del self.series[low]
            return self.series.setdefault(key, Series())
        return self.series[OTHER]

    def record(self, user: str | None, outcome: str, tokens: int, prompt_tokens: int, seconds: float) -> None:
        """One finished request (user None: the base model)."""
        with self.lock:
            if user is None:
                s = self.series.setdefault(BASE, Series())
            else:
                self._count(user)
                s = self._series_for(user)
            s.requests[outcome] = s.requests.get(outcome, 0) + 1
            s.tokens += tokens
            s.prompt_tokens += prompt_tokens
            s.latency.observe(seconds)

    def snapshot(self) -> dict[tuple, Series]:
        with self.lock:
            return {u: Series(dict(s.requests), s.tokens, s.prompt_tokens,
                              Hist(s.latency.buckets, list(s.latency.counts), s.latency.total, s.latency.n))
                    for u, s in self.series.items()}
