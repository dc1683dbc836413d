"""Decoding options through the real server and the official `openai` SDK: each honoured (against the library
on one row, the model's own log-softmax, a chi-square test) or refused with a 400 naming the field; greedy
requests unchanged to the token; seeded requests identical alone and in mixed batches; score probabilities."""
import json
import threading

import httpx
import numpy as np
import pytest
import torch

from peftu_kernels import Sampling, sample
from peftu_kernels.sampling import row_generator
from peftu_kernels.serve import AdapterStore, ServingEngine
from peftu_kernels.serve.http import build_app, serve_in_thread
from peftu_kernels.tenancy import Engine
from serve_world import USERS, Oracle, model, text_server, write_users

openai = pytest.importorskip("openai", reason="needs the openai SDK (the test extra)")
scipy_stats = pytest.importorskip("scipy.stats", reason="needs scipy (the test extra) for the chi-square test")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    m, srv, mods, tok = text_server(tmp_path_factory.mktemp("users"), 6, 12, max_rows=8, max_queue=256, max_n=4)
    with serve_in_thread(build_app(srv, tok)) as url:
        yield m, srv, url, Oracle(m, mods), tok, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def lib(oracle, user, ids, s: Sampling, n_tokens, choice=0):
    """The library's answer for one row alone, with the server's random stream for that choice."""
    peft = oracle.eng.batch([user]) if user else None
    return sample(oracle.m, torch.tensor([ids]), None, [s], n_tokens, peft,
                  generators=[row_generator(s.seed, choice)] if not s.greedy else None)


def extra(obj, name):
    return obj.model_extra[name]


def test_greedy_through_the_sdk_is_unchanged_to_the_token(world):
    m, srv, url, oracle, tok, client = world
    for i, (u, *_) in enumerate(USERS[:6]):
        ids = [5 + (i * 7 + j) % 80 for j in range(4 + i)]
        r = client.completions.create(model=u, prompt=ids, max_tokens=8)
        c = r.choices[0]
        assert extra(c, "tokens") == oracle.tokens(u, ids, 8)
        assert c.text == tok.decode(extra(c, "tokens"), skip_special_tokens=True) and c.logprobs is None


