"""Adapter folders as a hostile tenant would leave them: read as one snapshot (a folder exchanged or rewritten while
it is read is never registered as a mix of versions), no symlink followed out of the adapters folder, one id per
folder; through the real server every error is JSON without server paths, concurrent unloads never 500, loads
answer with the truth. After each, another tenant is answered exactly."""
import ctypes
import os
import sys
import threading

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftu_kernels.serve import AdapterStore, ServingEngine
from peftu_kernels.serve.http import build_app, serve_in_thread
from peftu_kernels.tenancy import Engine, save_user
from peftu_kernels.tenancy.hf_peft import export_peft
from peftu_kernels.tenancy.sources import read_snapshot
from serve_world import Oracle, model
from tenancy_users import make

CI = settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=6,
              derandomize=bool(os.environ.get("CI")))


def _exchange():
    """renameat2(RENAME_EXCHANGE): two directory names swapped in one step (Linux), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None

    def swap(a, b):
        if fn(-100, os.fsencode(str(a)), -100, os.fsencode(str(b)), 2) != 0:
            raise OSError(ctypes.get_errno(), "renameat2")
    return swap


@pytest.fixture(scope="module")
def m():
    return model()


def same(a, b) -> bool:
    return all(x.method == y.method and x.tensors.keys() == y.tensors.keys() and
               all(torch.equal(x.tensors[k], y.tensors[k]) for k in x.tensors) for x, y in zip(a, b))


@given(fmt=st.sampled_from(["peft", "peftu"]), seed=st.integers(0, 1000))
@settings(CI, max_examples=3)
def test_a_folder_exchanged_while_it_is_read_is_one_version(m, tmp_path_factory, fmt, seed):
    swap = _exchange()
    if swap is None:
        pytest.skip("renameat2 (atomic directory exchange) is not available on this system")
    root = tmp_path_factory.mktemp("adapters")
    versions = [make(m.cfg, "lora", seed), make(m.cfg, "lora", seed + 1)]
    for name, mods in zip(("u", "other"), versions):
        if fmt == "peft":
            export_peft(mods[0], root / name, m)
        else:
            save_user(root / name, mods)
    stop, swaps = threading.Event(), [0]

    def swapper():
        while not stop.is_set():
            swap(root / "u", root / "other")
            swaps[0] += 1

    t = threading.Thread(target=swapper)
    t.start()
    try:
        got = [read_snapshot(root, "u", m) for _ in range(150)]
    finally:
        stop.set()
        t.join()
    assert swaps[0] > 150
    for g in got:
        assert same(g, versions[0]) or same(g, versions[1]), "a mix of two versions was read"


def test_a_file_rewritten_while_read_is_read_again_or_refused(m, tmp_path, monkeypatch):
    save_user(tmp_path / "u", make(m.cfg, "lora", 1))
    real, calls = os.read, [0]

    def racing_read(fd, n):  # the first read of the first file: another writer replaces a file meanwhile
        calls[0] += 1
        if calls[0] == 1:
            save_user(tmp_path / "u", make(m.cfg, "lora", 2))
        return real(fd, n)

    monkeypatch.setattr(os, "read", racing_read)
    got = read_snapshot(tmp_path, "u", m)
    assert same(got, make(m.cfg, "lora", 2))  # read again: the new version whole


def test_symlinks_are_never_followed(m, tmp_path):
    outside = tmp_path / "outside"
    save_user(outside, make(m.cfg, "lora", 3))
    root = tmp_path / "adapters"
    (root / "u").mkdir(parents=True)
    for f in outside.iterdir():
        (root / "u" / f.name).symlink_to(f)
    (root / "linked").symlink_to(outside)
    with pytest.raises(ValueError, match="symlink"):
        read_snapshot(root, "u", m)
    with pytest.raises(ValueError, match="not a plain folder"):
        read_snapshot(root, "linked", m)
    store = AdapterStore(Engine(m, backend="reference"), root)
    assert store.path("linked") is None and "linked" not in store.on_disk()


def test_one_id_per_folder(m, tmp_path):
    save_user(tmp_path / "%5aed", make(m.cfg, "lora", 1))  # the encoding of the id "Zed"
    save_user(tmp_path / "Plain", make(m.cfg, "lora", 2))
    store = AdapterStore(Engine(m, backend="reference"), tmp_path)
    assert store.path("Zed") == tmp_path / "%5aed" and store.path("%5aed") is None
    assert store.path("Plain") == tmp_path / "Plain" and store.path("x" * 300) is None
    assert store.on_disk() == ["Plain", "Zed"]


@pytest.fixture(scope="module")
def server(m, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    mods = {"good": make(m.cfg, "lora", 4), "flaky": make(m.cfg, "ia3", 5)}
    for u, ms in mods.items():
        save_user(root / u, ms, u)
    eng = Engine(m, backend="reference", capacity=4)
    srv = ServingEngine(m, eng, AdapterStore(eng, root, host_capacity=8), max_rows=3, max_input_len=24,
                        max_new_tokens=6, max_virtual=8)
    with serve_in_thread(build_app(srv, load_seconds=20)) as url:
        yield root, srv, url, Oracle(m, mods)


def probe(c, oracle):
    r = c.post("/v1/completions", json={"model": "good", "prompt": [5, 9, 11], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["tokens"] == oracle.tokens("good", [5, 9, 11], 4), r.text


@pytest.mark.parametrize("call", ["unknown route", "wrong method", "deep body", "long id", "bad json"])
def test_every_error_is_json_without_server_paths(server, call):
    root, srv, url, oracle = server
    with httpx.Client(base_url=url, timeout=30) as c:
        r = {"unknown route": lambda: c.get("/v2/nothing"),
             "wrong method": lambda: c.put("/v1/completions"),
             "deep body": lambda: c.post("/v1/completions", content=b"[" * 100_000 + b"]" * 100_000,
                                         headers={"content-type": "application/json"}),
             "long id": lambda: c.post("/v1/completions", json={"model": "x" * 400, "prompt": [5], "max_tokens": 1}),
             "bad json": lambda: c.post("/v1/score", content=b"{nope", headers={"content-type": "application/json"}),
             }[call]()
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        body = r.json()
        assert set(body) == {"error"} and {"message", "type"} <= set(body["error"]), body
        assert str(root) not in r.text and "/tmp" not in r.text
        probe(c, oracle)


def test_a_broken_folder_loads_as_the_truth_without_paths(server, m):
    root, srv, url, oracle = server
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/adapters/good")
        assert r.status_code == 200 and r.json()["loaded"] is True and r.json()["version"] == srv.engine.version("good")
        for f in (root / "flaky").glob("*.safetensors"):
            f.write_bytes(b"not a safetensors file")
        r = c.post("/v1/adapters/flaky")
        assert r.status_code == 400 and r.json()["loaded"] is False, r.text
        assert str(root) not in r.text and "flaky" in r.json()["error"]["message"]
        probe(c, oracle)


def test_concurrent_unloads_answer_one_200_and_404s_never_500(server):
    root, srv, url, oracle = server
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/adapters/good").status_code == 200
        codes = []

        def go():
            with httpx.Client(base_url=url, timeout=30) as cc:
                codes.append(cc.delete("/v1/adapters/good").status_code)

        ts = [threading.Thread(target=go) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(codes) == [200] + [404] * 5, codes
        probe(c, oracle)  # loaded again on demand, exactly


def test_answers_while_the_folder_is_exchanged_and_reloaded_are_each_one_version(m, tmp_path):
    swap = _exchange()
    if swap is None:
        pytest.skip("renameat2 (atomic directory exchange) is not available on this system")
    versions = [make(m.cfg, "lora", 11), make(m.cfg, "lora", 16)]  # the same rank (2), other tensors and alpha:
    versions[1][0].config["alpha"] = 9                               # a config of one with weights of the other
    for name, mods in zip(("u", "other"), versions):                 # passes every check, and answers otherwise
        export_peft(mods[0], tmp_path / name, m)
    ids, labels = [5, 9, 11, 4, 7], [[5, 1], [9, 4, 1], [17, 1]]
    want = []
    for mods in versions:
        o = Oracle(m, {"u": mods})
        want.append(o.scores("u", ids, labels))
    assert (want[0] - want[1]).abs().max() > 1e-3  # the two versions answer differently: a mix is visible
    eng = Engine(m, backend="reference", capacity=2)
    srv = ServingEngine(m, eng, AdapterStore(eng, tmp_path, host_capacity=4), max_rows=2, max_input_len=24,
                        max_new_tokens=4, max_virtual=8)
    stop = threading.Event()

    def swapper():
        while not stop.is_set():
            swap(tmp_path / "u", tmp_path / "other")

    t = threading.Thread(target=swapper)
    old_interval = sys.getswitchinterval()
    with serve_in_thread(build_app(srv, load_seconds=20)) as url, httpx.Client(base_url=url, timeout=30) as c:
        sys.setswitchinterval(1e-6)  # threads interleave between any two file reads, as processes would
        t.start()
        try:
            answers = []
            for _ in range(12):
                r = c.post("/v1/adapters/u")
                assert r.status_code in (200, 400), r.text  # 400: refused (kept changing), never a mix
                s = c.post("/v1/score", json={"model": "u", "prompt": ids, "labels": labels})
                assert s.status_code == 200, s.text
                answers.append(torch.tensor(s.json()["scores"]))
        finally:
            stop.set()
            t.join()
            sys.setswitchinterval(old_interval)
    for a in answers:
        assert any(torch.allclose(a, w.float(), rtol=1e-5, atol=1e-5) for w in want), (a, want)
