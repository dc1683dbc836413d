"""A subword tokenizer trained locally for the embedded default: T5's ids for pad 0, eos 1, unk 2, T5's
whitespace marker (Metaspace "▁"), an appended </s>.

BPE rather than T5's Unigram: the tokenizers Unigram trainer returns different piece orders and score
digits from run to run (hash-map iteration order), so the main job's numbers moved between runs; BPE
training is deterministic."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, folder=None, extra_special: tuple = ()):
    """Train a byte-pair model; returns a `PreTrainedTokenizerFast` that appends </s>. `extra_special`
    (e.g. T5's <extra_id_k> sentinels) get the ids after unk, never split or merged."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("\n", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>", *extra_special],
                                  max_token_length=16, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=list(extra_special))
    assert (fast.pad_token_id, fast.eos_token_id, fast.unk_token_id) == (0, 1, 2)
    if folder is not None:
        fast.save_pretrained(str(folder))
    return fast


def load_tokenizer(folder):
    from transformers import AutoTokenizer
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no tokenizer folder")
    return AutoTokenizer.from_pretrained(str(folder))
