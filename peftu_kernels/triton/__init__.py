"""Triton backend: importing it registers its ops (prompt/prefix gathers stay on the reference: they are
index copies, not compute)."""
from .. import ops
from .autograd import adapter, ia3_scale, lora

ops.register("triton", {"lora": lora, "adapter": adapter, "ia3_scale": ia3_scale})
