"""Registry life cycle, eviction, save/load and bad input: clear errors, nothing stored is changed."""
import copy

import pytest
import torch

from helpers import TOL, hf_twin
from peft_users import PEFT_CFG, adapter_module
from peftu_kernels.config import T5Config
from peftu_kernels.tenancy import Engine, UserModule, load_user, save_user
from peftu_kernels.tenancy.hf_peft import import_peft


@pytest.fixture
def model():
    return hf_twin(T5Config(**PEFT_CFG), seed=2)[1]


def lora(cfg, r, seed, sites=("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.2.DenseReluDense.wo")):
    g = torch.Generator().manual_seed(seed)
    lin = {"q": (cfg.d_model, cfg.inner_dim), "wo": (cfg.d_ff, cfg.d_model)}
    t = {}
    for s in sites:
        i, o = lin.get(s.rsplit(".", 1)[1], (cfg.d_model, cfg.d_model))
        t[s + ".lora_A"] = torch.randn(r, i, generator=g)
        t[s + ".lora_B"] = torch.randn(o, r, generator=g)
    return UserModule("lora", t, {"r": r, "alpha": 2 * r})


def run(model, eng, users, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.cfg.vocab_size, (len(users), 7), generator=g)
    dec = torch.randint(3, model.cfg.vocab_size, (len(users), 3), generator=g)
    with torch.no_grad():
        return model(ids, dec, peft=eng.batch(users))


def snapshot(eng):
    return {k: {s: {n: t.clone() for n, t in g.items()} for s, g in b.sites.items()} for k, b in eng.banks.items()}, \
        dict(eng.slots), list(eng.users)


def same(a, b):
    (ba, sa, ua), (bb, sb, ub) = a, b
    assert sa == sb and ua == ub
    for k in ba:
        for s in ba[k]:
            for n in ba[k][s]:
                assert torch.equal(ba[k][s][n], bb[k][s][n]), (k, s, n)


