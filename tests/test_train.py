"""Multi-user training equals training each user alone (a plain torch.optim.AdamW loop), and resumes."""
import copy
import math

import pytest
import torch

from helpers import hf_twin
from peft_users import PEFT_CFG, PlainHooks
from peftu_kernels.config import T5Config
from peftu_kernels.init import new_module, user_generator
from peftu_kernels.tenancy.methods.ptuning import PromptEncoder
from peftu_kernels.tenancy import Engine
from peftu_kernels.train import MultiUserTrainer, TrainConfig, collate, token_losses

METHODS = {"lora": dict(r=3, alpha=6, targets=("q", "v", "wo")), "ia3": {}, "houlsby": dict(reduction_factor=6),
           "pfeiffer": dict(reduction_factor=9), "prompt": dict(num_virtual_tokens=3),
           "prefix": dict(num_virtual_tokens=2), "ptuning": dict(num_virtual_tokens=3, encoder_hidden_size=8,
                                                                 encoder_type="MLP"),
           "dora": dict(r=3, alpha=6, targets=("q", "v", "wo"))}
CFG = TrainConfig(epochs=2, batch_size=3, lr=3e-2, weight_decay=0.05, warmup_ratio=0.25, max_grad_norm=0.5)


@pytest.fixture(scope="module")
def model():
    return hf_twin(T5Config(**PEFT_CFG), seed=3)[1]


def make_data(vocab, n_users=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {}
    for u in range(n_users):
        n = 5 + 2 * u  # different sizes: users finish at different steps
        ex = [(torch.randint(3, vocab, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist() + [1],
               torch.randint(3, vocab, (2,), generator=g).tolist() + [1]) for _ in range(n)]
        data[f"user{u}"] = {"train": ex, "val": []}
    return data


class PromptHook(PlainHooks):
    """Single-user P-tuning: prepend the encoder's prompt (a plain module, no banks)."""

    def __init__(self, enc):
        self.enc = enc

    def prompt(self, x, mask):
        p = self.enc()[None].expand(x.shape[0], -1, -1)
        return torch.cat([p, x], 1), torch.cat([torch.ones(x.shape[0], p.shape[1], dtype=torch.bool), mask], 1)


def train_alone(model, method, user, train, cfg, mod=None):
    """The oracle: torch.optim.AdamW + HF's schedule + clip_grad_norm_, one user, one batch at a time."""
    from transformers import get_linear_schedule_with_warmup
    mod = mod or new_module(model, method, user, cfg.seed, **METHODS[method])
    if method == "ptuning":
        c = mod.config
        enc = PromptEncoder(c["num_virtual_tokens"], model.cfg.d_model, c["encoder_hidden_size"], c["encoder_type"])
        enc.load_state_dict({k[len("prompt_encoder."):]: v for k, v in mod.tensors.items() if k.startswith("prompt_enc")})
        params, hook = list(enc.parameters()), lambda rows: PromptHook(enc)
    else:
        eng = Engine(model, backend="reference")
        eng.register(user, mod)
        view = eng.train_view([user])
        params = view.params
        hook = lambda rows: eng.batch(rows)
    steps = math.ceil(len(train) / cfg.batch_size)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * steps * cfg.epochs), steps * cfg.epochs)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train), generator=user_generator(f"{user}/epoch{epoch}", cfg.seed)).tolist()
        for i in range(0, len(train), cfg.batch_size):
            ids, mask, lab = collate([train[j] for j in order[i:i + cfg.batch_size]])
            if method != "ptuning":
                view.before_forward([user])  # DoRA: its column norms from the current weights
            s, n = token_losses(model, ids, mask, lab, hook([user] * len(ids)))
            (s.sum() / n.sum()).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
    if method == "ptuning":
        return {"prompt_encoder." + k: v.detach() for k, v in enc.state_dict().items()} | {"prompt": enc().detach()}
    view.release()
    return view.read(user).tensors


