"""Throughput and memory per method, measured on a fixed mixed-user workload rather than during evaluation.

The workload: the task's own test prompts, round-robin over its users so that consecutive rows belong to
different users, `rows` rows, answered by greedy generation of exactly `max_new_tokens` tokens (no early stop,
so every contender does the same work). It is timed in alternation with the base model on the same rows
(`rounds` times each), and reported as the ratio base time / method time (1.0 = as fast as the base model)
with its range over rounds, and as examples/s. Peak memory: on a GPU the workload's peak allocation above
what was allocated before it; on CPU (no allocator statistics) the method's bank bytes.
"""
from __future__ import annotations

import statistics
import time

import torch

from peftu_kernels.generate import greedy
from peftu_kernels.train import collate


def workload(users, rows: int):
    order, i = [], 0
    queues = [[(ud, j) for j in range(len(ud.tokens["test"]))] for ud in users]
    while len(order) < rows and any(queues):
        q = queues[i % len(queues)]
        if q:
            order.append(q[i // len(queues) % len(q)])
        i += 1
    return order


def _time(fn, device) -> float:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


@torch.no_grad()
def measure(model, users, rows_for, max_new_tokens: int, device, rows: int = 64, rounds: int = 5,
            batch: int = 64, bank_bytes: int = 0) -> dict:
    order = workload(users, rows)
    chunks = [order[i:i + batch] for i in range(0, len(order), batch)]
    data = [(collate([ud.tokens["test"][j] for ud, j in ch], device=device), [ud.user for ud, _ in ch])
            for ch in chunks]

    def run(with_peft: bool):
        for (ids, mask, _), who in data:
            greedy(model, ids, mask, max_new_tokens, rows_for(who) if with_peft else None, stop_at_eos=False)
    run(True), run(False)  # warm-up, untimed
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    ratios, t_m = [], []
    for _ in range(rounds):
        tb, tm = _time(lambda: run(False), device), _time(lambda: run(True), device)
        ratios.append(tb / tm)
        t_m.append(tm)
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else bank_bytes
    return {"infer_ratio": statistics.median(ratios), "infer_ratio_lo": min(ratios), "infer_ratio_hi": max(ratios),
            "infer_examples_per_s": len(order) / statistics.median(t_m), "workload_rows": len(order),
            "peak_mem_bytes": int(peak), "peak_mem_kind": "gpu peak above base" if cuda else "bank bytes (cpu)"}
