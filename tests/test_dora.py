"""DoRA, the method added through the registry: HF PEFT parity (served alone and beside every other method),
both of its parts change the output, the per-user column norm without a per-row weight, export, gradients
as PEFT's, and the Triton op (forward and backward) against the reference."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_rel_close, hf_twin, tol
from peft_users import PEFT_CFG, peft_model
from tenancy_users import KINDS, make
from peftu_kernels.config import T5Config
from peftu_kernels.generate import greedy
from peftu_kernels.ops import dora as D
from peftu_kernels.tenancy import Engine, UserModule
from peftu_kernels.tenancy.hf_peft import export_peft, import_peft


def dora_config(**kw):
    import peft
    return peft.LoraConfig(task_type="SEQ_2_SEQ_LM", use_dora=True, **{"r": 4, "lora_alpha": 8,
                                                                       "target_modules": ["q", "v", "wi_1"], **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = T5Config(**PEFT_CFG)
    hf, ours = hf_twin(cfg, seed=21)
    root = tmp_path_factory.mktemp("dora")
    pms, eng = {}, Engine(ours, backend="reference")
    for i, pc in enumerate([dora_config(), dora_config(r=2, lora_alpha=3, target_modules=["k", "o", "wo"])]):
        pms[f"d{i}"] = pm = peft_model(hf, pc, seed=300 + i)
        pm.save_pretrained(root / f"d{i}")
        eng.register(f"d{i}", import_peft(root / f"d{i}", ours))
    return cfg, hf, ours, eng, pms, root


def data(cfg, B, seed=0, L=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (B, L), generator=g)
    return ids, torch.ones_like(ids), torch.randint(3, cfg.vocab_size, (B, 3), generator=g)


def test_dora_norm_equals_the_materialised_norm():
    """The expanded form equals ||W + s B A||_row computed on the full weight (fp64 oracle)."""
    @settings(max_examples=30, deadline=None)
    @given(st.integers(1, 9), st.integers(1, 13), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31))
    def check(out, inp, r, U, seed):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(out, inp, generator=g)
        A, B = torch.randn(U, r, inp, generator=g), torch.randn(U, out, r, generator=g) * 0.3
        s = torch.rand(U, generator=g) * 4
        want = torch.stack([(W.double() + s[u].double() * B[u].double() @ A[u].double()).norm(dim=1) for u in range(U)])
        torch.testing.assert_close(D.dora_norm(W, A, B, s).double(), want, rtol=1e-5, atol=1e-5)
    check()


def test_served_alone_equals_peft(world):
    cfg, hf, ours, eng, pms, _ = world
    ids, mask, dec = data(cfg, 3)
    with torch.no_grad():
        base = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        for u, pm in pms.items():
            ref = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            assert (ref - base).abs().max() > 1e-2, u  # the adapter changes the output at all
            assert_rel_close(ours(ids, dec, mask, peft=eng.batch([u] * 3)), ref, msg=lambda m: f"{u}: {m}")
            assert torch.equal(greedy(ours, ids, mask, 5, peft=eng.batch([u] * 3)),
                               pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                           num_beams=1)[:, 1:6])


def test_magnitude_and_direction_both_change_the_output(world):
    """m alone (same A, B) and the direction alone (same m) each move the logits; so does DoRA vs plain LoRA."""
    cfg, hf, ours, eng, pms, _ = world
    mod = eng.modules("d0")[0]
    ids, mask, dec = data(cfg, 2, seed=3)
    variants = {"mag x1.3": {k: v * 1.3 if k.endswith(".magnitude") else v for k, v in mod.tensors.items()},
                "B x0.5": {k: v * 0.5 if k.endswith(".lora_B") else v for k, v in mod.tensors.items()}}
    e = Engine(ours, backend="reference")
    e.register("orig", mod)
    e.register("lora", UserModule("lora", {k: v for k, v in mod.tensors.items() if not k.endswith(".magnitude")},
                                  dict(mod.config)))
    for name, t in variants.items():
        e.register(name, UserModule("dora", t, dict(mod.config)))
    with torch.no_grad():
        out = {u: ours(ids, dec, mask, peft=e.batch([u, u])) for u in ["orig", "lora", *variants]}
    for u in ["lora", *variants]:
        assert (out[u] - out["orig"]).abs().max() > 1e-3, u


def test_mixed_with_every_other_method_each_row_equals_alone(world):
    cfg, hf, ours, eng, pms, _ = world
    e = Engine(ours, backend="reference")
    for u, pm in pms.items():
        e.register(u, eng.modules(u))
    others = [k for k in KINDS if k != "dora"]
    for i, k in enumerate(others):
        e.register(k, make(cfg, k, i))
    rows = []
    for k in others + [None]:
        rows += ["d0", k, "d1"]
    ids, mask, dec = data(cfg, len(rows), seed=5)
    with torch.no_grad():
        got = ours(ids, dec, mask, peft=e.batch(rows))
        for b, u in enumerate(rows):
            if u in pms:  # HF PEFT is the oracle for DoRA rows
                ref = pms[u](input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], decoder_input_ids=dec[b:b + 1]).logits
            else:
                ref = ours(ids[b:b + 1], dec[b:b + 1], mask[b:b + 1], peft=e.batch([u]))
            assert_rel_close(got[b:b + 1], ref, msg=lambda m: f"row {b} user {u}: {m}")


def test_peft_folder_round_trip(world, tmp_path):
    import peft
    cfg, hf, ours, eng, pms, _ = world
    mod = eng.modules("d1")[0]
    export_peft(mod, tmp_path / "x", ours)
    again = import_peft(tmp_path / "x", ours)
    assert again.method == "dora" and again.tensors.keys() == mod.tensors.keys()
    for k in mod.tensors:
        assert torch.equal(again.tensors[k], mod.tensors[k]), k
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "x").eval()
    ids, mask, dec = data(cfg, 2, seed=7)
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                         pms["d1"](input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


def test_gradients_equal_peft(world):
    """One backward of the same loss: the grads of A, B and the magnitude equal PEFT's (its norm detached)."""
    cfg, hf, ours, eng, pms, _ = world
    e = Engine(ours, backend="reference", dtype=torch.float32)
    e.register("d0", eng.modules("d0"))
    view = e.train_view(["d0"])
    pm = copy.deepcopy(pms["d0"]).train()
    for mod_ in pm.modules():
        if isinstance(mod_, torch.nn.Dropout):
            mod_.p = 0.0
    ids, mask, dec = data(cfg, 3, seed=9)
    labels = torch.randint(3, cfg.vocab_size, (3, 3))
    view.before_forward(["d0"])
    logits = ours(ids, ours.shift_right(labels), mask, peft=e.batch(["d0"] * 3))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    bank, slot = view.bank, view.slot["d0"]
    r, seen = e.modules("d0")[0].config["r"], set()
    for name, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        site, part = name[len("base_model.model."):].split(".lora_")
        g, part = bank.sites[site], part.split(".")[0]
        got = {"A": lambda: g["A"].grad[slot, :r], "B": lambda: g["B"].grad[slot, :, :r],
               "magnitude_vector": lambda: g["m"].grad[slot]}[part]()
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(got, p.grad, **tol(), msg=lambda m: f"{name}: {m}")
        seen.add((site, part))
    assert len(seen) == 3 * len(bank.sites) > 0


