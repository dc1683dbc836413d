"""/metrics in Prometheus' text format, read from the engine's report at scrape time (prometheus-client).

Server-wide counters and gauges (peftu_*), adapters per residency tier (peftu_adapters{tier}), the adapter
folder load time (peftu_adapter_load_duration_seconds), and per-user series (peftu_user_*{scope, user}) for at
most the server's metrics_users heaviest users, everyone else under scope="other" (usage.UserMetrics).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

COUNTERS = {"steps": "decoding/prefill steps run", "tokens": "tokens generated", "admitted": "requests admitted",
            "finished": "requests finished (any reason)", "cancelled": "requests cancelled", "errors": "requests failed",
            "timeouts": "requests that passed their deadline", "step_errors": "step phases that raised (their requests failed)",
            "step_seconds": "time spent in steps", "adapter_loads": "adapter folders loaded from disk",
            "adapter_load_errors": "adapter folders that failed to load",
            "adapter_host_evictions": "users dropped from host memory (LRU)",
            "adapter_hits": "requests whose user was loaded", "adapter_misses": "requests whose user had to be loaded"}
GAUGES = {"waiting": "requests queued", "active": "requests decoding", "kv_rows_used": "KV pool rows in use",
          "kv_rows": "KV pool rows", "kv_bytes": "KV pool bytes", "kv_bytes_per_request": "KV bytes per active request",
          "tokens_per_second": "tokens generated per second (last 10 s)", "last_step_seconds": "the last step's time",
          "users_loaded": "users in host memory", "users_resident": "users in device bank slots"}


def _hist(name, doc, labels, rows):
    h = HistogramMetricFamily(name, doc, labels=labels)
    for values, hist in rows:
        h.add_metric(values, hist.cumulative(), sum_value=hist.total)
    return h


class _Collector:
    def __init__(self, srv):
        self.srv = srv

    def collect(self):
        srv = self.srv
        rep = srv.report()
        for k, doc in COUNTERS.items():
            if k in rep:
                yield CounterMetricFamily(f"peftu_{k}", doc, value=float(rep[k]))
        for k, doc in GAUGES.items():
            if k in rep:
                yield GaugeMetricFamily(f"peftu_{k}", doc, value=float(rep[k]))
        hits, misses = rep.get("adapter_hits", 0), rep.get("adapter_misses", 0)
        yield GaugeMetricFamily("peftu_adapter_hit_rate", "share of requests whose user was already loaded",
                                value=hits / (hits + misses) if hits + misses else 1.0)
        tiers = GaugeMetricFamily("peftu_adapters", "registered users by residency tier (host counts device ones too)",
                                  labels=["tier"])
        for tier, n in srv.engine.residency.counts().items():
            tiers.add_metric([tier], float(n))
        yield tiers
        if srv.store is not None:
            yield _hist("peftu_adapter_load_duration_seconds", "adapter folder reads, start to registered", [],
                        [([], srv.store.load_seconds)])
        series = srv.usage.snapshot()
        req = CounterMetricFamily("peftu_user_requests", "finished requests per user and outcome (finish reason)",
                                  labels=["scope", "user", "outcome"])
        gen = CounterMetricFamily("peftu_user_generated_tokens", "tokens generated per user", labels=["scope", "user"])
        prompt = CounterMetricFamily("peftu_user_prompt_tokens", "prompt tokens per user", labels=["scope", "user"])
        for (scope, u), s in series.items():
            for outcome, n in sorted(s.requests.items()):
                req.add_metric([scope, u, outcome], float(n))
            gen.add_metric([scope, u], float(s.tokens))
            prompt.add_metric([scope, u], float(s.prompt_tokens))
        yield from (req, gen, prompt)
        yield _hist("peftu_user_request_duration_seconds", "request time per user, arrival to finish",
                    ["scope", "user"], [(list(k), s.latency) for k, s in series.items()])


def render(srv) -> str:
    reg = CollectorRegistry()
    reg.register(_Collector(srv))
    return generate_latest(reg).decode()
