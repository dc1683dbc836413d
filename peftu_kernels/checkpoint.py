"""Load and save Hugging Face T5 checkpoints (config.json + safetensors) into our T5, by HF's own names."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import T5Config
from .io import load_json, load_tensors, load_weights, save_json, save_tensors
from .t5 import T5

# keys HF checkpoints carry that our model does not need (tied copies, an unused bias table)
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def resolve(name_or_path) -> Path:
    """A local folder, else a hub id downloaded to the HF cache; a clear error when neither works."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") > 1:
        raise FileNotFoundError(f"{name_or_path}: not a checkpoint folder")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.model"]))
    except Exception as e:  # offline, unknown id, no permission ...
        raise FileNotFoundError(f"{name_or_path}: no local folder of that name, and the hub could not give it "
                                f"({type(e).__name__}: {e})") from e


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(load_json(index)["weight_map"].values()))
        state = {}
        for f in files:
            state.update(load_tensors(folder / f))
        return state
    return load_weights(folder, "model.safetensors", "pytorch_model.bin")


def load_state(model: T5, state: dict[str, torch.Tensor], source: str = "state dict") -> T5:
    """Copy HF-named weights into `model`, refusing missing, unexpected or wrongly shaped tensors."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k not in _IGNORED and not (k == "lm_head.weight" and model.lm_head is None)}
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{source}: weights do not fit this config: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}")
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise ValueError(f"{source}: {k} is not a finite floating-point tensor (holds NaN/Inf or is {v.dtype})")
    model.load_state_dict(state, strict=True)
    return model


def load_pretrained(name_or_path, dtype=torch.float32, device="cpu") -> T5:
    folder = resolve(name_or_path)
    cfg_path = folder / "config.json"
    try:
        cfg = T5Config.from_hf(load_json(cfg_path))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    model = T5(cfg)
    load_state(model, _read_weights(folder), str(folder))
    return model.to(device=device, dtype=dtype)


def save_pretrained(model: T5, folder) -> None:
    folder = Path(folder)
    save_json(folder / "config.json", model.cfg.to_hf())
    state = model.state_dict()
    if model.lm_head is None:  # HF writes tied heads too; harmless and lets strict loaders pass
        state["lm_head.weight"] = state["shared.weight"]
    save_tensors(folder / "model.safetensors", {k: v.clone() for k, v in state.items()}, {"format": "pt"})


def to_hf(model: T5):
    """The same model as a transformers T5ForConditionalGeneration (weights copied, eval mode, float32 on the
    CPU): the oracle that tests and benchmarks compare against, and a way out to the HF stack."""
    import transformers
    hcfg = transformers.T5Config(**{k: v for k, v in model.cfg.to_hf().items() if k != "architectures"})
    hf = transformers.T5ForConditionalGeneration(hcfg)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    hf.load_state_dict(state, strict=False)  # its embed_tokens copies follow `shared`
    if model.lm_head is not None:  # HF ties head and `shared` unless told otherwise
        hf.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().float().cpu().clone())
    return hf.eval()
