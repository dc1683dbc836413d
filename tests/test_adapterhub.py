"""AdapterHub folders served with the `adapters` library's exact semantics (fixtures made by that library,
see tests/fixtures/make_adapterhub.py), alone and in mixed batches with HF PEFT users."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tol
from peft_users import peft_model
from peftu_kernels import load_pretrained
from peftu_kernels.generate import greedy
from peftu_kernels.tenancy import Engine
from peftu_kernels.tenancy.adapterhub import export_adapterhub, import_adapterhub
from peftu_kernels.tenancy.hf_peft import import_peft

FIX = Path(__file__).parent / "fixtures" / "adapterhub"
NAMES = ["houlsby", "pfeiffer", "ia3", "lora", "prefix_mlp", "prefix_flat"]
TOL = tol(torch.float32, "fixture")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    model = load_pretrained(FIX / "base").eval()
    exp = load_file(str(FIX / "expected.safetensors"))
    eng = Engine(model, backend="reference")
    for n in NAMES:
        eng.register(n, import_adapterhub(FIX / n, model))
    # HF PEFT users on the same base (PEFT's own prefix semantics) for the mixed batch
    import peft
    import transformers
    hf = transformers.T5ForConditionalGeneration.from_pretrained(FIX / "base").eval()
    root, oracles = tmp_path_factory.mktemp("peft"), {}
    S = "SEQ_2_SEQ_LM"
    configs = {"peft_lora": peft.LoraConfig(task_type=S, r=3, lora_alpha=6, target_modules=["q", "wo"]),
               "peft_prefix": peft.PrefixTuningConfig(task_type=S, num_virtual_tokens=5),
               "peft_ia3": peft.IA3Config(task_type=S),
               "peft_prompt": peft.PromptTuningConfig(task_type=S, num_virtual_tokens=4),
               "peft_ptuning": peft.PromptEncoderConfig(task_type=S, num_virtual_tokens=3, encoder_hidden_size=16)}
    for i, (name, pc) in enumerate(configs.items()):
        pm = peft_model(hf, pc, seed=len(name) + i)
        pm.save_pretrained(root / name)
        oracles[name] = pm
        eng.register(name, import_peft(root / name, model))
    return model, exp, eng, oracles


def test_fixtures_change_the_output(world):
    model, exp, eng, _ = world
    base = exp["base.logits"]
    with torch.no_grad():
        ours = model(exp["input_ids"], exp["decoder_input_ids"], exp["attention_mask"])
    torch.testing.assert_close(ours, base, **TOL)  # the base itself loads exactly
    for n in NAMES:
        assert (exp[f"{n}.logits"] - base).abs().max() > 1e-2, n


@pytest.mark.parametrize("name", NAMES)
def test_each_adapter_alone_matches_adapterhub(world, name):
    model, exp, eng, _ = world
    ids, mask, dec = exp["input_ids"], exp["attention_mask"], exp["decoder_input_ids"]
    peft = eng.batch([name] * ids.shape[0])
    with torch.no_grad():
        got = model(ids, dec, mask, peft=peft)
    torch.testing.assert_close(got, exp[f"{name}.logits"], **TOL)
    gen = greedy(model, ids, mask, 5, peft=eng.batch([name] * ids.shape[0]))
    ref = exp[f"{name}.greedy"]
    assert torch.equal(gen, ref[:, :gen.shape[1]]), (name, gen, ref)


def test_mixed_batch_of_adapterhub_and_peft_users(world):
    model, exp, eng, oracles = world
    ids, mask, dec = exp["input_ids"], exp["attention_mask"], exp["decoder_input_ids"]
    users = NAMES + list(oracles)
    rows = [(u, i) for u in users for i in range(ids.shape[0])][::-1]
    sel = torch.tensor([i for _, i in rows])
    with torch.no_grad():
        got = model(ids[sel], dec[sel], mask[sel], peft=eng.batch([u for u, _ in rows]))
        gen = greedy(model, ids[sel], mask[sel], 5, peft=eng.batch([u for u, _ in rows]))
    for r, (u, i) in enumerate(rows):
        if u in oracles:
            with torch.no_grad():
                ref = oracles[u](input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1],
                                 decoder_input_ids=dec[i:i + 1]).logits[0]
        else:
            ref = exp[f"{u}.logits"][i]
            n = min(gen.shape[1], exp[f"{u}.greedy"].shape[1])
            assert torch.equal(gen[r, :n], exp[f"{u}.greedy"][i, :n]), (u, i)
        torch.testing.assert_close(got[r], ref, **TOL, msg=lambda m: f"row {r} user {u}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_gives_identical_tensors(world, tmp_path, name):
    model, exp, eng, _ = world
    mod = eng.modules(name)[0]
    export_adapterhub(mod, tmp_path / name, model, name=name)
    again = import_adapterhub(tmp_path / name, model)
    assert again.method == mod.method and again.tensors.keys() == mod.tensors.keys()
    for k in mod.tensors:
        assert torch.equal(again.tensors[k], mod.tensors[k]), k


def test_an_rslora_user_keeps_its_scale_through_adapterhub(world, tmp_path):
    """AdapterHub scales by alpha / r and has no rsLoRA flag: the export folds alpha / sqrt(r) into alpha, so the
    user read back serves what it served (and what a LoRA of alpha / r would not)."""
    from peftu_kernels.tenancy.methods.lora import lora_scale
    model, _, eng, _ = world
    mod = eng.modules("lora")[0]
    mod.config.update(use_rslora=True, r=4, alpha=8)
    mod.tensors = {k: (v[:4] if k.endswith("lora_A") else v[:, :4]).clone() for k, v in mod.tensors.items()}
    export_adapterhub(mod, tmp_path / "rs", model, name="rs")
    again = import_adapterhub(tmp_path / "rs", model)
    assert lora_scale(again.config) == pytest.approx(8 / 4 ** 0.5) != 8 / 4
    ids = torch.randint(3, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (mod, again):
        e = Engine(model, backend="reference")
        e.register("u", m)
        with torch.no_grad():
            outs.append(model(ids, ids[:, :3], peft=e.batch(["u", "u"])))
    torch.testing.assert_close(outs[1], outs[0], **TOL)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "bart"}, "model_type 'bart'"),
    ({"config": {"architecture": "union"}}, "architecture 'union'"),
    ({"config.use_gating": True}, "use_gating=True"),
    ({"config.phm_layer": True}, "phm_layer=True"),
    ({"config.non_linearity": "mish"}, "non_linearity 'mish'"),
    ({"config.mh_adapter": False}, "neither Houlsby"),
])
def test_unsupported_configs_are_refused_and_nothing_is_registered(world, tmp_path, change, message):
    model, exp, eng, _ = world
    d = tmp_path / "a"
    shutil.copytree(FIX / "houlsby", d)
    meta = json.loads((d / "adapter_config.json").read_text())
    for k, v in change.items():
        if k.startswith("config."):
            meta["config"][k.split(".", 1)[1]] = v
        else:
            meta[k] = v
    (d / "adapter_config.json").write_text(json.dumps(meta))
    before = list(eng.users)
    with pytest.raises(ValueError, match=message):
        eng.register("new", import_adapterhub(d, model))
    assert list(eng.users) == before


def test_safetensors_form_loads_too(world, tmp_path):
    from safetensors.torch import save_file
    model, exp, eng, _ = world
    d = tmp_path / "lora"
    shutil.copytree(FIX / "lora", d)
    sd = torch.load(d / "pytorch_adapter.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "adapter.safetensors"))
    (d / "pytorch_adapter.bin").unlink()
    a, b = import_adapterhub(d, model), eng.modules("lora")[0]
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in b.tensors)


def _alone(world, user, i, ids, mask, dec):
    """Row i's logits for `user` alone: the adapters library's (fixtures), PEFT's, or the base's."""
    model, exp, eng, oracles = world
    if user is None:
        return exp["base.logits"][i]
    if user in oracles:
        with torch.no_grad():
            return oracles[user](input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1],
                                 decoder_input_ids=dec[i:i + 1]).logits[0]
    return exp[f"{user}.logits"][i]


def test_every_pair_of_method_kinds_in_one_batch(world):
    """Each pair of kinds (AdapterHub and PEFT forms, and rows with no user) shares a batch; every row equals
    that user alone, logits compared (a tokens-only check misses position bugs such as an AdapterHub prefix
    beside a prompt-tuning user)."""
    model, exp, eng, oracles = world
    ids, mask, dec = exp["input_ids"], exp["attention_mask"], exp["decoder_input_ids"]
    kinds = NAMES + list(oracles) + [None]
    n = ids.shape[0]
    for a in kinds:
        for b in kinds:
            rows = [(a, 0), (b, 1 % n), (a, (n - 1))]
            sel = torch.tensor([i for _, i in rows])
            with torch.no_grad():
                got = model(ids[sel], dec[sel], mask[sel], peft=eng.batch([u for u, _ in rows]))
            for r, (u, i) in enumerate(rows):
                torch.testing.assert_close(got[r], _alone(world, u, i, ids, mask, dec), **TOL,
                                           msg=lambda m: f"pair ({a}, {b}) row {r} user {u}: {m}")
