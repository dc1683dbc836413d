"""Per-user metrics with bounded cardinality: at most K named series whatever the number of users (a property
over random traffic, from several threads), every series only grows while it exists, a heavy user is named;
through the server: Prometheus-parsable families with per-user requests, tokens, latency, adapters per tier
and load latency."""
import random
import threading

import httpx
from hypothesis import given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from peftu_kernels.serve import AdapterStore, ServingEngine
from peftu_kernels.serve.http import build_app, serve_in_thread
from peftu_kernels.serve.usage import OTHER, UserMetrics
from peftu_kernels.tenancy import Engine
from serve_world import USERS, model, write_users


def _flat(snap):
    return {(k, o): v for k, s in snap.items() for o, v in [*s.requests.items(), ("tokens", s.tokens),
                                                               ("n", s.latency.n)]}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5), st.lists(st.tuples(st.integers(0, 60), st.sampled_from(["stop", "length", "error"]),
                                             st.integers(0, 9)), min_size=1, max_size=300))
def test_at_most_k_named_series_each_only_growing(k, traffic):
    um = UserMetrics(k)
    prev = {}
    for i, (u, outcome, toks) in enumerate(traffic):
        um.record(None if u == 0 else f"user-{u}", outcome, toks, 3, 0.01 * toks)
        snap = um.snapshot()
        assert sum(1 for key in snap if key[0] == "user") <= k
        now = _flat(snap)
        # a series that existed before and still exists never went down
        for key, v in prev.items():
            if key in now:
                assert now[key] >= v
        prev = now
    total = sum(s.latency.n for s in um.snapshot().values())
    assert total <= len(traffic)
    if k == 0:  # opt-in: no user id is exported
        assert all(key[0] != "user" for key in um.snapshot()) and total == len(traffic)


def test_a_heavy_user_is_named_and_the_rest_summed():
    um = UserMetrics(2)
    rnd = random.Random(0)
    for i in range(2000):
        u = "heavy" if rnd.random() < 0.4 else f"u{rnd.randrange(500)}"
        um.record(u, "stop", 1, 1, 0.001)
    snap = um.snapshot()
    assert ("user", "heavy") in snap and snap[OTHER].latency.n > 0
    assert snap[("user", "heavy")].requests["stop"] >= 700  # it was named early: most of its ~800 are its own


def test_concurrent_recording_loses_nothing():
    um = UserMetrics(0)

    def go(t):
        for i in range(2000):
            um.record(f"u{t}-{i % 7}", "stop", 2, 1, 0.0)
    ts = [threading.Thread(target=go, args=(t,)) for t in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    s = um.snapshot()[OTHER]
    assert s.requests["stop"] == 8000 and s.tokens == 16000 and s.latency.n == 8000


def test_user_metrics_through_the_server(tmp_path):
    m = model()
    write_users(m, tmp_path)
    eng = Engine(m, backend="reference", capacity=4)
    srv = ServingEngine(m, eng, AdapterStore(eng, tmp_path, host_capacity=8), max_rows=4, max_input_len=24,
                        max_new_tokens=8, max_virtual=8, metrics_users=2)
    users = [u for u, *_ in USERS[:5]]
    with serve_in_thread(build_app(srv)) as url:
        plan = [users[0]] * 6 + [users[1]] * 4 + users[2:] + [None]
        for u in plan:
            r = httpx.post(f"{url}/v1/completions", json={"model": u or "base", "prompt": [5, 6], "max_tokens": 3},
                           timeout=60)
            assert r.status_code == 200
        assert httpx.post(f"{url}/v1/completions", json={"model": users[0], "prompt": [5] * 99}).status_code == 400
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    req = {(s.labels["scope"], s.labels["user"], s.labels["outcome"]): s.value
           for s in fams["peftu_user_requests"].samples}
    assert req[("user", users[0], "length")] == 6 and req[("user", users[1], "length")] == 4
    assert req[("other", "", "length")] == 3 and req[("base", "", "length")] == 1
    assert not any(k[1] in users[2:] for k in req)  # only the top 2 are named
    toks = {(s.labels["scope"], s.labels["user"]): s.value for s in fams["peftu_user_generated_tokens"].samples}
    assert toks[("user", users[0])] == 18
    lat = [s for s in fams["peftu_user_request_duration_seconds"].samples
           if s.name.endswith("_count") and s.labels["user"] == users[0]]
    assert lat[0].value == 6
    tiers = {s.labels["tier"]: s.value for s in fams["peftu_adapters"].samples}
    assert tiers["registered"] == 5 and tiers["device"] <= 4
    loads = [s for s in fams["peftu_adapter_load_duration_seconds"].samples if s.name.endswith("_count")]
    assert loads[0].value == 5
