"""HF checkpoint folders: load, save, round trip, and clear errors for bad folders."""
import json

import pytest
import torch

from helpers import TOL, hf_twin, padded_batch, small_cfg
from peftu_kernels.checkpoint import load_pretrained, save_pretrained
from peftu_kernels.config import T5Config
from peftu_kernels.t5 import T5


@pytest.fixture
def hf_folder(tmp_path):
    cfg = small_cfg("gated-untied")
    hf, _ = hf_twin(cfg, seed=7)
    hf.save_pretrained(tmp_path / "hf")
    return cfg, hf, tmp_path / "hf"


def test_transformers_checkpoint_loads_and_round_trips(hf_folder, tmp_path):
    cfg, hf, folder = hf_folder
    saved = json.loads((folder / "config.json").read_text())
    ours = load_pretrained(folder).eval()
    ids, mask = padded_batch(cfg.vocab_size)
    dec = torch.randint(3, cfg.vocab_size, (ids.shape[0], 4))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(ours(ids, dec, mask), ref, **TOL[torch.float32])
    # transformers 5.x writes tie_word_embeddings=True for every T5; the untied head must still load untied
    assert saved["tie_word_embeddings"] is True and ours.lm_head is not None
    save_pretrained(ours, tmp_path / "ours")
    again = load_pretrained(tmp_path / "ours")
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    import transformers  # and transformers reads what we wrote
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   ref, **TOL[torch.float32])


def test_presets_have_the_real_shapes():
    base = T5Config.from_name("google/flan-t5-base")
    assert (base.d_model, base.d_ff, base.num_layers, base.num_heads, base.vocab_size) == (768, 2048, 12, 12, 32128)
    m = T5(T5Config.from_name("flan-t5-small"))
    n = sum(p.numel() for p in m.parameters())
    assert 76_000_000 < n < 78_000_000  # flan-t5-small has 76.96M parameters
    with pytest.raises(KeyError, match="unknown preset"):
        T5Config.from_name("flan-t5-giant")


def test_missing_folder_and_hub_failure_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        load_pretrained("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        load_pretrained(tmp_path / "absent" / "x" / "y")


def test_corrupt_and_missing_weights_name_the_file(hf_folder):
    _, _, folder = hf_folder
    w = folder / "model.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_pretrained(folder)
    w.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(folder)


def test_unrunnable_config_is_refused(hf_folder):
    _, _, folder = hf_folder
    c = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**c, "feed_forward_proj": "gated-swishy"}))
    with pytest.raises(ValueError, match="config.json.*gated-swishy"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**c, "model_type": "bart"}))
    with pytest.raises(ValueError, match="bart"):
        load_pretrained(folder)


def test_weights_of_wrong_shape_are_named(hf_folder, tmp_path):
    cfg, _, folder = hf_folder
    c = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**c, "d_ff": cfg.d_ff + 1}))
    with pytest.raises(ValueError, match="DenseReluDense.wi_0.weight has shape"):
        load_pretrained(folder)
