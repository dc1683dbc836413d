"""peftu: a multi-tenant PEFT engine for Flan-T5. The names below are the stable public API."""
from .checkpoint import load_pretrained, save_pretrained
from .config import PRESETS, T5Config
from .generate import Generation, NonFiniteRowsError, greedy, sample, score_labels
from .sampling import Sampling
from .t5 import T5
from .tokenizer import load_tokenizer, train_tokenizer

__all__ = ["T5", "T5Config", "PRESETS", "load_pretrained", "save_pretrained", "greedy", "score_labels", "NonFiniteRowsError",
           "sample", "Sampling", "Generation",
           "train_tokenizer", "load_tokenizer"]
__version__ = "0.1.0"
