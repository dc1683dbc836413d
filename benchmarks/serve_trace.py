"""Open-loop serving benchmark: Poisson arrivals, zipf users, PEFT-U-like prompts, 1-12 new tokens per request.

python -m benchmarks.serve_trace [--shape flan-t5-small] [--users 256] [--rates 2,4,8] [--duration 20]
Contenders on the same trace, in the same process: our continuous batching (`ServingEngine`); our static
batching (collect up to --batch requests or --wait-ms, then `greedy` to the batch's longest request); one
request at a time (the paper's protocol); and, on a LoRA-only copy of the trace, HF PEFT's static mixed batch
(`adapter_names`) beside our continuous batching. Also the base model (no adapters) on the same arrivals, and
`continuous_sampling`: the same trace with a --sampling share of its requests sampling (temperature 0.8,
top_p 0.95, each its own seed), the rest greedy.
Per rate: throughput, time to first token, p50/p99 latency; per contender the highest rate whose p99 stays
within --slo seconds with every request finished. --http R replays the trace at R req/s through the real
HTTP server on 127.0.0.1 (async httpx) beside the same trace in-process. Random weights (speed needs none).
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.common import environment, table, write_jsonl
from benchmarks.serving import peft_model, randomize
from benchmarks.t5_forward import build
from peftu_kernels.generate import greedy
from peftu_kernels.init import new_module
from peftu_kernels.sampling import GREEDY, Sampling
from peftu_kernels.serve import Request, ServingEngine
from peftu_kernels.tenancy import Engine

MIXED = [("lora", dict(r=8, alpha=16, targets=("q", "v"))), ("ia3", {}), ("houlsby", dict(reduction_factor=16)),
         ("prompt", dict(num_virtual_tokens=20))]


def prompt_lengths(max_len: int) -> list[int]:
    """Token counts of PEFT-U few-shot prompts (tweeteval's, ~1.3 tokens a word) when the data is here."""
    try:
        from bench_suite.data import load_task
        from bench_suite.workload import prepare
        users = prepare(load_task("tweeteval"), 8, 20)
        n = [int(1.3 * len(p.split())) for ud in users for rows in ud.prompts.values() for _, p, _ in rows]
        return [min(max_len, max(4, x)) for x in n]
    except Exception:  # no data root: a log-normal of the same scale
        rng = random.Random(0)
        return [min(max_len, max(4, int(rng.lognormvariate(4.3, 0.35)))) for _ in range(500)]


def make_trace(rate, duration, n_users, lengths, vocab, seed, zipf=1.1):
    rng = random.Random(seed)
    w = [1 / (k + 1) ** zipf for k in range(n_users)]
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return out
        n = rng.choice(lengths)
        out.append(dict(t=t, user=rng.choices(range(n_users), w)[0], ids=[rng.randrange(3, vocab) for _ in range(n)],
                        new=rng.randint(1, 12)))


def _pad(batch, device):
    L = max(len(r["ids"]) for r in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    mask = torch.zeros(len(batch), L, dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, :len(r["ids"])], mask[i, :len(r["ids"])] = torch.tensor(r["ids"]), 1
    return ids.to(device), mask.to(device)


def run_continuous(srv: ServingEngine, trace, names, deadline, share: float = 0.0):
    """`share`: that fraction of the requests (every k-th by a fixed rule, the same ones in each run) sample."""
    start, i, reqs = time.perf_counter(), 0, []
    samples = lambda i: (i * 0.6180339887) % 1.0 < share  # noqa: E731  (low-discrepancy: spread over the trace)
    while (i < len(trace) or srv.pending()) and time.perf_counter() - start < deadline:
        now = time.perf_counter() - start
        while i < len(trace) and trace[i]["t"] <= now:
            r = trace[i]
            s = Sampling(0.8, 0.95, seed=i) if samples(i) else GREEDY
            reqs.append((start + r["t"], srv.submit(Request(names(r["user"]), r["ids"], r["new"], sampling=s))))
            i += 1
        if srv.pending():
            srv.step()
        elif i < len(trace):
            time.sleep(max(0.0, min(0.01, trace[i]["t"] - now)))
    out = [(a, q.times.get("first_token"), q.times.get("finished"), len(q.tokens)) for a, q in reqs]
    for _, q in reqs:  # whatever the deadline left unfinished
        srv.cancel(q.id)
    srv.run_until_idle()
    return out + [(None, None, None, 0)] * (len(trace) - i)


def run_static(serve_batch, trace, B, wait, deadline, device):
    """Collect up to B requests or `wait` seconds, then run the batch to its longest request."""
    start, i, queue, out = time.perf_counter(), 0, [], []
    while (i < len(trace) or queue) and time.perf_counter() - start < deadline:
        now = time.perf_counter() - start
        while i < len(trace) and trace[i]["t"] <= now:
            queue.append(trace[i])
            i += 1
        if queue and (len(queue) >= B or now - queue[0]["t"] >= wait or i == len(trace)):
            batch, queue = queue[:B], queue[B:]
            toks = serve_batch(batch)
            end = time.perf_counter()
            out += [(start + r["t"], end, end, n) for r, n in zip(batch, toks)]  # no streaming: first = last
        elif i < len(trace):
            nxt = trace[i]["t"] if not queue else min(trace[i]["t"], queue[0]["t"] + wait)
            time.sleep(max(0.0, min(0.01, nxt - now)))
    return out + [(None, None, None, 0)] * (len(trace) - len(out))


def sustained(rows, slo) -> dict:
    """Per contender, the highest rate at which every request finished and p99 <= slo, with every lower rate
    tested also passing (a rate is not 'sustained' if a lower one failed)."""
    out = {}
    for c in dict.fromkeys(r["contender"] for r in rows):
        ok = 0.0
        for r in sorted((r for r in rows if r["contender"] == c), key=lambda r: r["rate"]):
            if r["finished"] != r["requests"] or not r["p99_s"] <= slo:
                break
            ok = r["rate"]
        out[c] = ok
    return out


def summarize(name, rate, rows, duration, slo):
    done = [r for r in rows if r[2] is not None]
    lat = sorted(r[2] - r[0] for r in done)
    ttft = sorted(r[1] - r[0] for r in done)
    span = max(r[2] for r in done) - min(r[0] for r in done) if done else float("nan")
    q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))] if xs else float("nan")
    p99 = q(lat, 0.99)
    return {"contender": name, "rate": rate, "requests": len(rows), "finished": len(done),
            "req_per_s": len(done) / span if done else 0.0, "tok_per_s": sum(r[3] for r in done) / span if done else 0.0,
            "ttft_p50_s": q(ttft, 0.5), "p50_s": q(lat, 0.5), "p99_s": p99,
            "meets_slo": len(done) == len(rows) and p99 <= slo}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="flan-t5-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--rates", default="2,4,8", help="arrivals per second, comma-separated")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate")
    ap.add_argument("--slo", type=float, default=1.0, help="p99 latency bound, seconds")
    ap.add_argument("--slos", default="0.5,0.75,1,2", help="also report the highest rate within each of these")
    ap.add_argument("--batch", type=int, default=32, help="static batching: most requests per batch")
    ap.add_argument("--wait-ms", type=float, default=100.0, help="static batching: longest wait to fill one")
    ap.add_argument("--max-rows", type=int, default=64, help="continuous batching: concurrent requests")
    ap.add_argument("--encode-budget", type=int, default=None,
                    help="continuous batching: encoder tokens admitted per step (default: the engine's, --max-len)")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--contenders", default="continuous,static,one_at_a_time,base,hf_peft,continuous_lora,"
                                            "continuous_sampling")
    ap.add_argument("--sampling", type=float, default=0.25, help="continuous_sampling: share of sampling requests")
    ap.add_argument("--lora-only", action="store_true", help="every user LoRA r8 (the GPU check's 1,000 users)")
    ap.add_argument("--http", type=float, default=None, help="also replay at this rate through the HTTP server")
    ap.add_argument("--out", default="results/serve_trace.jsonl")
    a = ap.parse_args(argv)
    dev = a.device
    dtype = torch.bfloat16 if torch.device(dev).type == "cuda" else torch.float32
    cfg, ours, hf = build(a.shape, dev, dtype)
    torch.set_grad_enabled(False)
    mixed = Engine(ours, capacity=a.users)
    lora = Engine(ours, capacity=a.users)
    hp = MIXED[0][1]
    for i in range(a.users):
        method, h = MIXED[0] if a.lora_only else MIXED[i % len(MIXED)]
        mixed.register(f"u{i}", randomize(new_module(ours, method, f"u{i}", 42, **h)))
        lora.register(f"u{i}", randomize(new_module(ours, "lora", f"u{i}", 42, **hp)))
    lengths = prompt_lengths(a.max_len)
    want = a.contenders.split(",")
    deadline = lambda: a.duration * 3 + 30  # noqa: E731

    def serving(eng):
        return ServingEngine(ours, eng, max_rows=a.max_rows, max_input_len=a.max_len, max_new_tokens=12,
                             max_virtual=32, encode_budget=a.encode_budget)

    def ours_static(eng, users):
        def serve(batch):
            ids, mask = _pad(batch, dev)
            toks = greedy(ours, ids, mask, max(r["new"] for r in batch), peft=eng.batch([users(r["user"]) for r in batch]))
            return [min(r["new"], toks.shape[1]) for r in batch]
        return serve

    def one_at_a_time(batch):  # B = 1: each request alone, its user's module
        r = batch[0]
        ids, mask = _pad(batch, dev)
        return [greedy(ours, ids, mask, r["new"], peft=mixed.batch([f"u{r['user']}"])).shape[1]]

    pm = None
    if "hf_peft" in want:
        pm = peft_model(hf, [f"u{i}" for i in range(a.users)], hp)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.data.copy_(torch.randn_like(p) * 0.01)

    def hf_static(batch):
        ids, mask = _pad(batch, dev)
        out = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=[f"u{r['user']}" for r in batch],
                          max_new_tokens=max(r["new"] for r in batch), do_sample=False)
        return [min(r["new"], out.shape[1] - 1) for r in batch]

    name = lambda i: f"u{i}"  # noqa: E731
    contenders = {
        "continuous": lambda tr: run_continuous(serving(mixed), tr, name, deadline()),
        "static": lambda tr: run_static(ours_static(mixed, name), tr, a.batch, a.wait_ms / 1e3, deadline(), dev),
        "one_at_a_time": lambda tr: run_static(one_at_a_time, tr, 1, 0.0, deadline(), dev),
        "base": lambda tr: run_continuous(serving(mixed), tr, lambda i: None, deadline()),
        "hf_peft": lambda tr: run_static(hf_static, tr, a.batch, a.wait_ms / 1e3, deadline(), dev),
        "continuous_lora": lambda tr: run_continuous(serving(lora), tr, name, deadline()),
        "continuous_sampling": lambda tr: run_continuous(serving(mixed), tr, name, deadline(), a.sampling),
    }
    # untimed warm-up of every path (first calls allocate, compile, fill caches)
    warm = make_trace(50, 0.2, a.users, lengths, cfg.vocab_size, 99)
    for c in want:
        contenders[c](warm)
    rows = []
    for rate in [float(x) for x in a.rates.split(",")]:
        trace = make_trace(rate, a.duration, a.users, lengths, cfg.vocab_size, seed=int(rate * 1000))
        for c in want:
            rows.append(summarize(c, rate, contenders[c](trace), a.duration, a.slo))
            print(f"rate {rate}: {c} done ({rows[-1]['finished']}/{rows[-1]['requests']})", flush=True)
    slos = sorted({a.slo, *(float(x) for x in a.slos.split(","))})
    best = {slo: sustained(rows, slo) for slo in slos}
    summary = [{"contender": c, **{f"max_rate_p99<={slo:g}s": best[slo].get(c, 0.0) for slo in slos}} for c in want]
    ratios = {}
    for slo in slos:
        b = lambda c: best[slo].get(c, 0.0)  # noqa: E731
        for x, y in (("continuous", "static"), ("continuous_lora", "hf_peft"), ("continuous", "base"),
                     ("continuous_sampling", "continuous")):
            if x in want and y in want:
                # neither within the bound: no ratio (it was printed as inf)
                ratios[f"{x}_vs_{y}@{slo:g}s"] = b(x) / b(y) if b(y) else (float("inf") if b(x) else None)
    if a.http:
        rows.append(http_run(serving(mixed), a.http, a.duration, a.users, lengths, cfg.vocab_size, a.slo,
                             contenders["continuous"]))
    env = {**environment(dev), "shape": a.shape, "users": a.users, "slo_s": a.slo, "lora_only": a.lora_only}
    print(f"device: {env['device']}, torch {env['torch']}, {a.shape}, {a.users} users, SLO p99 <= {a.slo} s")
    print(table(rows, ["contender", "rate", "requests", "finished", "req_per_s", "tok_per_s", "ttft_p50_s", "p50_s",
                       "p99_s", "meets_slo"]))
    print()
    print(table(summary, ["contender"] + [f"max_rate_p99<={slo:g}s" for slo in slos]))
    print("ratios (highest rate within the SLO):", {k: v if v is None else round(v, 2) for k, v in ratios.items()})
    write_jsonl(a.out, rows + summary + [{"ratios": ratios}], env)