def test_seeded_requests_are_identical_alone_and_in_mixed_batches(world):
    m, srv, url, oracle, tok, client = world
    u, ids = USERS[4][0], [9, 12, 15, 20, 3]
    ask = dict(model=u, prompt=ids, max_tokens=8, temperature=0.9, top_p=0.9, seed=1234, extra_body={"top_k": 20})
    alone = extra(client.completions.create(**ask).choices[0], "tokens")
    assert alone == lib(oracle, u, ids, Sampling(0.9, 0.9, 20, seed=1234), 8).tokens[0]
    for crowd in (1, 5, 11):  # other users' requests, greedy and sampling, in flight at once
        got, threads = {}, []

        def call(key, **kw):
            got[key] = client.completions.create(**kw)
        for k in range(crowd):
            v, _, _, _ = USERS[(k * 3) % len(USERS)]
            kw = dict(model=v, prompt=[5 + k, 6, 7 + k], max_tokens=1 + k % 8)
            if k % 2:
                kw.update(temperature=1.0, seed=k)
            threads.append(threading.Thread(target=call, args=(k,), kwargs=kw))
        threads.insert(crowd // 2, threading.Thread(target=call, args=("mine",), kwargs=ask))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert extra(got["mine"].choices[0], "tokens") == alone


def test_n_choices_from_one_request_each_its_own_stream(world):
    m, srv, url, oracle, tok, client = world
    u, ids = USERS[0][0], [7, 8, 9, 10]
    s = Sampling(1.2, seed=77)
    r = client.completions.create(model=u, prompt=ids, max_tokens=6, temperature=1.2, seed=77, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    got = [extra(c, "tokens") for c in r.choices]
    assert got == [lib(oracle, u, ids, s, 6, k).tokens[0] for k in range(3)]
    assert len({tuple(g) for g in got}) > 1  # three streams, not one repeated
    assert r.usage.completion_tokens == sum(map(len, got))
    g = client.completions.create(model=u, prompt=ids, max_tokens=6, n=2)  # greedy choices are all the same
    assert [extra(c, "tokens") for c in g.choices] == [oracle.tokens(u, ids, 6)] * 2


def test_stop_token_ids_and_strings(world):
    m, srv, url, oracle, tok, client = world
    u, ids = USERS[2][0], [11, 12, 13, 14]
    full = oracle.tokens(u, ids, 8)
    seq = full[2:4]
    cut = next(i for i in range(len(full)) if full[i:i + 2] == seq)
    c = client.completions.create(model=u, prompt=ids, max_tokens=8, stop=[seq]).choices[0]
    assert extra(c, "tokens") == full[:cut] and c.finish_reason == "stop" and extra(c, "stop_reason") == seq
    c = client.completions.create(model=u, prompt=ids, max_tokens=8, stop=[full[1]]).choices[0]
    assert extra(c, "tokens") == full[:full.index(full[1])] and c.finish_reason == "stop"
    # a stop string: find a (user, prompt) whose greedy text has one, then ask for it
    for v, *_ in USERS:
        for p in ([5, 6, 7], [20, 21, 22, 23], [30, 9, 2]):
            toks = oracle.tokens(v, p, 8)
            text = tok.decode(toks, skip_special_tokens=True)
            if len(text) >= 4:
                break
        else:
            continue
        break
    else:
        pytest.fail("no greedy answer with text to stop in")
    stop = text[1:3]
    need = next(k for k in range(1, len(toks) + 1) if stop in tok.decode(toks[:k], skip_special_tokens=True))
    c = client.completions.create(model=v, prompt=p, max_tokens=8, stop=stop).choices[0]
    assert c.text == text[:text.index(stop)] and c.finish_reason == "stop" and extra(c, "tokens") == toks[:need]
    # streamed: the same text, the stop string never sent
    chunks = list(client.completions.create(model=v, prompt=p, max_tokens=8, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "stop"


def test_logprobs_are_the_models_own_log_softmax(world):
    m, srv, url, oracle, tok, client = world
    u, ids = USERS[6][0], [4, 8, 15, 16, 23]
    r = client.completions.create(model=u, prompt=ids, max_tokens=6, temperature=0.7, seed=5, logprobs=3)
    c = r.choices[0]
    toks = extra(c, "tokens")
    peft = oracle.eng.batch([u])
    with torch.no_grad():
        dec = torch.tensor([[m.cfg.decoder_start_token_id] + toks[:-1]])
        logp = torch.log_softmax(m.decode(dec, *m.encode(torch.tensor([ids]), None, peft), peft)[0].double(), -1)
    assert c.logprobs.token_logprobs == pytest.approx([logp[j, t].item() for j, t in enumerate(toks)], abs=2e-4)
    tops = c.logprobs.model_extra["top_token_ids"]
    for j, top in enumerate(tops):
        assert [t for t, _ in top] == logp[j].topk(3).indices.tolist()
        assert [v for _, v in top] == pytest.approx(logp[j].topk(3).values.tolist(), abs=2e-4)
    assert len(c.logprobs.tokens) == len(toks) == len(c.logprobs.top_logprobs) == len(c.logprobs.text_offset)


def test_sampled_tokens_through_the_server_follow_the_distribution(world):
    m, srv, url, oracle, tok, client = world
    u, ids = USERS[1][0], [3, 9, 27]
    T, k, N = 0.5, 4, 40
    got = []
    for i in range(N):  # 40 requests x n=4: 160 first tokens
        r = client.completions.create(model=u, prompt=ids, max_tokens=1, temperature=T, n=4,
                                      extra_body={"top_k": k})
        got += [extra(c, "tokens")[0] for c in r.choices]
    peft = oracle.eng.batch([u])
    with torch.no_grad():
        logits = m.decode(torch.tensor([[0]]), *m.encode(torch.tensor([ids]), None, peft), peft)[0, -1].double()
    top = logits.topk(k).indices.tolist()
    assert set(got) <= set(top)
    q = torch.softmax(logits[top] / T, -1).numpy()
    obs = np.array([got.count(t) for t in top])
    big = q * len(got) >= 5
    f_obs = list(obs[big]) + ([obs[~big].sum()] if (~big).any() else [])
    f_exp = list(q[big] * len(got)) + ([q[~big].sum() * len(got)] if (~big).any() else [])
    assert scipy_stats.chisquare(f_obs, f_exp).pvalue > 1e-4


@pytest.mark.parametrize("body,field", [
    ({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"),
    ({"logit_bias": {"5": 10}}, "logit_bias"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1}, "frequency_penalty"), ({"user": "alice"}, "user"), ({"colour": "red"}, "colour"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"n": 5}, "n"), ({"n": 0}, "n"),
    ({"logprobs": 21}, "logprobs"), ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 500}, "top_k"), ({"seed": -1}, "seed"), ({"stop": [""]}, "stop[0]"),
    ({"stop": ["a"] * 9}, "stop"), ({"stop": [[]]}, "stop[0]"), ({"stop": [5, "a"]}, "stop"),
    ({"stop": [[5, 10 ** 6]]}, "stop sequence 0"), ({"temperature": "hot"}, "temperature"),
    ({"logprobs": True}, "logprobs"), ({"n": 2.0}, "n"), ({"seed": "7"}, "seed"), ({"prompt": [True, 5]}, "prompt"),
    ({"max_tokens": True}, "max_tokens"), ({"stop": [True]}, "stop"),
])
def test_options_not_honoured_are_refused_by_name(world, body, field):
    m, srv, url, oracle, tok, client = world
    r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": [5, 6], **body})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError, match=field.replace("[", r"\[").replace("]", r"\]")):
        client.completions.create(model="base", prompt=[5, 6], extra_body=body)


def test_best_of_equal_to_n_and_echo_false_are_honoured(world):
    m, srv, url, oracle, tok, client = world
    r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": [5, 6], "n": 2, "best_of": 2,
                                                  "echo": False, "max_tokens": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_streaming_n_choices_with_logprobs_equals_the_whole_answer(world):
    m, srv, url, oracle, tok, client = world
    u, ids = USERS[8][0], [6, 6, 7]
    ask = dict(model=u, prompt=ids, max_tokens=7, temperature=1.0, seed=9, n=3, logprobs=2)
    whole = client.completions.create(**ask)
    parts = {}
    for ch in client.completions.create(stream=True, **ask):
        for c in ch.choices:
            p = parts.setdefault(c.index, {"tokens": [], "lp": [], "text": "", "finish": None})
            p["tokens"] += c.model_extra.get("tokens") or []
            p["text"] += c.text
            p["lp"] += (c.logprobs.token_logprobs if c.logprobs else [])
            p["finish"] = c.finish_reason or p["finish"]
    for c in whole.choices:
        p = parts[c.index]
        assert p["tokens"] == extra(c, "tokens") and p["text"] == c.text and p["finish"] == c.finish_reason
        assert p["lp"] == c.logprobs.token_logprobs


def test_score_gives_log_likelihoods_and_probabilities_over_the_labels(world):
    m, srv, url, oracle, tok, client = world
    u, ids, labels = USERS[3][0], [5, 9, 2], [[5, 1], [9, 4, 1], [7, 1]]
    r = httpx.post(f"{url}/v1/score", json={"model": u, "prompt": ids, "labels": labels}).json()
    want = oracle.scores(u, ids, labels).double()
    assert r["scores"] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)
    assert r["probabilities"] == pytest.approx(torch.softmax(want, 0).tolist(), abs=1e-6)
    assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-9) and r["best"] == int(want.argmax())


