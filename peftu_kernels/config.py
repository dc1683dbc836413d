"""T5 / Flan-T5 configuration: one frozen dataclass, presets by name, HF config.json round trip."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")  # the feed-forward activations T5 checkpoints use


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int | None = None
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    layer_norm_epsilon: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # derived in __post_init__
    n_dec_layers: int = field(init=False)
    is_gated: bool = field(init=False)
    act: str = field(init=False)

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        gated = parts[0] == "gated"
        act = parts[-1]
        if act == "gelu" and gated:
            act = "gelu_new"  # HF maps "gated-gelu" to the tanh approximation
        if len(parts) > 2 or (len(parts) == 2 and not gated) or act not in ACTIVATIONS:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                             f"use 'ACT' or 'gated-ACT' with ACT in {ACTIVATIONS}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        object.__setattr__(self, "n_dec_layers", self.num_decoder_layers or self.num_layers)
        object.__setattr__(self, "is_gated", gated)
        object.__setattr__(self, "act", act)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_name(cls, name: str, **overrides) -> "T5Config":
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key], **overrides)

    @classmethod
    def from_hf(cls, d: dict) -> "T5Config":
        """Build from a Hugging Face config.json dict; refuses architectures we do not run."""
        mt = d.get("model_type", "t5")
        if mt != "t5":
            raise ValueError(f"model_type {mt!r} is not T5; peftu runs T5 / Flan-T5 only")
        if d.get("is_decoder_only") or d.get("is_encoder_decoder") is False:
            raise ValueError("config describes a decoder-only or encoder-only model; need encoder-decoder T5")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        kw.setdefault("feed_forward_proj", "relu")  # HF's default: original T5
        kw.setdefault("tie_word_embeddings", True)
        if "scale_decoder_outputs" in d:  # transformers 5.x writes the original tie flag under this name
            kw["tie_word_embeddings"] = bool(d["scale_decoder_outputs"])
        return cls(**kw)

    def to_hf(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["num_decoder_layers"] = self.n_dec_layers
        d.update(model_type="t5", architectures=["T5ForConditionalGeneration"], is_encoder_decoder=True,
                 dense_act_fn=self.act, is_gated_act=self.is_gated, dropout_rate=0.0,
                 initializer_factor=1.0, use_cache=True, scale_decoder_outputs=self.tie_word_embeddings)
        return d


_FLAN = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128, d_kv=64)
PRESETS: dict[str, T5Config] = {
    "flan-t5-small": T5Config(d_model=512, d_ff=1024, num_layers=8, num_heads=6, **_FLAN),
    "flan-t5-base": T5Config(d_model=768, d_ff=2048, num_layers=12, num_heads=12, **_FLAN),
    "flan-t5-large": T5Config(d_model=1024, d_ff=2816, num_layers=24, num_heads=16, **_FLAN),
    "flan-t5-xl": T5Config(d_model=2048, d_ff=5120, num_layers=24, num_heads=32, **_FLAN),
    # the embedded default's base model: trained here on the task data (vocab set by its tokenizer)
    "tiny": T5Config(vocab_size=4096, d_model=128, d_kv=32, d_ff=320, num_layers=3, num_heads=4,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
