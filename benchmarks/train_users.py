"""Training throughput: many users at once vs one after another (ours) vs HF PEFT one user at a time.

python -m benchmarks.train_users [--task tweeteval] [--users 8] [--method lora] [--epochs 4]
Same base model (the embedded default's global model, or --shape for random weights of a real shape),
same users, same data order and hyper-parameters. Reports examples/s, the ratios, and each way's
accuracy on the users' test splits (PEFT-U's metric) to show the speed costs no quality.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

from bench_suite.data import load_task, user_accuracy
from bench_suite.methods import SMALL_HP, SMALL_LR
from bench_suite.model import embedded_default
from bench_suite.workload import prepare, tokenize
from benchmarks.common import environment, table, write_jsonl
from peftu_kernels.checkpoint import to_hf
from peftu_kernels.generate import greedy
from peftu_kernels.init import new_module, user_generator
from peftu_kernels.tenancy import Engine
from peftu_kernels.train import MultiUserTrainer, TrainConfig, collate


def setup(task_name: str, n_users: int, max_train: int, max_len: int, cache, shape: str | None, device, dtype):
    """(task, frozen base, users with token ids): the embedded default's base and tokenizer, or with `shape`
    random weights of that preset (speed only; the embedded tokenizer's ids fit its vocabulary)."""
    task = load_task(task_name)
    model, tok, _ = embedded_default({task_name: task}, Path(cache), progress=False)
    if shape:
        from peftu_kernels import T5, T5Config
        model = T5.from_config(T5Config.from_name(shape))
    model = model.to(device, dtype).eval()
    users = prepare(task, n_users, max_train)
    tokenize(users, tok, max_len, truncate_left=True)
    return task, model, tok, users


def hf_peft_one_user(hf, train, cfg: TrainConfig, user: str, hp: dict, init, device="cpu"):
    """The paper's protocol for one user: a PEFT LoRA model, AdamW, linear warm-up, batch 8, epochs."""
    import peft
    from transformers import get_linear_schedule_with_warmup
    pc = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=hp["r"], lora_alpha=hp["alpha"], target_modules=list(hp["targets"]))
    pm = peft.get_peft_model(copy.deepcopy(hf), pc)
    with torch.no_grad():  # the same initial weights as ours
        for n, p in pm.named_parameters():
            if "lora_" in n:
                site = n.split("base_model.model.")[1].rsplit(".lora_", 1)[0]
                key = f"{site}.lora_A" if ".lora_A." in n else f"{site}.lora_B"
                p.copy_(init.tensors[key])
    params = [p for p in pm.parameters() if p.requires_grad]
    steps = math.ceil(len(train) / cfg.batch_size)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * steps * cfg.epochs), steps * cfg.epochs)
    pm.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train), generator=user_generator(f"{user}/epoch{epoch}", cfg.seed)).tolist()
        for i in range(0, len(train), cfg.batch_size):
            ids, mask, lab = collate([train[j] for j in order[i:i + cfg.batch_size]], device=device)
            pm(input_ids=ids, attention_mask=mask, labels=lab).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
    return pm.eval()


def accuracy(task, users, predict, device="cpu") -> float:
    accs = []
    for ud in users:
        ids, mask, _ = collate([t for t in ud.tokens["test"]], device=device)
        outs = predict(ud, ids, mask)
        accs.append(user_accuracy(outs, [ud.gold[sid] for sid, _, _ in ud.prompts["test"]], task.labels))
    return 100 * sum(accs) / len(accs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="tweeteval")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--max-train", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--shape", default=None, help="random weights of this preset (speed only), e.g. flan-t5-base")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the frozen base's dtype, every way alike (adapter weights stay float32)")
    ap.add_argument("--out", default="results/train_users.jsonl")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    task, model, tok, users = setup(a.task, a.users, a.max_train, a.max_len, a.cache, a.shape, a.device, dtype)
    hp = SMALL_HP.get(a.method, {})
    cfg = TrainConfig(epochs=a.epochs, batch_size=8, lr=SMALL_LR[a.method])
    data = {ud.user: {"train": ud.tokens["train"], "val": []} for ud in users}
    n_ex = sum(len(d["train"]) for d in data.values()) * cfg.epochs
    init = {u: new_module(model, a.method, u, 42, **hp) for u in data}
    res = {}
    # warm-up, untimed: kernel compilation, allocator and library start-up land in no one's time
    warm = {u: {"train": data[u]["train"][:cfg.batch_size], "val": []} for u in list(data)[:2]}
    wcfg = TrainConfig(epochs=1, batch_size=8, lr=cfg.lr)
    MultiUserTrainer(model, wcfg, progress=False).train(warm, init)
    MultiUserTrainer(model, wcfg, progress=False).train(dict(list(warm.items())[:1]), init)
    t0 = time.perf_counter()
    together = MultiUserTrainer(model, cfg, progress=False).train(data, init)
    res["multi-user (ours)"] = (time.perf_counter() - t0, together)
    t0 = time.perf_counter()
    alone = {}
    for u in data:
        alone.update(MultiUserTrainer(model, cfg, progress=False).train({u: data[u]}, {u: init[u]}))
    res["one at a time (ours)"] = (time.perf_counter() - t0, alone)
    dec = lambda g: tok.batch_decode(g, skip_special_tokens=True)

    def ours_acc(mods):
        eng = Engine(model)
        for u, m in mods.items():
            eng.register(u, m)
        return accuracy(task, users, lambda ud, ids, mask: dec(greedy(model, ids, mask, 8, peft=eng.batch([ud.user] * len(ids)))),
                        a.device)
    rows = [{"way": k, "seconds": s, "examples_per_s": n_ex / s, "accuracy": ours_acc(m)} for k, (s, m) in res.items()]
    if not a.no_hf and a.method == "lora":
        hf = to_hf(model.cpu()).to(a.device, dtype)  # PEFT keeps its LoRA weights float32 over it
        model.to(a.device)
        u0 = next(iter(data))
        hf_peft_one_user(hf, warm[u0]["train"], wcfg, u0, hp, init[u0], a.device)  # warm-up, untimed
        t0 = time.perf_counter()
        pms = {u: hf_peft_one_user(hf, data[u]["train"], cfg, u, hp, init[u], a.device) for u in data}
        s = time.perf_counter() - t0
        acc = accuracy(task, users, lambda ud, ids, mask: dec(pms[ud.user].generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, 1:]), a.device)
        rows.append({"way": "HF PEFT one at a time (paper)", "seconds": s, "examples_per_s": n_ex / s, "accuracy": acc})
    base = rows[0]["examples_per_s"]
    for r in rows:
        r.update(bench="train_users", task=a.task, users=len(users), method=a.method, epochs=a.epochs, dtype=a.dtype,
                 multi_user_speedup=base / r["examples_per_s"])
    env = environment(a.device)
    print(f"device: {env['device']}, torch {env['torch']}, peft {env['peft']}; {len(users)} users of {a.task}, "
          f"{a.method}, {a.epochs} epochs, {a.dtype} base, {n_ex} examples each way")
    print(table(rows, ["way", "seconds", "examples_per_s", "multi_user_speedup", "accuracy"]))
    write_jsonl(a.out, rows, env)


if __name__ == "__main__":
    main()