def test_sse_chunks_are_json_with_a_done_marker(world):
    m, srv, url, oracle, tok, client = world
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "base", "prompt": [5, 6], "max_tokens": 3,
                                                               "stream": True, "n": 2}) as r:
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    ends = [c for x in lines[:-1] for c in json.loads(x)["choices"] if c["finish_reason"]]
    assert sorted(c["index"] for c in ends) == [0, 1]


# --- the engine itself, as a hostile client would use these options ---------------------------------------------
@pytest.fixture(scope="module")
def engine_world(tmp_path_factory):
    m = model()
    root = tmp_path_factory.mktemp("engine-users")
    write_users(m, root)
    return m, root


def _engine(m, root, rows=4, **kw):
    eng = Engine(m, backend="reference", capacity=4)
    return ServingEngine(m, eng, AdapterStore(eng, root, host_capacity=8), max_rows=rows, max_input_len=24,
                         max_new_tokens=8, max_virtual=8, **kw)


def test_a_request_for_many_rows_is_not_starved_by_a_flood_of_single_rows(engine_world):
    import time

    from peftu_kernels.serve import Request
    m, root = engine_world
    srv = _engine(m, root, rows=4, max_n=4)
    users = [u for u, *_ in USERS[:4]]
    for u in users:  # loaded first: the bound below counts decode steps, not disk reads
        srv.submit(Request(u, [5], 1))
    srv.run_until_idle()
    t_end, steps, big = time.perf_counter() + 120, 0, None
    while (big is None or not big.done.is_set()) and time.perf_counter() < t_end:
        for k, u in enumerate(users[1:]):  # every step, more one-row requests from the other users, of
            if srv.pending() < 40:         # staggered lengths: rows free one at a time, never all at once
                srv.submit(Request(u, [8, 9], 1 + (steps * 3 + k * 5) % 8))
        srv.step()
        if big is None and srv.pool.used == srv.pool.rows:  # the flood holds every row: now ask for all four
            big, steps = srv.submit(Request(users[0], [5, 6, 7], 8, n=4, sampling=Sampling(1.0, seed=1))), 0
        steps += big is not None
    assert big.done.is_set() and big.error is None and len(big.choices) == 4, (steps, big.finish_reason)
    # bound: the rows drain (each holder ends within max_new_tokens steps), then it is admitted; plus its own 8
    assert steps <= 8 + 8 + 4, steps
    srv.close()
    srv.run_until_idle()
    assert srv.pool.used == 0


