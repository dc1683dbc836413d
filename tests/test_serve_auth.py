"""API keys and tenants, as a hostile client tries them: no key, a wrong, truncated, empty or other tenant's key
on every route; a user outside the key's scope (403, the same answer whether or not it exists); managing with a
call-only key; the key file's every failure stops the server at start with a message naming the problem and
never a key; the comparison is constant time (every entry compared, no early exit)."""
import hashlib
import json
import subprocess
import sys

import httpx
import pytest

from peftu_kernels.serve import AdapterStore, ServingEngine, auth
from peftu_kernels.serve.auth import KeyFileError, Keys
from peftu_kernels.serve.http import build_app, serve_in_thread
from peftu_kernels.tenancy import Engine
from serve_world import USERS, Oracle, model, write_users

openai = pytest.importorskip("openai", reason="needs the openai SDK (the test extra)")

KA, KB, KOPS = "tenant-a-key-0123456789", "tenant-b-key-abcdefghij", "operator-key-ZYXWVUTSRQ"
A_USERS = [u for u, k, *_ in USERS if k == "lora"]              # tenant A: its lora users, by exact id
B_USERS = [u for u, k, *_ in USERS if k.startswith("prefix")]   # tenant B: a pattern


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    m = model()
    root = tmp_path_factory.mktemp("users")
    mods = write_users(m, root)
    keyfile = tmp_path_factory.mktemp("keys") / "keys.json"
    keyfile.write_text(json.dumps({"open": ["/health"], "keys": [
        {"name": "a", "key": KA, "users": A_USERS},
        {"name": "b", "sha256": hashlib.sha256(KB.encode()).hexdigest(), "users": ["prefix*"], "manage": True},
        {"name": "ops", "key": KOPS, "users": [], "metrics": True}]}))
    eng = Engine(m, backend="reference", capacity=4)
    srv = ServingEngine(m, eng, AdapterStore(eng, root, host_capacity=8), max_rows=4, max_input_len=24,
                        max_new_tokens=8, max_virtual=8)
    with serve_in_thread(build_app(srv, keys=Keys.from_file(keyfile))) as url:
        yield url, Oracle(m, mods), keyfile


def call(url, method, path, key=None, raw_header=None, **kw):
    headers = {"Authorization": raw_header} if raw_header is not None else \
        ({"Authorization": f"Bearer {key}"} if key is not None else {})
    return httpx.request(method, url + path, headers=headers, timeout=60, **kw)


ROUTES = [("POST", "/v1/completions", {"json": {"model": "base", "prompt": [5, 6], "max_tokens": 2}}),
          ("POST", "/v1/score", {"json": {"model": "base", "prompt": [5], "labels": [[5, 1]]}}),
          ("GET", "/v1/models", {}), ("POST", f"/v1/adapters/{B_USERS[0]}", {}),
          ("DELETE", f"/v1/adapters/{B_USERS[0]}", {}), ("GET", "/metrics", {}), ("GET", "/no/such/route", {}),
          ("GET", "/docs", {}), ("GET", "/openapi.json", {})]
BAD = [None, "", "Bearer", "bearer  x", f"Bearer {KA[:-1]}", f"Bearer {KA}x", f"Bearer {KA.upper()}", f"Basic {KA}",
       f"Bearer {hashlib.sha256(KB.encode()).hexdigest()}", "Bearer " + "k" * 10_000]


@pytest.mark.parametrize("method,path,kw", ROUTES)
@pytest.mark.parametrize("header", BAD)
def test_no_or_a_wrong_key_is_401_on_every_route(world, method, path, kw, header):
    url, *_ = world
    r = call(url, method, path, raw_header=header, **kw) if header is not None else call(url, method, path, **kw)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert KA not in r.text and KB not in r.text  # never echoed


def test_health_is_open_and_every_valid_key_works(world):
    url, *_ = world
    assert call(url, "GET", "/health").status_code == 200
    for k in (KA, KB, KOPS):
        assert call(url, "POST", "/v1/completions", k, json={"model": "base", "prompt": [5], "max_tokens": 2}) \
            .status_code == 200


def test_each_key_reaches_only_its_tenants_users(world):
    url, oracle, _ = world
    ids = [5, 9, 11]
    for key, mine in ((KA, A_USERS), (KB, B_USERS)):
        for u, *_ in USERS:
            r = call(url, "POST", "/v1/completions", key, json={"model": u, "prompt": ids, "max_tokens": 4})
            if u in mine:
                assert r.status_code == 200 and r.json()["choices"][0]["tokens"] == oracle.tokens(u, ids, 4)[:4]
            else:
                assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", (u, r.text)
            s = call(url, "POST", "/v1/score", key, json={"model": u, "prompt": ids, "labels": [[5, 1]]})
            assert s.status_code == (200 if u in mine else 403)
        listed = {d["id"] for d in call(url, "GET", "/v1/models", key).json()["data"]}
        assert listed == {"base", *mine}


def test_a_403_says_nothing_of_whether_the_user_exists(world):
    url, *_ = world
    other, nobody = B_USERS[0], "no-such-user"
    a = call(url, "POST", "/v1/completions", KA, json={"model": other, "prompt": [5]})
    b = call(url, "POST", "/v1/completions", KA, json={"model": nobody, "prompt": [5]})
    assert a.status_code == b.status_code == 403
    assert a.json()["error"]["message"].replace(other, "X") == b.json()["error"]["message"].replace(nobody, "X")
    c = call(url, "POST", f"/v1/adapters/{nobody}", KA)
    d = call(url, "POST", f"/v1/adapters/{other}", KA)
    assert c.status_code == d.status_code == 403 and c.json()["error"]["message"] == d.json()["error"]["message"]
    # in scope but absent: 404, as without keys
    assert call(url, "POST", "/v1/completions", KB, json={"model": "prefix-nobody", "prompt": [5]}).status_code == 404


