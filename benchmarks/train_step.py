"""Where a training step's time goes, and the ceiling it puts on any multi-user speed-up.

python -m benchmarks.train_step [--users 8] [--dtype float32] [--compile] [--shape flan-t5-base] [--device cuda]
Times, interleaved so that machine noise hits all alike: HF PEFT's one-user step (the paper's loop: batch 8,
forward, backward, clipping, AdamW), our one-user step, our multi-user step (every user's 8 rows at once,
optimiser included) and the frozen base's own forward + backward on the same 64 rows with no adapter at all
(input gradients only, the least any adapter's step has to compute). HF's time per example over that
floor's bounds what any multi-user trainer can gain over the paper's loop on this machine.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench_suite.methods import SMALL_HP
from benchmarks.common import environment, interleaved, table, write_jsonl
from benchmarks.train_users import setup
from peftu_kernels.checkpoint import to_hf
from peftu_kernels.init import new_module
from peftu_kernels.optim import SlotAdamW
from peftu_kernels.tenancy import Engine
from peftu_kernels.train import collate, token_losses, user_loss


def _device(model):
    return next(model.parameters()).device


def our_step(model, users, rows_per_user: int, hp: dict):
    """One multi-user step as MultiUserTrainer takes it: fp32 banks, per-user mean losses, SlotAdamW."""
    eng = Engine(model, dtype=torch.float32)
    for ud in users:
        eng.register(ud.user, new_module(model, "lora", ud.user, 42, **hp))
    view = eng.train_view([ud.user for ud in users])
    opt = SlotAdamW(view.params, view.n_slots)
    ex = [e for ud in users for e in ud.tokens["train"][:rows_per_user]]
    ids, mask, lab = collate(ex, model.cfg.pad_token_id, _device(model))
    batch = eng.batch([ud.user for ud in users for _ in range(rows_per_user)])
    slots = torch.tensor([view.slot[ud.user] for ud in users])

    def step():
        s, n = token_losses(model, ids, mask, lab, batch)
        user_loss(s, n, [rows_per_user] * len(users)).backward()
        opt.step(slots, torch.full((len(users),), 1e-4), 1.0)
        opt.zero_grad()
    return step


def hf_step(model, ud, rows: int, hp: dict):
    import peft
    p = next(model.parameters())
    hf = to_hf(model).to(p.device, p.dtype)
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=hp["r"], lora_alpha=hp["alpha"],
                                                 target_modules=list(hp["targets"]))).train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, mask, lab = collate(ud.tokens["train"][:rows], model.cfg.pad_token_id, _device(model))

    def step():
        pm(input_ids=ids, attention_mask=mask, labels=lab).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    return step


def base_floor(model, users, rows_per_user: int, compile: bool = False):
    """The frozen base alone, forward + backward to its input (no weight gradients, no adapter)."""
    ex = [e for ud in users for e in ud.tokens["train"][:rows_per_user]]
    ids, mask, lab = collate(ex, model.cfg.pad_token_id, _device(model))

    class Leaf:  # hooks that do what the base does, except that the embeddings become a leaf needing a
        # gradient, so that backward runs through every layer
        def prompt(self, x, m):
            return x.detach().requires_grad_(True), m

        def linear(self, site, x, w):
            return torch.nn.functional.linear(x, w)

        def residual(self, site, x, f):
            return x + f

        def prefix_len(self, stack):
            return 0

        def prefix_kv(self, site, k, v):
            return k, v

    def loss():
        s, n = token_losses(model, ids, mask, lab, Leaf())
        return s.sum() / n.sum()
    fn = torch.compile(loss) if compile else loss
    return lambda: fn().backward()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="tweeteval")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8, help="rows per user per step (the paper's batch size)")
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="also time the base floor under torch.compile")
    ap.add_argument("--shape", default=None, help="random weights of this preset (speed only), e.g. flan-t5-base")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--out", default="results/train_step.jsonl")
    a = ap.parse_args(argv)
    _, model, _, users = setup(a.task, a.users, 48, a.max_len, a.cache, a.shape, a.device, getattr(torch, a.dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    hp = SMALL_HP["lora"]
    n = a.users * a.rows
    fns = {"HF PEFT, one user": (a.rows, hf_step(model, users[0], a.rows, hp)),
           "ours, one user": (a.rows, our_step(model, users[:1], a.rows, hp)),
           "ours, multi-user": (n, our_step(model, users, a.rows, hp)),
           "frozen base alone (floor)": (n, base_floor(model, users, a.rows))}
    if a.compile:
        t0 = time.perf_counter()
        fns["frozen base alone, torch.compile"] = (n, base_floor(model, users, a.rows, compile=True))
        fns["frozen base alone, torch.compile"][1]()
        print(f"torch.compile: {time.perf_counter() - t0:.0f} s to compile")
    ms = interleaved({k: f for k, (_, f) in fns.items()}, a.device, rounds=3, reps=3)
    hf_per_ex = ms["HF PEFT, one user"] / a.rows
    rows = [{"way": k, "rows": r, "ms_per_step": ms[k], "ms_per_example": ms[k] / r,
             "hf_per_example_over_this": hf_per_ex / (ms[k] / r)} for k, (r, _) in fns.items()]
    for r in rows:
        r.update(bench="train_step", task=a.task, users=a.users, dtype=a.dtype, max_len=a.max_len,
                 shape=a.shape or "embedded default")
    env = environment(a.device)
    print(f"device: {env['device']}, torch {env['torch']}; {a.shape or 'embedded default'}, {a.task}, "
          f"{a.users} users x {a.rows} rows, {a.dtype}, LoRA {hp['targets']}")
    print(table(rows, ["way", "rows", "ms_per_step", "ms_per_example", "hf_per_example_over_this"]))
    write_jsonl(a.out, rows, env)


if __name__ == "__main__":
    main()
