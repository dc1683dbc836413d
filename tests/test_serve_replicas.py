"""Ray Serve replicas (starts Ray with 2 replicas on this machine, about 50 s): answers over HTTP equal each
request alone (as the single-process server gives them), a user's requests land on the replica holding that
user, sampling options and API keys work through the ingress as on the single-process server."""
import asyncio
import json
import socket

import pytest
import torch

ray = pytest.importorskip("ray", reason="needs ray[serve] (the test extra installs it)")
KEY, OTHER = "replica-tenant-key-0123", "replica-other-key-4567"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from ray import serve

    from peftu_kernels import save_pretrained
    from peftu_kernels.serve.replicas import application
    from serve_world import Oracle, model, write_users
    root = tmp_path_factory.mktemp("fleet")
    m = model()
    save_pretrained(m, root / "model")
    mods = write_users(m, root / "users")
    users = sorted(mods)
    (root / "keys.json").write_text(json.dumps({"keys": [{"name": "all", "key": KEY, "users": ["*"]},
                                                         {"name": "one", "key": OTHER, "users": [users[0]]}]}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    argv = ["--model", str(root / "model"), "--adapters", str(root / "users"), "--max-rows", "4",
            "--max-input-len", "24", "--max-new-tokens", "8", "--api-keys", str(root / "keys.json")]
    serve.run(application(argv, replicas=2, users_per_replica=32, cpus_per_replica=0.5), name="peftu",
              route_prefix="/")
    yield f"http://127.0.0.1:{port}", Oracle(m, mods), mods
    serve.shutdown()
    ray.shutdown()


def test_replicas_answer_exactly_and_keep_users_on_one_replica(fleet):
    import httpx
    url, oracle, mods = fleet
    users = sorted(mods)

    async def go(c, u, i):
        ids = [5 + (i * 7 + j) % 80 for j in range(3 + i % 9)]
        r = await c.post("/v1/completions", json={"model": u, "prompt": ids, "max_tokens": 1 + i % 8})
        return u, ids, r

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            for i, u in enumerate(users):  # first request of each user: it gets loaded on one replica
                await go(c, u, i)
            return await asyncio.gather(*(go(c, u, i) for i in range(3) for u in users))
    seen = {}
    for u, ids, r in asyncio.run(burst()):
        assert r.status_code == 200, r.text
        body = r.json()
        toks = body["choices"][0]["tokens"]
        want = oracle.tokens(u, ids, 8)
        assert toks == want[:len(toks)] and (body["choices"][0]["finish_reason"] == "length" or toks == want)
        seen.setdefault(u, set()).add(body["replica"])
    assert all(len(v) == 1 for v in seen.values()), seen  # every user's requests on one replica
    assert len(set().union(*seen.values())) == 2           # and both replicas serve
    r = httpx.post(f"{url}/v1/score", json={"model": users[0], "prompt": [5, 6], "labels": [[5, 1], [7, 1]]},
                   timeout=60, headers=AUTH)
    assert r.json()["scores"] == pytest.approx(oracle.scores(users[0], [5, 6], [[5, 1], [7, 1]]).tolist(),
                                               rel=1e-5, abs=1e-5)
    assert httpx.post(f"{url}/v1/completions", json={"model": "nobody", "prompt": [5]}, timeout=60,
                      headers=AUTH).status_code == 404


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_sampling_and_keys_through_the_ingress(fleet):
    import httpx
    from peftu_kernels import Sampling, sample
    from peftu_kernels.sampling import row_generator
    url, oracle, mods = fleet
    users = sorted(mods)
    u, ids = users[1], [9, 12, 15, 20]
    post = lambda body, key=KEY: httpx.post(f"{url}/v1/completions", json=body, timeout=120,  # noqa: E731
                                            headers={"Authorization": f"Bearer {key}"} if key else {})
    r = post({"model": u, "prompt": ids, "max_tokens": 6, "temperature": 0.9, "seed": 42, "n": 2, "logprobs": 2})
    assert r.status_code == 200, r.text
    for k, c in enumerate(r.json()["choices"]):
        want = sample(oracle.m, torch.tensor([ids]), None, [Sampling(0.9, seed=42, logprobs=2)], 6,
                      oracle.eng.batch([u]), generators=[row_generator(42, k)])
        assert c["tokens"] == want.tokens[0]
        assert c["logprobs"]["token_logprobs"] == pytest.approx(want.logprobs[0], abs=2e-4)
    full = oracle.tokens(u, ids, 8)
    r = post({"model": u, "prompt": ids, "max_tokens": 8, "stop": [full[2:4]]})
    cut = next(i for i in range(len(full)) if full[i:i + 2] == full[2:4])
    assert r.json()["choices"][0]["tokens"] == full[:cut] and r.json()["choices"][0]["finish_reason"] == "stop"
    assert post({"model": u, "prompt": ids, "echo": True}).status_code == 400
    assert "colour" in post({"model": u, "prompt": ids, "colour": 1}).json()["error"]["message"]
    assert post({"model": u, "prompt": ids}, key=None).status_code == 401
    assert post({"model": u, "prompt": ids}, key=KEY[:-1]).status_code == 401
    assert post({"model": u, "prompt": ids}, key=OTHER).status_code == 403  # OTHER may call users[0] only
    assert post({"model": "nobody", "prompt": ids}, key=OTHER).status_code == 403  # not 404: scope first
    assert post({"model": users[0], "prompt": ids, "max_tokens": 2}, key=OTHER).status_code == 200
    listed = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {OTHER}"}, timeout=60).json()
    assert {d["id"] for d in listed["data"]} == {"base", users[0]}
