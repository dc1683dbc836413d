"""Serving benchmark: mixed-user throughput and latency against the base model, HF PEFT's mixed batch and
the paper's one-user-at-a-time protocol; and how many users fit resident.

python -m benchmarks.serving [--shapes tiny,flan-t5-small] [--quick] [--device cpu|cuda]
A PEFT-U-like classification workload: inputs of --seq tokens, labels of 1-4 tokens, answered by greedy
generation (4 new tokens) and by label scoring (3 candidate labels). Random weights (speed needs no
pretrained values). Ratios are against contenders timed in the same process on the same device.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.common import environment, table, write_jsonl
from benchmarks.ops import slots_for
from benchmarks.t5_forward import build
from peftu_kernels.generate import greedy, score_labels
from peftu_kernels.init import new_module
from peftu_kernels.tenancy import Engine

METHODS = {"lora_r8": ("lora", dict(r=8, alpha=16, targets=("q", "v"))),
           "lora_r64": ("lora", dict(r=64, alpha=128, targets=("q", "v"))),
           "houlsby": ("houlsby", dict(reduction_factor=16)), "ia3": ("ia3", {}),
           "prompt": ("prompt", dict(num_virtual_tokens=20))}
LABELS = [[3, 1], [4, 5, 1], [6, 7, 8, 1]]


def latencies(fn, reps: int, device) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def randomize(mod):
    g = torch.Generator().manual_seed(hash(mod.method) % 1000)
    for k, v in mod.tensors.items():
        if k.endswith("lora_B"):
            mod.tensors[k] = torch.randn(v.shape, generator=g) * 0.01
    return mod


def peft_model(hf, names, hp):
    import peft
    pc = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=hp["r"], lora_alpha=hp["alpha"], target_modules=list(hp["targets"]))
    pm = peft.get_peft_model(copy.deepcopy(hf), pc, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, pc)
    return pm.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--pops", default=None, help="only these popularities, e.g. distinct,zipf")
    ap.add_argument("--out", default="results/serving.jsonl")
    a = ap.parse_args(argv)
    dev = a.device
    gpu = torch.device(dev).type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = (a.shapes or ("flan-t5-small,flan-t5-base" if gpu else "tiny,flan-t5-small")).split(",")
    reps = a.reps or (20 if gpu else 3)
    grid = [(64, 64, "distinct"), (64, 8, "uniform"), (64, 64, "zipf"), (64, 1, "identical")] if a.quick or not gpu \
        else [(B, n, pop) for B in (1, 16, 64, 256) for n in (1, 8, 64, 256, 1024) for pop in ("distinct", "uniform", "zipf", "identical") if not (pop == "distinct" and n < B)]
    if a.pops:
        grid = [p for p in grid if p[2] in a.pops.split(",")]
    rows = []
    for shape in shapes:
        cfg, ours, hf = build(shape, dev, dtype)
        max_users = max(n for _, n, _ in grid)
        engines = {}
        for name, (method, hp) in METHODS.items():
            eng = Engine(ours, capacity=max_users)
            for i in range(max_users):
                eng.register(f"{name}{i}", randomize(new_module(ours, method, f"u{i}", 42, **hp)))
            engines[name] = eng
        mixed = Engine(ours)  # every method side by side
        for i in range(max_users):
            name, (method, hp) = list(METHODS.items())[i % len(METHODS)]
            mixed.register(f"mixed{i}", randomize(new_module(ours, method, f"m{i}", 42, **hp)))
        engines["mixed"] = mixed
        g = torch.Generator().manual_seed(0)
        for B, n_users, pop in grid:
            ids = torch.randint(3, cfg.vocab_size, (B, a.seq), generator=g).to(dev)
            mask = torch.ones_like(ids)
            slots = slots_for(pop, B, n_users, g).tolist()
            with torch.inference_mode():
                for mode in ("generate", "score"):
                    run = (lambda p: greedy(ours, ids, mask, 4, peft=p)) if mode == "generate" else \
                        (lambda p: score_labels(ours, ids, mask, LABELS, peft=p))
                    for name, eng in engines.items():
                        users = [f"{name}{s}" for s in slots]
                        base, lat = [], []
                        for _ in range(reps):  # alternate with the base model so that machine noise hits both
                            base += latencies(lambda: run(None), 1, dev)
                            lat += latencies(lambda: run(eng.batch(users)), 1, dev)
                        p50 = statistics.median(lat)
                        row = {"bench": "serving", "shape": shape, "mode": mode, "method": name, "batch": B,
                               "users_registered": max_users, "distinct_in_batch": len(set(slots)), "pop": pop,
                               "req_per_s": B / p50 * 1e3, "p50_ms": p50, "p99_ms": sorted(lat)[int(0.99 * (len(lat) - 1))],
                               "vs_base": statistics.median(base) / p50}
                        rows.append(row)
                    if mode == "generate" and B <= 64:  # HF PEFT baselines for LoRA r=8
                        names = sorted({f"lora_r8{s}" for s in slots})
                        pm = peft_model(hf, names, METHODS["lora_r8"][1])
                        users = [f"lora_r8{s}" for s in slots]
                        gen = lambda: pm.generate(input_ids=ids, attention_mask=mask, adapter_names=users,
                                                  max_new_tokens=4, min_new_tokens=4, do_sample=False)
                        t_peft = statistics.median(latencies(gen, max(1, reps // 2), dev))

                        def paper():  # one user's adapter, that user's requests, then the next user
                            for u in names:
                                pm.set_adapter(u)
                                r = [i for i, x in enumerate(users) if x == u]
                                pm.generate(input_ids=ids[r], attention_mask=mask[r], max_new_tokens=4,
                                            min_new_tokens=4, do_sample=False)
                        t_paper = statistics.median(latencies(paper, 1, dev))
                        ours_row = next(r for r in reversed(rows) if r["method"] == "lora_r8" and r["mode"] == "generate")
                        ours_row.update(vs_hf_peft=t_peft / ours_row["p50_ms"], vs_paper_protocol=t_paper / ours_row["p50_ms"])
                        del pm
            print(f"{shape} B={B} users={n_users} {pop}: done", flush=True)
        # memory: resident users of LoRA r=8 on q, v at this shape, bank bytes against the parameter floor
        rep = engines["lora_r8"].memory_report()
        floor = rep["resident_floor_bytes"]
        per_user = floor / max_users
        rows.append({"bench": "serving.memory", "shape": shape, "method": "lora_r8", "users_resident": max_users,
                     "params_per_user": per_user / dtype.itemsize, "bank_bytes": rep["bank_bytes"],
                     "floor_bytes": floor, "bank_over_floor": rep["bank_bytes"] / max(1, floor),
                     "users_for_15k_GB": 15_000 * per_user / 1e9})
    env = environment(dev)
    print(f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}, peft {env['peft']}")
    print(table([r for r in rows if r["bench"] == "serving"],
                ["shape", "mode", "method", "batch", "distinct_in_batch", "pop", "req_per_s", "p50_ms", "p99_ms",
                 "vs_base", "vs_hf_peft", "vs_paper_protocol"]))
    print()
    print(table([r for r in rows if r["bench"] == "serving.memory"],
                ["shape", "method", "users_resident", "params_per_user", "bank_bytes", "floor_bytes", "bank_over_floor",
                 "users_for_15k_GB"]))
    write_jsonl(a.out, rows, env)


if __name__ == "__main__":
    main()
