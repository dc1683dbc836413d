"""What every method file builds on: the Bank (its users' modules stacked along a slot dim S, and the hooks
the model calls), the Method (everything else about it), and the TrainView a trainer works through.

Padding in banks is exact: ranks and bottlenecks are zero-padded to the bank's widest, scale vectors default
to 1, prompts and prefixes are right-aligned with a length per slot (the rest masked).
"""
from __future__ import annotations

import torch

from ..modules import UserModule


def pad(t: torch.Tensor, dim: int, size: int, fill: float = 0.0) -> torch.Tensor:
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim)


def split_key(k: str) -> tuple[str, str]:
    """'encoder.block.0.layer.0.SelfAttention.q.lora_A' -> (site, part)."""
    site, part = k.rsplit(".", 1)
    return site, part


class Bank:
    """Per-site tensor groups with a leading slot dim; `fills` gives each tensor's neutral value.
    Hooks (called by PeftBatch for the banks of a batch, in `order`): `linear_in(pb, site, x)` before a linear,
    `linear_out(pb, site, x, y, weight)` after it, `residual(pb, site, f, out)` at a sub-layer's residual add;
    `plan(pb)` computes the per-batch facts once, in Engine.batch."""
    fills: dict[str, float] = {}
    hooks: tuple[str, ...] = ()
    order = 0

    def __init__(self, key: str, model, device, dtype):
        self.key, self.model, self.device, self.dtype = key, model, device, dtype
        self.slots = 0
        self.sites: dict[str, dict[str, torch.Tensor]] = {}
        self.epoch = 0  # bumped by every change of a slot or the layout: caches derived from the bank key on it

    def grow(self, n: int, cap: int | None = None) -> None:
        """At least n slots; doubling amortises growth, and a known capacity caps it (no slack past it)."""
        if n <= self.slots:
            return
        self.epoch += 1
        n = max(n, min(max(2 * self.slots, 4), cap or 1 << 62))
        for g in self.sites.values():
            for name, t in g.items():
                g[name] = pad(t, 0, n, self.fills.get(name, 0.0))
        self._grow_extra(n)
        self.slots = n

    def _grow_extra(self, n):
        pass

    def _new(self, name, shape, fill=None, dtype=None):
        fill = self.fills.get(name, 0.0) if fill is None else fill
        return torch.full((self.slots, *shape), fill, dtype=dtype or self.dtype, device=self.device)

    def _t(self, t):
        return t.to(device=self.device, dtype=self.dtype)

    def write(self, slot: int, mod: UserModule) -> None:
        raise NotImplementedError

    def clear(self, slot: int) -> None:
        """Neutral values in `slot` (every write starts here, so it also marks the bank changed)."""
        self.epoch += 1
        for g in self.sites.values():
            for name, t in g.items():
                t[slot] = self.fills.get(name, 0.0)

    def read(self, slot: int, like: UserModule) -> UserModule:
        """The module in `slot`, in canonical form, with `like`'s names, shapes and config (write's inverse)."""
        t = {k: self._read(slot, k, v, like) for k, v in like.tensors.items()}
        return UserModule(like.method, {k: v.detach().clone().to(like.tensors[k].dtype) for k, v in t.items()},
                          dict(like.config))

    def _read(self, slot: int, key: str, v: torch.Tensor, like: UserModule) -> torch.Tensor:
        """The bank's view of tensor `key` (shaped like `v`, from module `like`) in `slot`."""
        raise NotImplementedError

    def trainable(self) -> list[torch.Tensor]:
        """The tensors a trainer optimises (slot dim first); sizes and scales are not parameters."""
        return [t for g in self.sites.values() for n, t in g.items() if t.is_floating_point() and n != "scale"]

    def mask_padding_grads(self) -> None:
        """Zero the gradients of padding (units past a slot's own size), which must stay exactly neutral."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.sites.values() for t in g.values())

    def plan(self, pb):  # pb: the batch's PeftBatch (tenancy.engine)
        return None

    def slots_of(self, pb):
        """This bank's (slots, segments) in the batch."""
        return pb.meta.slots[self.key], pb.meta.segments[self.key]