def http_run(srv, rate, duration, n_users, lengths, vocab, slo, in_process):
    """The same trace through the real server (loopback) and in-process: req/s of each, and errors."""
    import asyncio

    import httpx

    from peftu_kernels.serve.http import build_app, serve_in_thread
    trace = make_trace(rate, duration, n_users, lengths, vocab, seed=7)

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=duration * 3 + 30,
                                     limits=httpx.Limits(max_connections=512)) as c:
            start = time.perf_counter()

            async def one(r):
                await asyncio.sleep(max(0.0, r["t"] - (time.perf_counter() - start)))
                t0 = start + r["t"]
                resp = await c.post("/v1/completions", json={"model": f"u{r['user']}", "prompt": r["ids"],
                                                             "max_tokens": r["new"]})
                t1 = time.perf_counter()
                return (t0, t1, t1, len(resp.json()["choices"][0]["tokens"])) if resp.status_code == 200 else None
            return await asyncio.gather(*(one(r) for r in trace))
    with serve_in_thread(build_app(srv)) as url:
        got = asyncio.run(go(url))
    errors = sum(x is None for x in got)
    row = summarize("http", rate, [x or (None, None, None, 0) for x in got], duration, slo)
    inproc = summarize("continuous", rate, in_process(trace), duration, slo)
    return {**row, "errors": errors, "in_process_req_per_s": inproc["req_per_s"],
            "http_vs_in_process": row["req_per_s"] / inproc["req_per_s"] if inproc["req_per_s"] else float("nan")}


if __name__ == "__main__":
    main()
