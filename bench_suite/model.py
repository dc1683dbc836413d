"""The base model: the embedded default (a tiny T5 + tokenizer trained here into a non-personalised global
model, cached) or a Hugging Face checkpoint (folder or hub id) used as it is."""
from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import torch

from peftu_kernels import T5, T5Config, load_pretrained, load_tokenizer, save_pretrained, train_tokenizer
from peftu_kernels.optim import linear_warmup

from .data import build_prompts, split_users
from .pretrain import SENTINELS, corpus_texts, pretrain, seq2seq_step

# pretrain_steps: span-corruption steps on the data root's train texts before the fine-tune (pretrain.py; 0: none)
GLOBAL = dict(vocab=4096, examples_per_task=600, epochs=2, batch=32, lr=2e-3, max_len=96, seed=42,
              pretrain_steps=0, pretrain_lr=2e-3)


def _key(tasks, cfg: T5Config, g: dict) -> str:
    sig = {"tasks": {n: [t.n_annotations, len(t.users)] for n, t in sorted(tasks.items())}, "cfg": cfg.to_hf(),
           "global": g, "v": 3}  # v3: BPE tokenizer (pretrain_steps is in g)
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]


def pooled_examples(tasks, per_task: int, seed: int):
    """Training splits of every user of every task, sampled evenly per task; half zero-shot prompts
    (instruction + text), half the paper's few-shot prompts, so both baselines see their format."""
    rng = random.Random(seed)
    out = []
    for name, t in sorted(tasks.items()):
        parts = split_users(t.users)
        rows = []
        for u, p in parts.items():
            pr = build_prompts(t, t.users[u], p, seed)["train"]
            for sid, few, target in pr:
                zero = f"{t.instruction} Text: {t.users[u][sid]['text']} Label: "
                rows.append((zero, few, target))
        for zero, few, target in rng.sample(rows, min(per_task, len(rows))):
            out.append((zero if rng.random() < 0.5 else few, target))
    rng.shuffle(out)
    return out


def embedded_default(tasks: dict, cache_dir: Path, device="cpu", progress=True, g: dict | None = None):
    """-> (model, tokenizer, info). Built once per (data, config, seed) and reused from cache_dir."""
    g = {**GLOBAL, **(g or {})}
    cfg = T5Config.from_name("tiny", vocab_size=g["vocab"])
    folder = Path(cache_dir) / f"global-{_key(tasks, cfg, g)}"
    info = {"model": "embedded default (tiny T5 trained here)", "cache": str(folder), "global": g}
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return load_pretrained(folder, device=device).eval(), load_tokenizer(folder), {**info, "cached": True}
    data = pooled_examples(tasks, g["examples_per_task"], g["seed"])
    texts = [x for x, _ in data] + [y for _, y in data] + [t.instruction for t in tasks.values()]
    corpus = corpus_texts(tasks) if g["pretrain_steps"] else []
    tok = train_tokenizer(texts + corpus, vocab_size=g["vocab"], extra_special=SENTINELS if corpus else ())
    cfg = T5Config.from_name("tiny", vocab_size=len(tok))
    torch.manual_seed(g["seed"])
    model = T5.from_config(cfg, seed=g["seed"]).to(device)
    with torch.no_grad():  # HF-scale init is for deep models; a smaller embedding scale trains faster here
        model.shared.weight.mul_(0.1)
    from peftu_kernels.progress import progress as make_bar
    if corpus:
        bar = make_bar(g["pretrain_steps"], f"pretraining ({len(corpus)} texts)", progress)
        info["pretrain_loss"] = pretrain(model, tok, corpus, g["pretrain_steps"], g["batch"], g["pretrain_lr"],
                                         g["max_len"], g["seed"], device, bar)
        info["pretrain_texts"] = len(corpus)
        bar.close()
    enc = tok([x for x, _ in data]).input_ids
    lab = tok([y for _, y in data]).input_ids
    ex = [(x[-g["max_len"]:], y[:32]) for x, y in zip(enc, lab)]
    steps = g["epochs"] * math.ceil(len(ex) / g["batch"])
    opt = torch.optim.AdamW(model.parameters(), lr=g["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup(s, steps, steps // 20))
    bar = make_bar(steps, "global model", progress)
    rng = random.Random(g["seed"])
    model.train()
    for _ in range(g["epochs"]):
        order = list(range(len(ex)))
        rng.shuffle(order)
        for i in range(0, len(order), g["batch"]):
            seq2seq_step(model, opt, sched, [ex[j] for j in order[i:i + g["batch"]]], device, bar)
    bar.close()
    model.eval()
    save_pretrained(model, folder)
    tok.save_pretrained(str(folder))
    return model, tok, {**info, "cached": False, "global_examples": len(ex), "global_steps": steps}


def from_checkpoint(name_or_path, device="cpu", dtype=torch.float32):
    from transformers import AutoTokenizer
    model = load_pretrained(name_or_path, dtype=dtype, device=device).eval()
    from peftu_kernels.checkpoint import resolve
    tok = AutoTokenizer.from_pretrained(str(resolve(name_or_path)))
    return model, tok, {"model": str(name_or_path)}
