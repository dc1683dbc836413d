"""The real server on 127.0.0.1, talked to with httpx: answers equal each request alone, streaming,
every error path, cancellation frees memory, /metrics parses, load/unload, shutdown."""
import asyncio
import json
import threading
import time

import httpx
import pytest

from peftu_kernels.serve import AdapterStore, ServingEngine
from peftu_kernels.serve.http import build_app, serve_in_thread
from peftu_kernels.tenancy import Engine
from serve_world import USERS, Oracle, model, text_server, write_users


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    m, srv, mods, tok = text_server(tmp_path_factory.mktemp("users"), 4, 6, max_rows=3, max_queue=64)
    with serve_in_thread(build_app(srv, tok)) as url:
        yield m, srv, url, Oracle(m, mods), tok


def test_concurrent_requests_of_many_users_equal_each_alone(world):
    m, srv, url, oracle, tok = world

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            jobs = []
            for i, (u, *_) in enumerate(USERS + [("base",)] * 2):
                ids = [5 + (i * 7 + j) % 80 for j in range(3 + i % 9)]
                jobs.append((u, ids, "gen", c.post("/v1/completions", json={"model": u, "prompt": ids,
                                                                            "max_tokens": 1 + i % 8})))
                jobs.append((u, ids, "score", c.post("/v1/score", json={"model": u, "prompt": ids,
                                                                        "labels": [[5, 1], [9, 4, 1]]})))
            return [(u, ids, k, await j) for u, ids, k, j in jobs]
    for u, ids, kind, r in asyncio.run(go()):
        assert r.status_code == 200, r.text
        user = None if u == "base" else u
        body = r.json()
        if kind == "gen":
            toks = body["choices"][0]["tokens"]
            want = oracle.tokens(user, ids, len(toks) if body["choices"][0]["finish_reason"] == "length" else 8)
            assert toks == want[:len(toks)] and (body["choices"][0]["finish_reason"] == "length" or toks == want)
        else:
            ref = oracle.scores(user, ids, [[5, 1], [9, 4, 1]]).tolist()
            assert body["scores"] == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_streaming_sends_each_token(world):
    m, srv, url, oracle, tok = world
    u = USERS[3][0]
    ids = [7, 8, 9, 10]
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": u, "prompt": ids, "max_tokens": 6,
                                                               "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    toks = [t for c in chunks for t in c["choices"][0]["tokens"]]
    assert toks == oracle.tokens(u, ids, 6) and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_in_text_out(world):
    m, srv, url, oracle, tok = world
    r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "hello world", "max_tokens": 3})
    assert r.status_code == 200
    ids = tok("hello world").input_ids
    toks = oracle.tokens(None, ids, 3)
    assert r.json()["choices"][0]["tokens"] == toks
    assert r.json()["choices"][0]["text"] == tok.decode(toks, skip_special_tokens=True)
    r = httpx.post(f"{url}/v1/score", json={"model": "base", "prompt": "hello world", "labels": ["yes", "no"]})
    assert r.status_code == 200 and len(r.json()["scores"]) == 2 and r.json()["best"] in (0, 1)


@pytest.mark.parametrize("path,body,status,msg", [
    ("/v1/completions", {"model": "nobody", "prompt": [5]}, 404, "unknown model"),
    ("/v1/completions", {"model": "../etc", "prompt": [5]}, 404, "unknown model"),
    ("/v1/completions", {"model": "base", "prompt": []}, 400, "non-empty"),
    ("/v1/completions", {"model": "base", "prompt": [5, 100000]}, 400, "token ids"),
    ("/v1/completions", {"model": "base", "prompt": [5], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "base", "prompt": [5], "max_tokens": 99}, 400, "max_new_tokens"),
    ("/v1/completions", {"model": "base"}, 400, "prompt"),
    ("/v1/completions", {"model": "", "prompt": [5]}, 400, "model"),
    ("/v1/completions", {"model": "base", "prompt": [5] * 30}, 400, "at most 24"),
    ("/v1/score", {"model": "base", "prompt": [5], "labels": []}, 400, "labels"),
    ("/v1/score", {"model": "base", "prompt": [5], "labels": [[]]}, 400, "candidate 0"),
])
def test_bad_requests_get_a_json_error(world, path, body, status, msg):
    m, srv, url, oracle, tok = world
    r = httpx.post(url + path, json=body)
    assert r.status_code == status and msg in r.json()["error"]["message"], r.text


def test_a_full_queue_is_429(world):
    m, srv, url, oracle, tok = world
    old = srv.max_queue
    srv.max_queue = 0
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": [5], "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        srv.max_queue = old


