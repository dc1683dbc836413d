import pytest

from peftu_kernels.tokenizer import load_tokenizer, train_tokenizer

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(300)] + \
        ["Hateful", "Non-hateful", "normal", "offensive", "hatespeech"] * 20


def test_tokenizer_trains_saves_and_reloads(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=300, folder=tmp_path / "tok")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("the lazy dog").input_ids
    assert ids[-1] == 1 and 2 not in ids
    again = load_tokenizer(tmp_path / "tok")
    assert again("the lazy dog").input_ids == ids
    assert again.decode(ids, skip_special_tokens=True) == "the lazy dog"
    assert len(again) <= 300


def test_training_is_deterministic():
    """Same texts, same tokenizer, every time (the embedded default's numbers depend on it)."""
    a, b = (train_tokenizer(TEXTS, vocab_size=300).backend_tokenizer.to_str() for _ in range(2))
    assert a == b


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer folder"):
        load_tokenizer(tmp_path / "nope")
