"""The report's rows: baselines (zero-shot, few-shot, majority label) and per-user PEFT methods."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from peftu_kernels.generate import greedy
from peftu_kernels.progress import progress as make_bar
from peftu_kernels.init import new_module
from peftu_kernels.tenancy import Engine, methods
from peftu_kernels.train import MultiUserTrainer, TrainConfig, collate

from . import throughput
from .data import Task, correct
from .workload import UserData

BASELINES = ["zero-shot", "few-shot", "majority"]
PEFT_METHODS = [m.name for m in methods.all_methods() if m.in_paper]  # the paper's set: the default run
ALL_METHODS = BASELINES + list(methods.names())                        # every registered method can be asked for
DEFAULT_METHODS = BASELINES + PEFT_METHODS

# Embedded-default hyper-parameters (the 2.4M-parameter model learns at these rates; the paper's 2e-5 is
# for Flan-T5-base). --full uses the paper's TrainConfig() and each method's `paper` settings. A method without
# an entry here trains at DEFAULT_SMALL_LR with its paper settings. The prompt-style rates are the lowest mean
# best validation loss of `python -m benchmarks.lr_sweep` on the default's users (docs/benchmark.md, Levers):
# their validation losses were still falling at the earlier rates (prompt 0.3, prefix 0.05, P-tuning 0.01).
SMALL_LR = {"lora": 3e-3, "houlsby": 3e-3, "pfeiffer": 1e-2, "ia3": 1e-1, "prompt": 9.0, "prefix": 0.5,
            "ptuning": 1e-1}
DEFAULT_SMALL_LR = 3e-3
SMALL_HP = {"lora": dict(r=8, alpha=32, targets=("q", "v", "wi_0", "wi_1", "wo")), "houlsby": dict(reduction_factor=8),
            "pfeiffer": dict(reduction_factor=4), "prompt": dict(num_virtual_tokens=10),
            "prefix": dict(num_virtual_tokens=10), "ptuning": dict(num_virtual_tokens=10, encoder_hidden_size=64,
                                                                  encoder_type="MLP")}


@dataclass
class Outcome:
    per_example: dict[str, list[int]]   # user -> 1/0 per test example (PEFT-U's any-gold hit), in test order
    params_per_user: int = 0
    bytes_per_user: int = 0
    train_seconds: float = 0.0
    train_examples_per_s: float = 0.0
    throughput: dict = field(default_factory=dict)  # throughput.measure on the fixed workload
    ranks: dict = field(default_factory=dict)       # user -> the rank that trained and evaluated it (torchrun)

    @property
    def per_user(self) -> dict[str, float]:
        return {u: sum(v) / len(v) for u, v in self.per_example.items()}

    def row(self) -> dict:
        accs = list(self.per_user.values())
        d = asdict(self)
        return {"accuracy": 100 * statistics.fmean(accs), "spread": 100 * statistics.pstdev(accs) if accs else 0.0,
                "n_users": len(accs), **d.pop("throughput"), **d, "per_user": self.per_user}


def _interleave(users: list[UserData], split: str, tokens: bool):
    """Test rows ordered round-robin over users, so that every batch mixes users (mostly one row each)."""
    queues = [[(ud, i) for i in range(len(ud.prompts[split]))] for ud in users]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def evaluate(model, tok, task: Task, users: list[UserData], rows_for, max_new_tokens: int, batch: int, device,
             zero_shot: bool = False, progress: bool = True):
    """Greedy generation on every user's test split in mixed-user batches -> (per-user accuracy, examples/s).
    rows_for(list of users per row) gives the PeftBatch (or None for the base model)."""
    order = _interleave(users, "test", True)
    outputs = {ud.user: [None] * len(ud.prompts["test"]) for ud in users}
    bar = make_bar(len(order), f"evaluate {task.name}", progress)
    t0 = time.perf_counter()
    for i in range(0, len(order), batch):
        chunk = order[i:i + batch]
        ex = []
        for ud, j in chunk:
            ids = ud.tokens["test"][j][0]
            if zero_shot:
                sid = ud.prompts["test"][j][0]
                ids = ud.tokens.setdefault("zero", {}).get(sid)
            ex.append((ids, [1]))
        ids, mask, _ = collate(ex, device=device)
        gen = greedy(model, ids, mask, max_new_tokens, peft=rows_for([ud.user for ud, _ in chunk]))
        for (ud, j), text in zip(chunk, tok.batch_decode(gen, skip_special_tokens=True)):
            outputs[ud.user][j] = text
        bar.update(len(chunk))
    bar.close()
    secs = time.perf_counter() - t0
    hits = {ud.user: [int(correct(o, ud.gold[sid], task.labels)) for o, (sid, _, _) in
                      zip(outputs[ud.user], ud.prompts["test"])] for ud in users}
    return hits, len(order) / max(secs, 1e-9)


def majority(task: Task, users: list[UserData]) -> Outcome:
    return Outcome({ud.user: [int(ud.majority in ud.gold[sid]) for sid, _, _ in ud.prompts["test"]] for ud in users})


def run_baseline(kind, model, tok, task, users, a) -> Outcome:
    if kind == "majority":
        return majority(task, users)
    if kind == "zero-shot":
        for ud in users:
            texts = [f"{task.instruction} Text: {task.users[ud.user][sid]['text']} Label: " for sid, _, _ in ud.prompts["test"]]
            enc = tok(texts).input_ids
            ud.tokens["zero"] = {sid: ids[-a.max_len:] for (sid, _, _), ids in zip(ud.prompts["test"], enc)}
    acc, _ = evaluate(model, tok, task, users, lambda rows: None, a.max_new_tokens, a.eval_batch, a.device,
                      zero_shot=kind == "zero-shot", progress=a.progress)
    tp = throughput.measure(model, users, lambda rows: None, a.max_new_tokens, a.device, a.workload_rows) \
        if a.measure_throughput else {}
    return Outcome(acc, throughput=tp)


def train_modules(method, model, users, a, train_dir) -> tuple[dict, TrainConfig]:
    """Every user's module of `method`, trained together (the run's settings `a`; its per-method learning rate
    unless `a.lr` names one); checkpoints and validation histories under train_dir."""
    hp = {} if a.full else SMALL_HP.get(method, {})
    lr = a.lr.get(method, 2e-5 if a.full else SMALL_LR.get(method, DEFAULT_SMALL_LR))
    cfg = TrainConfig(lr=lr) if a.full else TrainConfig(epochs=a.epochs, batch_size=8, lr=lr,
                                                        users_per_step=a.users_per_step)
    init = {ud.user: new_module(model, method, ud.user, 42, **hp) for ud in users}
    data = {ud.user: {"train": ud.tokens["train"], "val": ud.tokens["val"]} for ud in users}
    trainer = MultiUserTrainer(model, cfg, train_dir, backend=a.backend, progress=a.progress)
    return trainer.train(data, init), cfg


def run_peft(method, model, tok, task, users, a, train_dir) -> Outcome:
    t0 = time.perf_counter()
    mods, cfg = train_modules(method, model, users, a, train_dir)
    train_s = time.perf_counter() - t0
    n_ex = sum(len(ud.tokens["train"]) for ud in users) * cfg.epochs
    eng = Engine(model, backend=a.backend)
    for ud in users:
        eng.register(ud.user, mods[ud.user])
    with torch.no_grad():
        acc, _ = evaluate(model, tok, task, users, eng.batch, a.max_new_tokens, a.eval_batch, a.device,
                            progress=a.progress)
    m = mods[users[0].user]
    tp = throughput.measure(model, users, eng.batch, a.max_new_tokens, a.device, a.workload_rows,
                            bank_bytes=eng.memory_report()["bank_bytes"]) if a.measure_throughput else {}
    pm = methods.get(m.method)
    return Outcome(acc, pm.served(m), pm.served_bytes(m), train_s, n_ex / max(train_s, 1e-9), tp)