def test_a_client_that_disconnects_has_its_request_cancelled(world):
    m, srv, url, oracle, tok = world
    before = srv.stats["cancelled"]
    gate = threading.Event()
    slow = srv.step

    def step():  # slow the loop down so the request is still decoding when the client leaves
        gate.wait(0.05)
        slow()
    srv.step = step
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": "base", "prompt": [5, 6], "max_tokens": 8,
                                                                   "stream": True}, timeout=30) as r:
            next(r.iter_lines())
    finally:
        srv.step = slow
    for _ in range(400):
        if srv.stats["cancelled"] > before and srv.pool.used == 0:
            break
        time.sleep(0.01)
    assert srv.stats["cancelled"] > before and srv.pool.used == 0 and srv.pending() == 0


def test_models_load_unload_and_metrics(world):
    from prometheus_client.parser import text_string_to_metric_families
    m, srv, url, oracle, tok = world
    u = USERS[5][0]
    ids = [u2["id"] for u2 in httpx.get(f"{url}/v1/models").json()["data"]]
    assert "base" in ids and set(x for x, *_ in USERS) <= set(ids)
    r = httpx.post(f"{url}/v1/adapters/{u}", timeout=60)
    assert r.status_code == 200 and u in srv.engine.users
    r = httpx.delete(f"{url}/v1/adapters/{u}")
    assert r.status_code == 200 and u not in srv.engine.users
    assert httpx.delete(f"{url}/v1/adapters/{u}").status_code == 404
    assert httpx.post(f"{url}/v1/adapters/nobody").status_code == 404
    r = httpx.post(f"{url}/v1/completions", json={"model": u, "prompt": [5, 6], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["tokens"] == oracle.tokens(u, [5, 6], 2)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    for name in ("peftu_waiting", "peftu_active", "peftu_tokens", "peftu_tokens_per_second", "peftu_last_step_seconds",
                 "peftu_adapter_loads", "peftu_adapter_host_evictions", "peftu_adapter_hit_rate", "peftu_kv_bytes"):
        assert name in fams, name
    assert fams["peftu_tokens"].samples[0].value > 0 and fams["peftu_adapter_loads"].samples[0].value >= 1


def test_shutdown_finishes_what_is_in_flight(tmp_path):
    m = model()
    write_users(m, tmp_path)
    eng = Engine(m, backend="reference")
    srv = ServingEngine(m, eng, AdapterStore(eng, tmp_path), max_rows=2, max_input_len=8, max_new_tokens=8)
    got = {}
    with serve_in_thread(build_app(srv, drain_seconds=10)) as url:
        def call():
            got["r"] = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": [5, 6],
                                                                  "max_tokens": 8}, timeout=30)
        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.05)
    t.join(30)
    assert srv.pending() == 0 and srv.pool.used == 0
    assert got["r"].status_code in (200, 503)


def test_limits_answer_400_json_naming_them_and_the_others_are_still_answered(world):
    m, srv, url, oracle, tok = world
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/score", json={"model": "lora-0", "prompt": [5, 6], "labels": [[5, 1]] * (srv.max_labels + 1)})
        assert r.status_code == 400 and "max_labels" in r.json()["error"]["message"], r.text
        long = [[5] * 60] * (srv.max_label_tokens // 60 + 1)
        r = c.post("/v1/score", json={"model": "lora-0", "prompt": [5, 6], "labels": long})
        assert r.status_code == 400 and "max_label_tokens" in r.json()["error"]["message"], r.text
        r = c.post("/v1/completions", json={"model": "lora-1", "prompt": [5, 9, 11], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["tokens"] == oracle.tokens("lora-1", [5, 9, 11], 4)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop dies on purpose
def test_a_deadline_answers_504_json_and_a_dead_loop_503_at_once(world, tmp_path):
    m, srv, url, oracle, tok = world
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": "lora-0", "prompt": [5, 9, 11], "max_tokens": 4, "timeout": 1e-6})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text
        r = c.post("/v1/completions", json={"model": "lora-0", "prompt": [5, 9, 11], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["tokens"] == oracle.tokens("lora-0", [5, 9, 11], 4)
    eng = Engine(m, backend="reference")
    dying = ServingEngine(m, eng, max_rows=2, max_input_len=24, max_new_tokens=4)

    def step():
        raise SystemExit("the loop's thread died")

    dying.step = step
    with serve_in_thread(build_app(dying, tok, drain_seconds=0)) as url2, httpx.Client(base_url=url2, timeout=10) as c:
        for _ in range(200):
            if dying.loop["state"] == "stopped":
                break
            time.sleep(0.01)
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "stopped", h.text
        r = c.post("/v1/completions", json={"model": "base", "prompt": [5, 6], "max_tokens": 2})
        assert r.status_code == 503 and "step loop stopped" in r.json()["error"]["message"], r.text
