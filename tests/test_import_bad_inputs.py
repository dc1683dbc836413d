"""Importers: every bad folder is refused with an error naming what is wrong, nothing gets registered, and the
folder itself is left as it was."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from peftu_kernels import load_pretrained
from peftu_kernels.io import save_tensors
from peftu_kernels.tenancy import Engine
from peftu_kernels.tenancy.adapterhub import import_adapterhub
from peftu_kernels.tenancy.hf_peft import export_peft, import_peft
from tenancy_users import make

FIX = Path(__file__).parent / "fixtures" / "adapterhub"


@pytest.fixture(scope="module")
def model():
    return load_pretrained(FIX / "base").eval()


def _cfg(d):
    return json.loads((d / "adapter_config.json").read_text())


def _set(d, **kw):
    c = _cfg(d)
    for k, v in kw.items():
        if v is KeyError:
            c.pop(k, None)
        else:
            c[k] = v
    (d / "adapter_config.json").write_text(json.dumps(c))


def _files(d):
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _refused(model, d, importer, msg):
    eng = Engine(model, backend="reference")
    eng.register("keep", make(model.cfg, "ia3", 1))
    files = _files(d)
    with pytest.raises((ValueError, FileNotFoundError), match=msg):  # a missing file: FileNotFoundError
        eng.register("new", importer(d, model))
    assert list(eng.users) == ["keep"] and _files(d) == files


def _peft(model, tmp_path, kind):
    d = tmp_path / kind
    export_peft(make(model.cfg, kind, 3)[0], d, model)
    return d


def _extra_tensor(d, name):
    from safetensors.torch import load_file
    w = load_file(str(d / "adapter_model.safetensors"))
    k = next(iter(w))
    w[k.rsplit(".", 2)[0] + name] = torch.ones(3)
    save_tensors(d / "adapter_model.safetensors", w)


PEFT_CASES = {
    "config is a list": ("lora", lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "JSON object"),
    "lora without r": ("lora", lambda d: _set(d, r=KeyError), "rank r must be a positive int"),
    "lora r a string": ("lora", lambda d: _set(d, r="4"), "rank r must be a positive int"),
    "lora r zero": ("lora", lambda d: _set(d, r=0), "rank r must be a positive int"),
    "lora alpha a string": ("lora", lambda d: _set(d, lora_alpha="big"), "lora_alpha must be a number"),
    "target_modules disagree": ("lora", lambda d: _set(d, target_modules=["k"]), "target_modules"),
    "target regex disagrees": ("lora", lambda d: _set(d, target_modules=r".*\.k"), "target_modules"),
    "bd-lora": ("lora", lambda d: _set(d, use_bdlora={"nblocks": 2}), "use_bdlora"),
    "kasa": ("lora", lambda d: _set(d, kasa_config={"x": 1}), "kasa_config"),
    "dora without magnitudes": ("lora", lambda d: _set(d, use_dora=True), "DoRA needs magnitude"),
    "unknown option": ("lora", lambda d: _set(d, shiny_new_config={"on": True}), "shiny_new_config"),
    "pissa init": ("lora", lambda d: _set(d, init_lora_weights="pissa"), "rewrites the base weights"),
    "extra tensor": ("lora", lambda d: _extra_tensor(d, ".lora_diag.weight"), "not a LoRA A/B weight"),
    "modules_to_save on lora": ("lora", lambda d: _set(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "modules_to_save on prompt": ("prompt", lambda d: _set(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "virtual tokens negative": ("prompt", lambda d: _set(d, num_virtual_tokens=-2), "num_virtual_tokens"),
    "virtual tokens a string": ("prompt", lambda d: _set(d, num_virtual_tokens="3"), "num_virtual_tokens"),
    "virtual tokens missing": ("prompt", lambda d: _set(d, num_virtual_tokens=KeyError), "num_virtual_tokens"),
    "virtual tokens too many": ("prompt", lambda d: _set(d, num_virtual_tokens=999), "num_virtual_tokens=999"),
    "ptuning modules_to_save": ("ptuning", lambda d: _set(d, modules_to_save=["shared"]), "modules_to_save"),
    "task type": ("ia3", lambda d: _set(d, task_type="CAUSAL_LM"), "CAUSAL_LM"),
    "no weights": ("ia3", lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model"),
    "bin not a dict": ("ia3", lambda d: ((d / "adapter_model.safetensors").unlink(),
                                         torch.save([torch.ones(2)], d / "adapter_model.bin")), "not a dict of named"),
    "bin of non-tensors": ("ia3", lambda d: ((d / "adapter_model.safetensors").unlink(),
                                             torch.save({"a": 1}, d / "adapter_model.bin")), "not a dict of named"),
    "truncated weights": ("ia3", lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00"), "not a readable"),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_bad_peft_folders(model, tmp_path, case):
    kind, spoil, msg = PEFT_CASES[case]
    d = _peft(model, tmp_path, kind)
    import_peft(d, model)  # fine before it is spoiled
    spoil(d)
    _refused(model, d, import_peft, msg)


def _ah(tmp_path, name):
    d = tmp_path / name
    shutil.copytree(FIX / name, d)
    return d


def _ah_set(d, **kw):
    c = _cfg(d)
    for k, v in kw.items():
        if v is KeyError:
            c["config"].pop(k, None)
        else:
            c["config"][k] = v
    (d / "adapter_config.json").write_text(json.dumps(c))


def _drop(d, part):
    w = torch.load(d / "pytorch_adapter.bin", weights_only=True)
    torch.save({k: v for k, v in w.items() if part not in k}, d / "pytorch_adapter.bin")


AH_CASES = {
    "config is a list": ("houlsby", lambda d: (d / "adapter_config.json").write_text("[]"), "JSON object"),
    "prefix without length": ("prefix_flat", lambda d: _ah_set(d, prefix_length=KeyError), "prefix_length"),
    "prefix length a string": ("prefix_flat", lambda d: _ah_set(d, prefix_length="5"), "prefix_length"),
    "prefix length wrong (flat)": ("prefix_flat", lambda d: _ah_set(d, prefix_length=7), "prefix_length|layers"),
    "prefix length wrong (mlp)": ("prefix_mlp", lambda d: _ah_set(d, prefix_length=3), "prefix_length"),
    "mlp weights missing": ("prefix_mlp", lambda d: _drop(d, "control_trans.2.bias"), "MLP prefix without"),
    "bottleneck extra tensor": ("houlsby", lambda d: _drop(d, "adapter_up.bias"), "up_bias"),
    "reduction factor missing": ("houlsby", lambda d: _ah_set(d, reduction_factor=KeyError), "reduction_factor"),
    "ia3 rank": ("ia3", lambda d: _ah_set(d, r=2), "r == 1"),
}


@pytest.mark.parametrize("case", list(AH_CASES))
def test_bad_adapterhub_folders(model, tmp_path, case):
    name, spoil, msg = AH_CASES[case]
    d = _ah(tmp_path, name)
    import_adapterhub(d, model)
    spoil(d)
    _refused(model, d, import_adapterhub, msg)