class TrainView:
    """What a trainer needs of one bank: its parameters (slot dim first, the optimiser's), each user's slot,
    reading a user's current module, and the per-step hooks. Methods whose served weights are not their
    parameters (P-tuning) override it."""

    def __init__(self, bank: Bank, slots: dict[str, int], init: dict[str, UserModule]):
        self.bank, self.slot, self.init = bank, slots, init
        self.params = [t.requires_grad_(True) for t in bank.trainable()]
        bank.epoch += 1  # its tensors will change under the optimiser

    @property
    def n_slots(self) -> int:
        return self.bank.slots

    def before_forward(self, users: list[str]) -> None:
        """Called before a forward that reads these users' modules (a training step or a validation)."""

    def after_backward(self) -> None:
        self.bank.mask_padding_grads()

    def read(self, user: str) -> UserModule:
        return self.bank.read(self.slot[user], self.init[user])

    def release(self) -> None:
        for p in self.params:
            p.requires_grad_(False)
        self.bank.epoch += 1


class Method:
    """Everything about one PEFT method. A method file defines a subclass and registers an instance
    (`methods.register`); the engine, importers, trainer and bench_suite find it by name.

    Subclasses set `name`, `suffixes` (canonical tensor-name endings, for `sites()`), `bank` (its Bank class)
    and `paper` (default hyper-parameters, the PEFT-U paper's where it gives them), and implement `check`
    (validation against a model), `init` (fresh module); optionally the formats: `peft_types` +
    `from_peft` / `to_peft` (HF PEFT), `adapterhub` + `from_adapterhub` / `to_adapterhub` (AdapterHub)."""
    name = ""
    suffixes: tuple[str, ...] = ()
    bank: type[Bank] = Bank
    paper: dict = {}
    peft_types: tuple[str, ...] = ()
    peft_priority = 0           # several methods reading one peft_type: the highest that claims it wins
    adapterhub: tuple[str, ...] = ()   # AdapterHub architectures it reads
    in_paper = True             # part of the PEFT-U paper's method set (bench_suite's default run)
    position = 100              # where it is listed (reports, CLI help)

    def bank_key(self, mod: UserModule) -> str:
        return self.name

    def new_bank(self, key: str, model, device, dtype) -> Bank:
        return self.bank(key, model, device, dtype)

    def check(self, mod: UserModule, model, fail) -> None:
        raise NotImplementedError

    def init(self, model, g: torch.Generator, hp: dict) -> UserModule:
        raise NotImplementedError

    def claims_peft(self, cfg: dict) -> bool:
        return True

    def from_peft(self, folder, cfg: dict, w: dict, model) -> UserModule:
        raise ValueError(f"{folder}: method {self.name} has no HF PEFT reader")

    def to_peft(self, mod: UserModule, model) -> tuple[dict, dict]:
        raise ValueError(f"method {mod.method!r} has no HF PEFT format")

    def claims_adapterhub(self, cfg: dict) -> bool:
        return True

    def from_adapterhub(self, folder, cfg: dict, name: str, w: dict, model) -> UserModule:
        raise ValueError(f"{folder}: method {self.name} has no AdapterHub reader")

    def to_adapterhub(self, mod: UserModule, model, name: str) -> tuple[dict, dict]:
        raise ValueError(f"method {mod.method!r} ({mod.config.get('semantics', '')}) has no AdapterHub form")

    def train_view(self, bank: Bank, slots: dict[str, int], init: dict[str, UserModule]) -> TrainView:
        return TrainView(bank, slots, init)

    def needs(self, mod: UserModule) -> dict[str, int]:
        """What serving this module costs beyond its weights, for schedulers and limits that must not know
        methods by name: "virtual_tokens" (encoder columns it prepends), "prefix" (attention keys it adds)."""
        return {}

    def served_tensors(self, mod: UserModule) -> list[torch.Tensor]:
        """The tensors serving reads (P-tuning's encoder is training-only)."""
        return list(mod.tensors.values())

    def served(self, mod: UserModule) -> int:
        return sum(t.numel() for t in self.served_tensors(mod))

    def served_bytes(self, mod: UserModule) -> int:
        return sum(t.numel() * t.element_size() for t in self.served_tensors(mod))
