"""Multi-user training: many users' modules trained in one batched pass, each as if trained alone.

Every step takes one mini-batch from each of several users; the loss is the sum of per-user mean token
losses, so each user's gradient is its own; SlotAdamW keeps per-slot state, step counts and learning rates.
Per user: its own data order (seeded by user), linear warm-up schedule, validation loss after each epoch,
best-epoch checkpoint (atomic), optional early stopping. A killed run resumes from each user's last epoch.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .init import user_generator
from .io import load_tensors, save_json, save_tensors
from .optim import SlotAdamW, linear_warmup
from .progress import progress
from .t5 import T5
from .io import load_json
from .tenancy import Engine, UserModule
from .tenancy.ids import check_id, folder_name
from .tenancy.store import load_user, save_user


@dataclass
class TrainConfig:
    epochs: int = 8                 # the paper's settings by default
    batch_size: int = 8
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 42
    users_per_step: int | None = None   # None: every unfinished user in every step
    patience: int | None = None         # early stopping after this many epochs without a better val loss
    eval_batch_size: int = 64

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"TrainConfig.{name} must be {want}, got {getattr(self, name)!r}")
        for n in ("epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(n, "a positive int")
        for n in ("users_per_step", "patience"):
            v = getattr(self, n)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                bad(n, "None or a positive int")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            bad("lr", "a positive finite number")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            bad("weight_decay", "a finite number >= 0")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio <= 1):
            bad("warmup_ratio", "in [0, 1]")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float))
                                                   and 0 < self.max_grad_norm < math.inf):
            bad("max_grad_norm", "None or a positive number")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", "two numbers in [0, 1)")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            bad("eps", "a positive number")


# settings that do not change any user's result: a resumed run may differ in these
_RESUMABLE = ("eval_batch_size", "users_per_step")


Example = tuple[list[int], list[int]]  # (input ids, target ids)


def collate(examples: list[Example], pad: int = 0, device="cpu"):
    L = max(len(x) for x, _ in examples)
    T = max(len(y) for _, y in examples)
    ids = torch.full((len(examples), L), pad, dtype=torch.long)
    lab = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], lab[i, :len(y)] = torch.tensor(x), torch.tensor(y)
    return ids.to(device), (ids != pad).long().to(device), lab.to(device)


def token_losses(model: T5, ids, mask, labels, peft):
    """Per-row (sum of token losses, number of tokens)."""
    logits = model(ids, model.shift_right(labels), mask, peft=peft)
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return ce.sum(1), (labels != -100).sum(1)


def user_loss(s, n_tok, counts: list[int]):
    """The sum of per-user mean token losses: rows come `counts[i]` per user, in order, so each user's
    gradient is the one it would get trained alone."""
    loss, i = 0.0, 0
    for k in counts:
        loss = loss + s[i:i + k].sum() / n_tok[i:i + k].sum().clamp(min=1)
        i += k
    return loss


class _User:
    def __init__(self, name: str, train: list[Example], val: list[Example], cfg: TrainConfig):
        self.name, self.train, self.val = name, train, val
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.total = self.steps_per_epoch * cfg.epochs
        self.warmup = math.ceil(cfg.warmup_ratio * self.total)
        self.epoch, self.pos, self.order = 0, 0, []
        self.best, self.bad_epochs, self.done, self.history = float("inf"), 0, False, []

    def next_batch(self, cfg: TrainConfig) -> list[Example]:
        if self.pos == 0:  # a fresh, user-seeded order each epoch: the same alone or together
            g = user_generator(f"{self.name}/epoch{self.epoch}", cfg.seed)
            self.order = torch.randperm(len(self.train), generator=g).tolist()
        idx = self.order[self.pos:self.pos + cfg.batch_size]
        self.pos += len(idx)
        return [self.train[i] for i in idx]


class MultiUserTrainer:
    def __init__(self, model: T5, cfg: TrainConfig, out_dir=None, backend: str | None = None, progress: bool = True):
        self.model, self.cfg, self.backend, self.progress = model, cfg, backend, progress
        self.out = Path(out_dir) if out_dir else None
        for p in model.parameters():
            p.requires_grad_(False)
        self.device = next(model.parameters()).device

    # --- checkpoints ------------------------------------------------------------------------------
    def _dir(self, user):
        return self.out / "users" / folder_name(user)  # any id is a safe folder name under out_dir

    def _state(self, user, method: str) -> dict | None:
        """The user's saved progress, checked to come from this configuration and method."""
        f = self._dir(user) / "state.json" if self.out else None
        if f is None or not f.is_file():
            return None
        st = load_json(f)  # names the file when broken
        want = json.loads(json.dumps(asdict(self.cfg)))  # tuples as lists, as saved
        if not isinstance(st, dict) or not {"epoch", "best", "bad_epochs", "history", "config"} <= set(st):
            raise ValueError(f"{f}: not a training state (missing fields)")
        diff = {k: (st["config"].get(k), v) for k, v in want.items()
                if k not in _RESUMABLE and st["config"].get(k) != v}
        if diff or st.get("method", method) != method or st.get("user", user) != user:
            raise ValueError(f"{f}: user {user!r} was trained with other settings (saved vs now: {diff}, method "
                             f"{st.get('method')!r} vs {method!r}); use another out_dir or the same settings")
        return st

    def _save_epoch(self, u: _User, view, opt: SlotAdamW, method: str, improved: bool):
        if self.out is None:
            return
        d, slot = self._dir(u.name), view.slot[u.name]
        if improved:
            save_user(d / "best", [view.read(u.name)], u.name)
        raw = {f"p.{i}": t.detach()[slot].clone() for i, t in enumerate(view.params)}
        raw.update({f"opt.{k}": v for k, v in opt.slot_state(slot).items()})
        save_tensors(d / "current.safetensors", raw)
        save_json(d / "state.json", {"epoch": u.epoch, "best": u.best, "bad_epochs": u.bad_epochs, "done": u.done,
                                     "history": u.history, "config": asdict(self.cfg), "method": method,
                                     "user": u.name})

    def _restore(self, u: _User, view, opt: SlotAdamW, st: dict) -> None:
        raw, slot = load_tensors(self._dir(u.name) / "current.safetensors"), view.slot[u.name]
        with torch.no_grad():
            for i, t in enumerate(view.params):
                t[slot] = raw[f"p.{i}"].to(t.device, t.dtype)
        opt.load_slot_state(slot, {k[4:]: v for k, v in raw.items() if k.startswith("opt.")})
        u.epoch, u.best, u.bad_epochs, u.history = st["epoch"], st["best"], st["bad_epochs"], st["history"]

    # --- training ---------------------------------------------------------------------------------
    def train(self, data: dict[str, dict[str, list[Example]]], init: dict[str, UserModule],
              stop_after_steps: int | None = None) -> dict[str, UserModule]:
        """data[user] = {"train": [...], "val": [...]}; init[user] = the user's fresh module (one method for
        all users). Returns each user's best module (by validation loss). `stop_after_steps` simulates a kill."""
        cfg = self.cfg
        method = self._check(data, init)
        users = {n: _User(n, d["train"], d.get("val", []), cfg) for n, d in data.items()}
        finished = {}
        for n in list(users):
            st = self._state(n, method)
            if st and st.get("done"):
                finished[n] = load_user(self._dir(n) / "best")[0]
                del users[n]
        if not users:
            return finished
        eng = Engine(self.model, backend=self.backend, dtype=torch.float32)  # fp32 masters under any base dtype
        for n in users:
            eng.register(n, init[n])
        view = eng.train_view(list(users))
        opt = SlotAdamW(view.params, view.n_slots, cfg.betas, cfg.eps, cfg.weight_decay)
        for n, u in users.items():
            st = self._state(n, method)
            if st:
                self._restore(u, view, opt, st)
        bar = progress(sum(u.total - u.epoch * u.steps_per_epoch for u in users.values()), f"train {len(data)} users",
                       self.progress)
        step, seen, t0 = 0, 0, time.perf_counter()
        active = [u for u in users.values() if u.epoch < cfg.epochs]
        while active:
            group = sorted(active, key=lambda u: u.epoch * u.steps_per_epoch + u.pos // cfg.batch_size)
            group = group[: cfg.users_per_step or len(group)]
            rows, examples, owners = [], [], []
            for u in group:
                b = u.next_batch(cfg)
                examples += b
                rows += [u.name] * len(b)
                owners.append((u, len(b)))
            ids, mask, lab = collate(examples, self.model.cfg.pad_token_id, self.device)
            peft = eng.batch(rows)
            view.before_forward([u.name for u in group])
            s, n_tok = token_losses(self.model, ids, mask, lab, peft)
            user_loss(s, n_tok, [k for _, k in owners]).backward()
            view.after_backward()
            slots = torch.tensor([view.slot[u.name] for u in group])
            k = opt.steps[slots].tolist()
            lrs = torch.tensor([cfg.lr * linear_warmup(k[j], u.total, u.warmup) for j, u in enumerate(group)])
            opt.step(slots, lrs, cfg.max_grad_norm)
            opt.zero_grad()
            step += 1
            seen += len(examples)
            for u in group:
                if u.pos >= len(u.train):
                    self._end_epoch(u, eng, view, opt, method)
            active = [u for u in users.values() if not u.done]
            bar.update(len(group))
            bar.set_postfix(users_done=len(finished) + sum(u.done for u in users.values()),
                            ex_s=f"{seen / (time.perf_counter() - t0):.1f}", refresh=False)
            if stop_after_steps is not None and step >= stop_after_steps:
                bar.close()
                raise KeyboardInterrupt(f"stopped after {step} steps (simulated kill)")
        bar.close()
        self.stats = {"steps": step, "examples": seen, "seconds": time.perf_counter() - t0}
        view.release()
        out = dict(finished)
        for n, u in users.items():
            out[n] = load_user(self._dir(n) / "best")[0] if self.out else u.best_module
        return out

    def _check(self, data, init) -> str:
        """Refuse what training would silently get wrong; returns the one method of this call."""
        if not isinstance(data, dict) or not data:
            raise ValueError("train: data must be a non-empty dict user -> {'train': [...], 'val': [...]}")
        missing = [u for u in data if u not in init]
        if missing:
            raise ValueError(f"train: no initial module in `init` for users {missing[:5]}")
        methods = {init[u].method for u in data}
        if len(methods) != 1:
            raise ValueError(f"train: one method per call (its users share one bank), got {sorted(methods)}")
        V = self.model.cfg.vocab_size
        for u, d in data.items():
            check_id(u)
            if not isinstance(d, dict) or not isinstance(d.get("train"), list) or not d["train"]:
                raise ValueError(f"train: user {u!r} has no training examples")
            for split in ("train", "val"):
                for i, ex in enumerate(d.get(split) or []):
                    if not (isinstance(ex, (tuple, list)) and len(ex) == 2 and ex[0] and ex[1]):
                        raise ValueError(f"train: user {u!r} {split} example {i} needs non-empty input ids "
                                         f"and label ids, got {ex!r:.80}")
                    bad = [t for t in (*ex[0], *ex[1]) if not isinstance(t, int) or not 0 <= t < V]
                    if bad:
                        raise ValueError(f"train: user {u!r} {split} example {i} has ids {bad[:4]} outside "
                                         f"the vocabulary [0, {V})")
        return methods.pop()

    @torch.no_grad()
    def _val_loss(self, u: _User, eng: Engine) -> float:
        if not u.val:
            return float("nan")
        tot, n = 0.0, 0
        for i in range(0, len(u.val), self.cfg.eval_batch_size):
            chunk = u.val[i:i + self.cfg.eval_batch_size]
            ids, mask, lab = collate(chunk, self.model.cfg.pad_token_id, self.device)
            s, k = token_losses(self.model, ids, mask, lab, eng.batch([u.name] * len(chunk)))
            tot, n = tot + float(s.sum()), n + int(k.sum())
        return tot / max(1, n)

    def _end_epoch(self, u: _User, eng, view, opt, method: str):
        u.pos, u.epoch = 0, u.epoch + 1
        view.before_forward([u.name])  # P-tuning: validate on the prompt of the updated encoder
        vl = self._val_loss(u, eng)
        improved = not (vl >= u.best)  # NaN (no val split) counts as better: the last epoch wins
        u.history.append(vl)
        if improved:
            u.best, u.bad_epochs = vl, 0
            if self.out is None:
                u.best_module = view.read(u.name)
        else:
            u.bad_epochs += 1
        u.done = u.epoch >= self.cfg.epochs or (self.cfg.patience is not None and u.bad_epochs >= self.cfg.patience)
        self._save_epoch(u, view, opt, method, improved)