@pytest.mark.parametrize("method", list(METHODS))
def test_training_together_equals_training_alone(model, method):
    data = make_data(model.cfg.vocab_size)
    init = {u: new_module(model, method, u, CFG.seed, **METHODS[method]) for u in data}
    if method == "dora":
        # DoRA from a partly trained state (B != 0): from B = 0, A's first non-zero gradients come one step late
        # and ~1e-8 in some coordinates, where Adam's eps turns a 1e-5 rounding difference between two correct
        # fp32 runs into a 1e-4 step (seen: one coordinate of 108); from B != 0 A's gradients are of normal size
        g = torch.Generator().manual_seed(5)
        for m in init.values():
            for k, t in m.tensors.items():
                if k.endswith(".lora_B"):
                    m.tensors[k] = torch.randn(t.shape, generator=g) * 0.1
    together = MultiUserTrainer(model, CFG, progress=False, backend="reference").train(data, init)
    for u in data:
        alone = train_alone(model, method, u, data[u]["train"], CFG, copy.deepcopy(init[u]) if method == "dora" else None)
        got = together[u].tensors
        changed = max((got[k] - init[u].tensors[k]).abs().max() for k in got)
        assert changed > 1e-3, f"{method}: training did not move {u}'s weights"
        for k in alone:
            if k == "prompt" and method == "ptuning":
                continue  # the served prompt is recomputed from the encoder at the end
            # relative error of the tensor (Frobenius): fp32 rounding differs between any two correct
            # computations, and Adam turns it into visible noise in coordinates whose gradient is near zero
            # (m / sqrt(v) of rounding errors); against a float64 run the fp32 one-user oracle itself is off by
            # ~1e-5 of the tensor's scale in single coordinates, so only the tensor-level error is meaningful.
            err = float((got[k] - alone[k]).norm() / alone[k].norm().clamp(min=1e-30))
            assert err <= 1e-5, f"{method} {u} {k}: relative error {err:.2e} > 1e-5"


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_kill_and_resume_gives_the_same_modules(model, method, tmp_path):
    data = make_data(model.cfg.vocab_size, n_users=3, seed=4)
    for u in data:  # with validation: best epoch by val loss
        data[u]["val"] = data[u]["train"][:2]
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 3})
    init = {u: new_module(model, method, u, 42, **METHODS[method]) for u in data}
    full = MultiUserTrainer(model, cfg, tmp_path / "full", backend="reference", progress=False).train(data, init)
    with pytest.raises(KeyboardInterrupt):
        MultiUserTrainer(model, cfg, tmp_path / "cut", backend="reference", progress=False).train(
            data, init, stop_after_steps=5)
    states = list((tmp_path / "cut" / "users").glob("*/state.json"))
    assert states, "nothing was checkpointed before the kill"
    resumed = MultiUserTrainer(model, cfg, tmp_path / "cut", backend="reference", progress=False).train(data, init)
    for u in data:
        for k, v in full[u].tensors.items():
            torch.testing.assert_close(resumed[u].tensors[k], v, rtol=1e-5, atol=1e-6)


def test_early_stopping_and_best_epoch(model, tmp_path):
    data = make_data(model.cfg.vocab_size, n_users=2, seed=7)
    for u in data:
        data[u]["val"] = data[u]["train"][-2:]
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 6, "lr": 0.3, "patience": 1})
    init = {u: new_module(model, "lora", u, 42, **METHODS["lora"]) for u in data}
    MultiUserTrainer(model, cfg, tmp_path, backend="reference", progress=False).train(data, init)
    import json
    for u in data:
        st = json.loads((tmp_path / "users" / u / "state.json").read_text())
        h = st["history"]
        assert st["done"] and st["best"] == min(h)
        assert len(h) == 6 or (h[-1] >= min(h[:-1]))  # stopped early only after an epoch without improvement


def test_16bit_base_trains_float32_masters(model):
    """Under a bf16 base the trainer keeps float32 banks: the paper's small steps (lr 2e-5) cannot be held by
    bf16 weights of magnitude ~0.1 (their spacing there is ~5e-4)."""
    import copy
    data = make_data(model.cfg.vocab_size, n_users=2, seed=7)
    cfg = TrainConfig(**{**CFG.__dict__, "lr": 2e-5, "epochs": 1, "warmup_ratio": 0.0})
    init = {u: new_module(model, "lora", u, 42, **METHODS["lora"]) for u in data}
    ref = MultiUserTrainer(model, cfg, progress=False, backend="reference").train(data, init)
    got = MultiUserTrainer(copy.deepcopy(model).to(torch.bfloat16), cfg, progress=False,
                           backend="reference").train(data, init)
    for u in data:
        for k, t0 in init[u].tensors.items():
            assert got[u].tensors[k].dtype == torch.float32, k
            d_ref, d_got = ref[u].tensors[k] - t0, got[u].tensors[k] - t0
            # bf16 activations perturb the gradients (A's, driven by a still-tiny B, most: up to ~0.6 relative,
            # median 0.1) but the update keeps its direction (cosine >= 0.83 here); bf16 banks instead give A
            # updates 10-25x too large in unrelated directions (cosine <= 0.2)
            rel = float((d_got - d_ref).norm() / d_ref.norm())
            cos = float(torch.nn.functional.cosine_similarity(d_got.flatten(), d_ref.flatten(), 0))
            assert rel < 1.0 and cos > 0.7, f"{u} {k}: bf16-base update vs fp32's: relative {rel:.2f}, cosine {cos:.3f}"