def test_register_replace_remove_while_live(model):
    cfg = model.cfg
    eng = Engine(model, backend="reference")
    eng.register("a", lora(cfg, 3, 1))
    eng.register("b", lora(cfg, 8, 2))
    before = run(model, eng, ["a", "b", None])
    eng.register("a", lora(cfg, 2, 9), replace=True)
    after = run(model, eng, ["a", "b", None])
    assert (after[0] - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(after[1:], before[1:], **TOL[torch.float32])
    eng.remove("a")
    with pytest.raises(KeyError, match="unknown user id 'a'"):
        eng.batch(["a"])
    eng.register("c", lora(cfg, 3, 1))  # reuses the freed slot; a stale slot would leak "a"'s weights
    torch.testing.assert_close(run(model, eng, ["c", "b", None]), before, **TOL[torch.float32])


@pytest.mark.parametrize("offload", [False, True])
def test_lru_eviction_reloads_on_demand(model, tmp_path, offload):
    cfg = model.cfg
    full = Engine(model, backend="reference")
    small = Engine(model, backend="reference", capacity=2, offload_dir=tmp_path if offload else None)
    mods = {f"u{i}": lora(cfg, 1 + i, 10 + i) for i in range(5)}
    for u, m in mods.items():
        full.register(u, m)
        small.register(u, copy.deepcopy(m))
    assert small.memory_report()["resident_users"] == 2
    if offload:
        assert small.store.has("u0") and small.store.root.parent == tmp_path and small.users["u0"] == "disk"
    for rows in (["u0", "u1"], ["u4", "u0"], ["u2", None], ["u3", "u1"]):
        torch.testing.assert_close(run(model, small, rows), run(model, full, rows), **TOL[torch.float32])
    with pytest.raises(RuntimeError, match="capacity 2"):
        small.batch(["u0", "u1", "u2"])


def test_memory_report_counts_parameters(model):
    cfg = model.cfg
    eng = Engine(model, backend="reference")
    eng.register("a", lora(cfg, 4, 1))
    eng.register("h", adapter_module(cfg, "houlsby", 5, "silu", 1))
    rep = eng.memory_report()
    assert rep["users"]["a"]["lora"]["params"] == 4 * (cfg.d_model + cfg.inner_dim) + 4 * (cfg.d_ff + cfg.d_model)
    n_sites = 2 * (cfg.num_layers + cfg.n_dec_layers)
    assert rep["users"]["h"]["houlsby"]["params"] == n_sites * (2 * 5 * cfg.d_model + 5 + cfg.d_model)
    assert rep["bank_bytes"] >= rep["resident_floor_bytes"] > 0


def test_save_load_user_is_atomic_and_exact(model, tmp_path, monkeypatch):
    cfg = model.cfg
    mods = [lora(cfg, 3, 1), adapter_module(cfg, "pfeiffer", 4, "relu", 2)]
    save_user(tmp_path / "u", mods)
    back = load_user(tmp_path / "u")
    assert sorted(m.method for m in back) == ["lora", "pfeiffer"]
    for m in back:
        src = next(x for x in mods if x.method == m.method)
        assert m.config == src.config and all(torch.equal(m.tensors[k], src.tensors[k]) for k in src.tensors)
    files = lambda: {p.name: p.read_bytes() for p in (tmp_path / "u").iterdir()}
    before = files()
    good = next(v for k, v in before.items() if k.startswith("lora."))

    class Crash(Exception):
        pass

    def crash_midway(tensors, path, metadata=None):  # a writer that dies after writing half a file
        with open(path, "wb") as f:
            f.write(good[: len(good) // 2])
        raise Crash

    import peftu_kernels.io as pio
    monkeypatch.setattr(pio, "save_file", crash_midway)
    with pytest.raises(Crash):
        save_user(tmp_path / "u", [lora(cfg, 3, 5)])
    assert files() == before  # the old set, whole; no temporaries left
    back2 = load_user(tmp_path / "u")
    assert sorted(m.method for m in back2) == ["lora", "pfeiffer"]


BAD = {
    "unknown target": lambda c: lora(c, 2, 0, sites=("encoder.block.0.layer.0.SelfAttention.qq",)),
    "rank mismatch": lambda c: UserModule("lora", {**lora(c, 2, 0).tensors}, {"r": 3}),
    "nan": lambda c: UserModule("lora", {k: v.masked_fill(torch.rand_like(v) < 0.1, float("nan"))
                                         for k, v in lora(c, 2, 0).tensors.items()}, {"r": 2}),
    "int dtype": lambda c: UserModule("ia3", {"encoder.block.0.layer.0.SelfAttention.k.ia3_out":
                                              torch.ones(c.inner_dim, dtype=torch.long)}),
    "ia3 shape": lambda c: UserModule("ia3", {"encoder.block.0.layer.0.SelfAttention.k.ia3_out": torch.ones(5)}),
    "prompt width": lambda c: UserModule("prompt", {"prompt": torch.randn(4, c.d_model + 1)}),
    "adapter site": lambda c: adapter_module(c, "houlsby", 3, "relu", 0, sites=["encoder.block.9.layer.0"]),
    "activation": lambda c: UserModule("pfeiffer", adapter_module(c, "pfeiffer", 3, "relu", 0).tensors, {"act": "?"}),
    "method": lambda c: UserModule("no-such-method", {"x": torch.ones(1)}),
}
MESSAGES = {"unknown target": "does not exist", "rank mismatch": "do not fit", "nan": "NaN", "int dtype": "floating",
            "ia3 shape": "shape", "prompt width": "d_model", "adapter site": "not a sub-layer",
            "activation": "activation", "method": "unknown method"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_modules_are_refused_and_nothing_changes(model, case):
    eng = Engine(model, backend="reference")
    eng.register("keep", lora(model.cfg, 2, 1))
    before = snapshot(eng)
    ref = run(model, eng, ["keep"])
    with pytest.raises(ValueError, match=MESSAGES[case]):
        eng.register("new", BAD[case](model.cfg))
    with pytest.raises(ValueError, match=MESSAGES[case]):
        eng.register("keep", BAD[case](model.cfg), replace=True)
    same(before, snapshot(eng))
    torch.testing.assert_close(run(model, eng, ["keep"]), ref, **TOL[torch.float32])


def test_duplicate_and_unknown_users(model):
    eng = Engine(model, backend="reference")
    eng.register("a", lora(model.cfg, 2, 1))
    with pytest.raises(ValueError, match="already registered"):
        eng.register("a", lora(model.cfg, 2, 1))
    with pytest.raises(KeyError, match="unknown user id 'zz'"):
        eng.batch(["a", "zz"])
    with pytest.raises(KeyError, match="unknown user id"):
        eng.remove("zz")


def test_corrupt_files_are_named(model, tmp_path):
    save_user(tmp_path / "u", [lora(model.cfg, 2, 1)])
    f = next((tmp_path / "u").glob("lora.*.safetensors"))
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ValueError, match=f.name):
        load_user(tmp_path / "u")
    with pytest.raises(FileNotFoundError, match="no module files"):
        load_user(tmp_path / "empty")


def test_unsupported_peft_folders(model, tmp_path):
    import json
    from peftu_kernels.io import save_tensors
    d = tmp_path / "dora"
    q = "base_model.model.encoder.block.0.layer.0.SelfAttention.q"
    save_tensors(d / "adapter_model.safetensors", {q + ".lora_A.weight": torch.ones(2, 36),
                                                   q + ".lora_B.weight": torch.ones(36, 2)})
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True, "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(ValueError, match="DoRA needs magnitude"):  # a DoRA folder without its magnitudes
        import_peft(d, model)
    save_tensors(d / "adapter_model.safetensors", {q + ".lora_A.weight": torch.ones(2, 36)})
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(ValueError, match="LOHA"):
        import_peft(d, model)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(ValueError, match="needs both lora_A and lora_B"):
        import_peft(d, model)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        import_peft(d, model)


def test_bank_with_known_capacity_has_no_slack(model):
    cfg = model.cfg
    eng = Engine(model, backend="reference", capacity=13)
    for i in range(13):
        eng.register(f"u{i}", lora(cfg, 4, i))
    rep = eng.memory_report()
    assert eng.banks["lora"].slots == 13
    tensors = rep["resident_floor_bytes"]
    assert tensors <= rep["bank_bytes"] <= 1.05 * tensors  # scale and rank per slot are the only extra
