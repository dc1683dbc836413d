"""Triton backend: importing it registers the ops of every module here that has an `OPS` table (prompt and
prefix gathers stay on the reference: they are index copies, not compute). A new op's Triton file needs no
edit here."""
import importlib
import pkgutil

from .. import ops

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _mod = importlib.import_module(f"{__name__}.{_m.name}")
    if isinstance(getattr(_mod, "OPS", None), dict):
        ops.register("triton", _mod.OPS)