def test_cancelling_or_timing_out_a_request_with_n_rows_frees_every_row(engine_world):
    import time

    from peftu_kernels.serve import Request
    m, root = engine_world
    srv = _engine(m, root, rows=6, max_n=3)
    for u in (USERS[0][0], USERS[1][0], USERS[2][0]):
        srv.submit(Request(u, [5], 1))
    srv.run_until_idle()
    a = srv.submit(Request(USERS[0][0], [5, 6], 8, n=3, sampling=Sampling(0.8, seed=2)))
    b = srv.submit(Request(USERS[1][0], [5, 6], 8, n=3, timeout=1.0))
    srv.step()
    assert srv.pool.used == 6
    srv.cancel(a.id)
    time.sleep(max(0.0, b.times["deadline"] - time.perf_counter()) + 0.01)
    srv.step()
    assert a.finish_reason == "cancelled" and b.finish_reason == "timeout" and srv.pool.used == 0
    c = srv.submit(Request(USERS[2][0], [5, 6], 3, n=3))  # the rows are usable again
    srv.run_until_idle()
    assert c.finish_reason == "length" and srv.pool.used == 0


def test_a_failing_stream_consumer_or_stop_check_fails_only_its_own_request(engine_world):
    from peftu_kernels.serve import Request
    m, root = engine_world
    srv = _engine(m, root, rows=4)

    def boom(*_):
        raise RuntimeError("consumer broke")
    bad_stream = srv.submit(Request(USERS[0][0], [5, 6], 6, on_token=boom, n=2))
    bad_stop = srv.submit(Request(USERS[1][0], [5, 6], 6, stop_when=boom))
    ok = srv.submit(Request(USERS[2][0], [5, 6], 6, sampling=Sampling(1.0, seed=3)))
    srv.run_until_idle()
    assert bad_stream.finish_reason == "cancelled" and bad_stop.finish_reason == "error"
    assert ok.finish_reason in ("stop", "length") and ok.error is None and srv.pool.used == 0


@pytest.mark.parametrize("kw,msg", [({"n": 5}, "n must be"), ({"n": 0}, "n must be"), ({"n": True}, "n must be"),
                                    ({"sampling": "greedy"}, "sampling must be"),
                                    ({"sampling": Sampling(temperature=3)}, "temperature"),
                                    ({"stop_when": 5}, "stop_when")])
def test_the_engine_refuses_bad_options_by_name(engine_world, kw, msg):
    from peftu_kernels.serve import Request
    m, root = engine_world
    srv = _engine(m, root, rows=4, max_n=8)  # max_n is capped by max_rows (4)
    with pytest.raises(ValueError, match=msg):
        srv.submit(Request(USERS[0][0], [5, 6], 4, **kw))
    assert srv.pending() == 0
