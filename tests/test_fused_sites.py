"""LoRA sites that share an input (q, k, v of self-attention; k, v of cross-attention; wi_0, wi_1) run one
shrink on their stacked A's and an expand each: same logits and tokens as site by site, on the reference and
(under the interpreter) the Triton backend; the stacked copy follows every change of a slot."""
import pytest
import torch

from helpers import assert_rel_close, small_cfg
from peftu_kernels.generate import greedy
from peftu_kernels.t5 import T5
from peftu_kernels.tenancy import Engine, UserModule
from peftu_kernels.tenancy.methods import lora as lora_file


def user(cfg, model, parts, r, seed):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in parts and hasattr(m, "weight") and m.weight.dim() == 2 and "." in name:
            t[name + ".lora_A"] = torch.randn(r, m.in_features, generator=g) * 0.3
            t[name + ".lora_B"] = torch.randn(m.out_features, r, generator=g) * 0.3
    return UserModule("lora", t, {"r": r, "alpha": 2 * r})


@pytest.fixture(scope="module")
def world():
    cfg = small_cfg("gated-untied")
    model = T5.from_config(cfg, seed=3).eval()
    users = {"all": user(cfg, model, ("q", "k", "v", "wi_0", "wi_1", "o"), 3, 1),
             "qv": user(cfg, model, ("q", "v"), 5, 2), "kv-wi": user(cfg, model, ("k", "v", "wi_1"), 2, 3),
             "all-r1": user(cfg, model, ("q", "k", "v", "wi_0", "wi_1"), 1, 4)}
    return cfg, model, users


def run(model, users, backend, rows, fused, monkeypatch, calls=None):
    if not fused:
        monkeypatch.setattr(lora_file.LoraBank, "fuses", lambda self, site: None)
    eng = Engine(model, backend=backend)
    for u, m in users.items():
        eng.register(u, m)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.cfg.vocab_size, (len(rows), 5), generator=g)
    dec = torch.randint(3, model.cfg.vocab_size, (len(rows), 2), generator=g)
    with torch.no_grad():
        logits = model(ids, dec, None, peft=eng.batch(rows))
        toks = greedy(model, ids, None, 2, peft=eng.batch(rows), stop_at_eos=False)
    monkeypatch.undo()
    return logits, toks


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_sites_equal_site_by_site(world, backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    cfg, model, users = world
    rows = ["all", "qv", None, "kv-wi", "all", "all-r1"] if backend == "reference" else ["all", None, "kv-wi", "all"]
    shrinks, launches = [], []
    real = lora_file.LoraBank._stacked
    monkeypatch.setattr(lora_file.LoraBank, "_stacked", lambda self, g: shrinks.append(g) or real(self, g))
    if backend == "triton":  # decode steps: the group's expands in one launch
        from peftu_kernels.triton import sgmv_group
        kern = sgmv_group._expand_group_kernel
        monkeypatch.setattr(sgmv_group, "_expand_group_kernel", type("K", (), {"__getitem__": lambda self, grid: (
            launches.append(grid), kern[grid])[1]})())
    fused = run(model, users, backend, rows, True, monkeypatch)
    assert shrinks, "no group of sites was fused"
    assert backend == "reference" or launches, "no decode step expanded a group in one launch"
    plain = run(model, users, backend, rows, False, monkeypatch)
    assert_rel_close(fused[0], plain[0])
    assert torch.equal(fused[1], plain[1])


def test_one_shrink_per_group_and_not_while_training(world, monkeypatch):
    from peftu_kernels import ops
    cfg, model, users = world
    eng = Engine(model, backend="reference")
    eng.register("all", users["all"])
    counts = {"lora": 0, "lora_shrink": 0, "lora_expand_group": 0}
    for name in counts:
        real = ops.get(name)
        monkeypatch.setitem(ops._BACKENDS["reference"], name,
                            lambda *a, _n=name, _f=real, **k: counts.__setitem__(_n, counts[_n] + 1) or _f(*a, **k))
    ids = torch.randint(3, cfg.vocab_size, (2, 5))
    with torch.no_grad():
        model.encode(ids, None, eng.batch(["all", "all"]))
    L = cfg.num_layers  # encoder: per layer one shrink and one expand op for q, k, v, the same for wi_0, wi_1
    assert counts == {"lora_shrink": 2 * L, "lora_expand_group": 2 * L, "lora": L}, counts
    view = eng.train_view(["all"])  # training: A's change every step, so site by site
    for k in counts:
        counts[k] = 0
    model.encode(ids, None, eng.batch(["all", "all"]))
    view.release()
    assert counts["lora_shrink"] == 0 and counts["lora"] == 6 * L, counts


def test_the_stacked_copy_follows_slot_changes(world):
    """Replace a user, evict one, reuse its slot: the fused path reads the new weights (vs a fresh engine)."""
    cfg, model, users = world
    eng = Engine(model, backend="reference", capacity=2)
    eng.register("a", users["all"])
    eng.register("b", users["all-r1"])
    ids = torch.randint(3, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.encode(ids, None, eng.batch(["a", "b"]))  # builds the stacked copies
        eng.register("a", users["qv"], replace=True)
        eng.register("c", users["kv-wi"])  # evicts the least recently used
        got = model.encode(ids, None, eng.batch(["a", "c"]))[0]
        fresh = Engine(model, backend="reference")
        fresh.register("a", users["qv"])
        fresh.register("c", users["kv-wi"])
        want = model.encode(ids, None, fresh.batch(["a", "c"]))[0]
    assert_rel_close(got, want)


def test_inference_mode_banks_and_training_in_between(world):
    """Users registered under inference_mode (a serving stack's habit) fuse too; a bank trained between two
    served batches serves its new weights, not the stacked copy of the old ones."""
    cfg, model, users = world
    ids = torch.randint(3, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        eng = Engine(model, backend="reference")
        eng.register("a", users["all"])
        first = model.encode(ids, None, eng.batch(["a", "a"]))[0]
    eng2 = Engine(model, backend="reference")
    eng2.register("a", users["all"])
    with torch.no_grad():
        before = model.encode(ids, None, eng2.batch(["a", "a"]))[0]  # stacked copy built here
    assert_rel_close(first, before)
    view = eng2.train_view(["a"])
    with torch.no_grad():
        for p in view.params:
            p.mul_(1.5)  # what an optimiser step does: in place, through the trainable tensors
    view.release()
    with torch.no_grad():
        after = model.encode(ids, None, eng2.batch(["a", "a"]))[0]
        fresh = Engine(model, backend="reference")
        fresh.register("a", view.read("a"))
        want = model.encode(ids, None, fresh.batch(["a", "a"]))[0]
    assert (after - before).abs().max() > 1e-3
    assert_rel_close(after, want)