def test_managing_needs_the_right_and_the_scope(world):
    url, *_ = world
    u = B_USERS[0]
    assert call(url, "POST", f"/v1/adapters/{A_USERS[0]}", KA).status_code == 403  # call-only key
    assert call(url, "DELETE", f"/v1/adapters/{A_USERS[0]}", KA).status_code == 403
    assert call(url, "POST", f"/v1/adapters/{A_USERS[0]}", KB).status_code == 403  # manage, but not A's users
    r = call(url, "POST", f"/v1/adapters/{u}", KB)
    assert r.status_code == 200 and r.json()["loaded"] is True
    assert call(url, "DELETE", f"/v1/adapters/{u}", KB).status_code == 200
    assert call(url, "POST", f"/v1/adapters/{u}", KOPS).status_code == 403  # metrics only


def test_metrics_need_a_key_with_the_metrics_right(world):
    url, *_ = world
    assert call(url, "GET", "/metrics", KA).status_code == 403
    r = call(url, "GET", "/metrics", KOPS)
    assert r.status_code == 200 and "peftu_tokens_total" in r.text


def test_the_openai_sdk_with_keys(world):
    url, oracle, _ = world
    ok = openai.OpenAI(base_url=url + "/v1", api_key=KA, max_retries=0)
    r = ok.completions.create(model=A_USERS[0], prompt=[5, 9, 11], max_tokens=4)
    assert r.choices[0].model_extra["tokens"] == oracle.tokens(A_USERS[0], [5, 9, 11], 4)[:4]
    with pytest.raises(openai.PermissionDeniedError):
        ok.completions.create(model=B_USERS[0], prompt=[5], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key=KA[:-2], max_retries=0).completions.create(
            model=A_USERS[0], prompt=[5], max_tokens=2)


def test_keys_are_compared_in_constant_time_against_every_entry(monkeypatch):
    keys = Keys([(auth._digest(k), auth.Tenant(n, ("*",))) for n, k in (("a", KA), ("b", KB), ("c", KOPS))])
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda x, y: calls.append(1) or real(x, y))
    for presented in (KA, KOPS, "wrong-key-0123456789"):
        calls.clear()
        who = keys.who(presented)
        assert len(calls) == 3  # no early exit on a match
        assert (who.name if who else None) == {KA: "a", KOPS: "c"}.get(presented)
    assert KA not in repr(keys) and auth._digest(KA).hex() not in repr(keys)


@pytest.mark.parametrize("content,msg", [
    (None, "cannot be read"), ("{not json", "not JSON"), ("[]", "expected an object"),
    ('{"keys": []}', "non-empty list"), ('{"keys": [{"name": "a", "key": "short"}]}', "at least 16"),
    ('{"keys": [{"name": "a"}]}', "exactly one of"), ('{"keys": [{"name": "a", "key": "%s", "sha256": "%s"}]}'
                                                      % (KA, "0" * 64), "exactly one of"),
    ('{"keys": [{"name": "a", "sha256": "xyz"}]}', "64 hex"),
    ('{"keys": [{"name": "a", "key": "%s"}, {"name": "b", "key": "%s"}]}' % (KA, KA), "same key"),
    ('{"keys": [{"name": "a", "key": "%s"}, {"name": "a", "key": "%s"}]}' % (KA, KB), "unique"),
    ('{"keys": [{"name": "a", "key": "%s", "users": "alice"}]}' % KA, "users"),
    ('{"keys": [{"name": "a", "key": "%s", "manage": "yes"}]}' % KA, "manage"),
    ('{"keys": [{"name": "a", "key": "%s", "role": "admin"}]}' % KA, "unknown fields"),
    ('{"keys": [{"name": "a", "key": "%s"}], "open": ["/v1/completions"]}' % KA, "open"),
    ('{"keys": [{"name": "a", "key": "%s"}], "extra": 1}' % KA, "expected an object"),
    (b"\xff\xfe{", "cannot be read"),
])
def test_a_bad_key_file_is_refused_naming_the_problem_never_a_key(tmp_path, content, msg):
    f = tmp_path / "keys.json"
    if content is not None:
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(KeyFileError, match=msg) as e:
        Keys.from_file(f)
    assert str(f) in str(e.value) and KA not in str(e.value) and KB not in str(e.value)


def test_the_server_stops_at_start_on_a_bad_key_file_and_says_when_it_runs_open(tmp_path):
    f = tmp_path / "keys.json"
    f.write_text('{"keys": [{"name": "a", "key": "%s"}]' % KA)  # truncated JSON
    run = subprocess.run([sys.executable, "-m", "peftu_kernels.serve", "--shape", "flan-t5-small", "--api-keys",
                          str(f), "--port", "1"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "not JSON" in run.stderr and str(f) in run.stderr and KA not in run.stderr
    from peftu_kernels.serve.__main__ import keys_of, parse
    a = parse(["--shape", "flan-t5-small", "--api-key", "short"])
    with pytest.raises(SystemExit, match="at least 16"):
        keys_of(a)


def test_open_mode_is_said_at_start(capsys, monkeypatch):
    from peftu_kernels.serve.__main__ import keys_of, parse
    monkeypatch.delenv("PEFTU_API_KEY", raising=False)
    assert keys_of(parse(["--shape", "flan-t5-small"])) is None
    assert "no API key" in capsys.readouterr().err
    monkeypatch.setenv("PEFTU_API_KEY", KA)
    k = keys_of(parse(["--shape", "flan-t5-small"]))
    assert k.who(KA).manage and k.who(KA).metrics and k.who(KB) is None
