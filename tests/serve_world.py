"""A small model and a folder of users in every format (HF PEFT, AdapterHub, peftu) for the serving tests."""
from __future__ import annotations

from pathlib import Path

import torch

from helpers import small_cfg
from peftu_kernels.generate import greedy, score_labels
from peftu_kernels.t5 import T5
from peftu_kernels.tenancy import Engine, save_user
from peftu_kernels.tenancy.adapterhub import export_adapterhub
from peftu_kernels.tenancy.hf_peft import export_peft
from tenancy_users import KINDS, make

# (user id, kind, seed, on-disk format)
USERS = [(f"{k}-{i}", k, 10 * j + i, fmt) for j, k in enumerate(KINDS) for i in range(2)
         for fmt in [{"lora": "peft", "ia3": "peft", "prompt": "peft", "ptuning": "peft", "dora": "peft", "houlsby": "adapterhub",
                      "pfeiffer": "adapterhub"}.get(k, "peftu")]]


def model() -> T5:
    return T5.from_config(small_cfg("gated-untied", d_model=36, d_kv=12, num_heads=3), seed=7).eval()


def write_users(m: T5, root: Path) -> dict[str, list]:
    """Every user's folder under root; returns user -> modules (what serving it alone means)."""
    mods = {}
    for u, kind, seed, fmt in USERS:
        ms = make(m.cfg, kind, seed)
        if fmt == "peft":
            export_peft(ms[0], root / u, m)
        elif fmt == "adapterhub":
            export_adapterhub(ms[0], root / u, m, name="a")
        else:
            save_user(root / u, ms, u)
        mods[u] = ms
    return mods


class Oracle:
    """Each request answered alone: greedy / score_labels on one row, the user's modules in a fresh engine."""

    def __init__(self, m: T5, mods: dict):
        self.m, self.eng = m, Engine(m, backend="reference")
        for u, ms in mods.items():
            self.eng.register(u, ms)

    def tokens(self, user, ids, n):
        out = greedy(self.m, torch.tensor([ids]), None, n, self.eng.batch([user]) if user else None)[0].tolist()
        return out[:out.index(self.m.cfg.eos_token_id) + 1] if self.m.cfg.eos_token_id in out else out

    def scores(self, user, ids, labels):
        return score_labels(self.m, torch.tensor([ids]), None, labels, self.eng.batch([user]) if user else None)[0]


def text_server(root: Path, capacity: int, host: int, **limits):
    """The model, every user's folder under root, a tiny tokenizer and a ServingEngine over them (the HTTP
    tests' world): (model, server, user -> modules, tokenizer)."""
    from peftu_kernels import train_tokenizer
    from peftu_kernels.serve import AdapterStore, ServingEngine
    m = model()
    mods = write_users(m, root)
    tok = train_tokenizer(["hello world this is a test", "another sentence here", "yes no maybe"], vocab_size=60)
    eng = Engine(m, backend="reference", capacity=capacity)
    srv = ServingEngine(m, eng, AdapterStore(eng, root, host_capacity=host), max_input_len=24, max_new_tokens=8,
                        max_virtual=8, **limits)
    return m, srv, mods, tok
