"""A bounded overload run of the real HTTP server on 127.0.0.1: a burst above the queue and the KV pool, across
more users than the device tier holds, some of them hostile (an adapter past max_virtual, a score request past
max_labels, a deadline too short to meet). Every answered request must equal that request served alone,
overload must come back as 429 / 503 / 504 JSON, nothing may hang, and the server must be back to idle after.

python -m benchmarks.serve_load [--requests 300] [--users 24] [--shape tiny]
Loopback only, a fixed number of requests, a fixed deadline: it stops by itself. Prints a table and writes
JSON lines.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment, table, write_jsonl
from peftu_kernels.config import T5Config
from peftu_kernels.generate import greedy
from peftu_kernels.init import new_module
from peftu_kernels.serve import AdapterStore, ServingEngine
from peftu_kernels.serve.http import build_app, serve_in_thread
from peftu_kernels.t5 import T5
from peftu_kernels.tenancy import Engine, UserModule, save_user

TINY = dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, num_decoder_layers=2)
METHODS = ("lora", "ia3", "houlsby", "prompt")


def world(shape: str, n_users: int, root: Path):
    cfg = T5Config(**TINY) if shape == "tiny" else T5Config.from_name(shape)
    model = T5.from_config(cfg, seed=0).eval()
    mods = {}
    for i in range(n_users):
        u = f"user{i}"
        m = new_module(model, METHODS[i % len(METHODS)], u, seed=i)
        for k, v in m.tensors.items():  # an adapter that changes the output
            m.tensors[k] = v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
        mods[u] = [m]
        save_user(root / u, mods[u], u)
    save_user(root / "hostile", [UserModule("prompt", {"prompt": torch.randn(200, cfg.d_model)})], "hostile")
    return model, mods


def oracle(model, mods):
    eng = Engine(model, backend="reference")
    for u, ms in mods.items():
        eng.register(u, ms)
    cache = {}

    def tokens(user, ids, n):
        key = (user, tuple(ids), n)
        if key not in cache:
            out = greedy(model, torch.tensor([ids]), None, n, eng.batch([user]))[0].tolist()
            eos = model.cfg.eos_token_id
            cache[key] = out[:out.index(eos) + 1] if eos in out else out
        return cache[key]
    return tokens


async def burst(url, plan, timeout):
    import httpx
    limits = httpx.Limits(max_connections=len(plan))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as c:
        async def one(p):
            t0 = time.perf_counter()
            r = await c.post(p["path"], json=p["body"])
            return p, r, time.perf_counter() - t0
        return await asyncio.gather(*(one(p) for p in plan))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", help="tiny, or a preset name (random weights)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--rows", type=int, default=8, help="KV pool rows (below the burst)")
    ap.add_argument("--queue", type=int, default=64, help="max_queue (below the burst)")
    ap.add_argument("--device-capacity", type=int, default=4, help="users in bank slots (below --users)")
    ap.add_argument("--timeout", type=float, default=60.0, help="the server's request deadline, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/serve_load.jsonl")
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model, mods = world(a.shape, a.users, Path(tmp))
        alone = oracle(model, mods)
        eng = Engine(model, backend="reference", capacity=a.device_capacity)
        srv = ServingEngine(model, eng, AdapterStore(eng, tmp, host_capacity=2 * a.device_capacity),
                            max_rows=a.rows, max_queue=a.queue, max_input_len=64, max_new_tokens=8, max_virtual=32,
                            max_labels=8, request_timeout=a.timeout)
        V, plan = model.cfg.vocab_size, []
        for i in range(a.requests):
            kind = rng.random()
            user = rng.choice(list(mods))
            ids = [rng.randrange(3, V) for _ in range(rng.randrange(2, 40))]
            if kind < 0.03:
                plan.append({"kind": "hostile adapter", "path": "/v1/completions",
                             "body": {"model": "hostile", "prompt": ids, "max_tokens": 4}})
            elif kind < 0.06:
                plan.append({"kind": "too many labels", "path": "/v1/score",
                             "body": {"model": user, "prompt": ids, "labels": [[5, 1]] * 20}})
            elif kind < 0.09:
                plan.append({"kind": "tiny deadline", "path": "/v1/completions",
                             "body": {"model": user, "prompt": ids, "max_tokens": 4, "timeout": 1e-6}})
            else:
                plan.append({"kind": "normal", "path": "/v1/completions",
                             "body": {"model": user, "prompt": ids, "max_tokens": rng.randrange(1, 9)}})
        t0 = time.perf_counter()
        with serve_in_thread(build_app(srv, drain_seconds=1)) as url:
            done = asyncio.run(burst(url, plan, a.timeout + 30))
            wall = time.perf_counter() - t0
            for _ in range(500):  # back to idle: nothing queued, no KV row taken
                if srv.pending() == 0 and srv.pool.used == 0:
                    break
                time.sleep(0.01)
            idle = {"pending": srv.pending(), "kv_rows_used": srv.pool.used, "device_users": len(eng.slots)}
    codes, exact, wrong, bad_json, lat = {}, 0, [], 0, []
    for p, r, dt in done:
        codes.setdefault(p["kind"], {}).setdefault(r.status_code, 0)
        codes[p["kind"]][r.status_code] += 1
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
        if body is None or (r.status_code != 200 and set(body) - {"error", "id", "loaded"}):
            bad_json += 1
        if r.status_code == 200 and p["kind"] == "normal":
            lat.append(dt)
            b = p["body"]
            if body["choices"][0]["tokens"] == alone(b["model"], b["prompt"], b["max_tokens"]):
                exact += 1
            else:
                wrong.append(b["model"])
    answered = sum(c.get(200, 0) for c in codes.values())
    rows = [{"kind": k, **{str(s): n for s, n in sorted(v.items())}} for k, v in sorted(codes.items())]
    summary = {"requests": a.requests, "answered": answered, "exact": exact, "wrong": len(wrong),
               "non_json_errors": bad_json, "wall_s": round(wall, 2),
               "p50_s": round(statistics.median(lat), 3) if lat else None,
               "p99_s": round(sorted(lat)[int(0.99 * (len(lat) - 1))], 3) if lat else None, **idle}
    env = environment("cpu")
    print(f"{a.requests} requests in one burst, {a.users} users ({a.device_capacity} fit the device tier), "
          f"{a.rows} KV rows, queue {a.queue}, shape {a.shape}; {env.get('date', '')}")
    print(table(rows, ["kind"] + sorted({k for r in rows for k in r} - {"kind"})))
    print(table([summary], list(summary)))
    write_jsonl(a.out, [{"by_kind": rows, **summary}], env)
    return summary, codes


if __name__ == "__main__":
    main()