# --- the Triton op, under the interpreter on CPU ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", [(1, 1, 17, 23, [1], "distinct"), (6, 19, 31, 45, [1, 16, 3, 64], "zipf"),
                                  (7, 2, 64, 48, [4, 9, 2, 5, 7], "uniform"), (4, 9, 24, 20, [5, 5, 5], "same")],
                         ids=lambda c: f"B{c[0]}L{c[1]}K{c[2]}N{c[3]}-{c[5]}")
def test_triton_dora_matches_reference(case, dtype):
    pytest.importorskip("triton", reason="triton is not installed")
    from test_triton_ops import lora_inputs
    from peftu_kernels.triton.dora import dora_into
    B, L, K, N, ranks, pop = case
    y, x, A, Bw, scale, slots, rank = lora_inputs(B, L, K, N, ranks, pop, dtype, seed=B + L)
    gain = 0.5 + torch.rand(len(ranks), N, generator=torch.Generator().manual_seed(L))
    ref = D.dora(y.float(), x.float(), A.float(), Bw.float(), scale, gain, slots)
    out = torch.full_like(y, float("nan"))  # poisoned: every element must be written
    got = dora_into(out, y, x, A, Bw, scale, gain.to(y.device), slots, rank)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), ref, **tol(dtype, "kernel"))
    off = slots < 0
    assert torch.equal(got[off], y[off])  # rows without a DoRA user are copied


def test_triton_dora_gradients_match_reference():
    pytest.importorskip("triton", reason="triton is not installed")
    from test_triton_ops import lora_inputs
    from peftu_kernels.ops.segments import make_segments
    from peftu_kernels.triton.dora import dora as triton_dora
    y, x, A, Bw, scale, slots, rank = lora_inputs(7, 3, 20, 13, [2, 5, 3, 1], "uniform", torch.float32, seed=4)
    m = (1 + torch.rand(4, 13)).requires_grad_(True)
    norm = 1 + torch.rand(4, 13)
    seg = make_segments(slots)
    grads = []
    for fn in (D.dora, triton_dora):
        ts = [t.detach().clone().requires_grad_(True) for t in (y, x, A, Bw)]
        mm = m.detach().clone().requires_grad_(True)
        out = fn(*ts, scale, mm / norm, slots, rank, seg)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
        grads.append([out.detach()] + [t.grad for t in ts] + [mm.grad])
    for name, a, b in zip(["out", "y", "x", "A", "B", "magnitude"], *grads):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(b, a, **tol(torch.float32, "kernel"), msg=lambda msg: f"grad {name}: {msg}")


def test_bad_dora_modules_are_refused(world):
    cfg, hf, ours, eng, pms, root = world
    mod = eng.modules("d0")[0]
    site = mod.sites()[0]
    bad = {"no magnitude": {k: v for k, v in mod.tensors.items() if k != site + ".magnitude"},
           "short magnitude": {**mod.tensors, site + ".magnitude": mod.tensors[site + ".magnitude"][:-1]}}
    e = Engine(ours, backend="reference")
    for name, t in bad.items():
        with pytest.raises(ValueError, match="magnitude"):
            e.register(name, UserModule("dora", t, dict(mod.config)))
    assert not e.users
