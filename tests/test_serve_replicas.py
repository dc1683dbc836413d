"""Ray Serve replicas (slow: starts Ray with 2 replicas on this machine): answers over HTTP equal each request
alone (as the single-process server gives them), and a user's requests land on the replica holding that user."""
import asyncio
import socket

import pytest

ray = pytest.importorskip("ray", reason="needs ray[serve] (pip install -e '.[replicas]')")
pytestmark = pytest.mark.slow


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    argv = ["--model", str(root / "model"), "--adapters", str(root / "users"), "--max-rows", "4",
            "--max-input-len", "24", "--max-new-tokens", "8"]
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
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
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
                   timeout=60)
    assert r.json()["scores"] == pytest.approx(oracle.scores(users[0], [5, 6], [[5, 1], [7, 1]]).tolist(),
                                               rel=1e-5, abs=1e-5)
    assert httpx.post(f"{url}/v1/completions", json={"model": "nobody", "prompt": [5]}, timeout=60).status_code == 404
