"""/metrics in Prometheus' text format, read from the engine's report at scrape time (prometheus-client)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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


class _Collector:
    def __init__(self, srv):
        self.srv = srv

    def collect(self):
        rep = self.srv.report()
        for k, doc in COUNTERS.items():
            if k in rep:
                yield CounterMetricFamily(f"peftu_{k}", doc, value=float(rep[k]))
        for k, doc in GAUGES.items():
            if k in rep:
                yield GaugeMetricFamily(f"peftu_{k}", doc, value=float(rep[k]))
        hits, misses = rep.get("adapter_hits", 0), rep.get("adapter_misses", 0)
        yield GaugeMetricFamily("peftu_adapter_hit_rate", "share of requests whose user was already loaded",
                                value=hits / (hits + misses) if hits + misses else 1.0)


def render(srv) -> str:
    reg = CollectorRegistry()
    reg.register(_Collector(srv))
    return generate_latest(reg).decode()
