"""The CUDA backend: builds csrc/ with nvcc through ninja (on first use, into a cache folder keyed by the
sources), loads it with ctypes, and wraps its launchers as torch custom ops that check their inputs and turn
CUDA errors into exceptions naming the op and the sizes. No torch headers are needed to build it."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from . import activations

CSRC = Path(__file__).resolve().parent.parent / "csrc"
ARCHS = ("80", "90")
FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--Werror", "all-warnings"]
_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_lib = None


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def build(cache_dir=None, archs=ARCHS, verbose: bool = False) -> Path:
    """Compile and link csrc/*.cu into libpeftu_cuda.so; a no-op when the sources are unchanged."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        raise RuntimeError("nvcc not found (install the CUDA toolkit or put nvcc on PATH)")
    ninja = shutil.which("ninja")
    if ninja is None:
        raise RuntimeError("ninja not found (pip install ninja)")
    files = sources() + sorted(CSRC.glob("*.cuh"))
    key = hashlib.sha256(b"".join(f.read_bytes() for f in files) + " ".join(FLAGS + list(archs)).encode()).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("PEFTU_CACHE", Path.home() / ".cache" / "peftu")) / "cuda" / key
    lib = root / "libpeftu_cuda.so"
    if lib.is_file():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    # SASS for each architecture, and PTX of the newest so that later GPUs can JIT-compile it
    gencode = " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in archs)
    gencode += f" -gencode arch=compute_{archs[-1]},code=compute_{archs[-1]}"
    objs = [f"{s.stem}.o" for s in sources()]
    lines = ["ninja_required_version = 1.3", f"nvcc = {nvcc}", f"flags = {' '.join(FLAGS)} {gencode} -I{CSRC}",
             "rule cu", "  command = $nvcc $flags -c $in -o $out", "  description = nvcc $in",
             "rule link", "  command = $nvcc -shared $in -o $out -lcudart", "  description = link $out"]
    lines += [f"build {o}: cu {s}" for o, s in zip(objs, sources())]
    lines += [f"build libpeftu_cuda.so: link {' '.join(objs)}", ""]
    (root / "build.ninja").write_text("\n".join(lines))
    r = subprocess.run([ninja, "-C", str(root)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building the CUDA kernels failed:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}")
    if verbose:
        print(r.stdout)
    return lib


def load():
    global _lib
    if _lib is None:
        if not torch.cuda.is_available():
            raise RuntimeError("the CUDA backend needs a CUDA device")
        _lib = ctypes.CDLL(str(build()))
        _lib.peftu_error_string.restype = ctypes.c_char_p
    return _lib


def _call(op: str, fn, sizes: str, *args) -> None:
    err = fn(*args)
    if err != 0:
        msg = _lib.peftu_error_string(err).decode()
        raise RuntimeError(f"peftu::{op} failed with CUDA error {err} ({msg}) for {sizes}")


def _check(op: str, tensors: dict, dtype=None) -> None:
    dev = None
    for name, t in tensors.items():
        if not t.is_cuda:
            raise ValueError(f"peftu::{op}: {name} must be a CUDA tensor, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"peftu::{op}: {name} must be contiguous (strides {t.stride()})")
        dev = dev or t.device
        if t.device != dev:
            raise ValueError(f"peftu::{op}: {name} is on {t.device}, the others on {dev}")
        if dtype is not None and name in ("x", "A", "B", "y", "h", "residual", "down", "down_bias", "up", "up_bias") \
                and t.dtype != dtype:
            raise ValueError(f"peftu::{op}: {name} is {t.dtype}, expected {dtype}")


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _stream(dev):
    return ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream)


def _lora_into(out, x, A, B, scale, slots, rank) -> None:
    """out += scale[s] * (x @ A[s, :r].T) @ B[s, :, :r].T per row, on x's device and its current stream."""
    Bn, L, K = x.shape
    S, R, _ = A.shape
    N = out.shape[2]
    if A.shape != (S, R, K) or B.shape != (S, N, R) or out.shape != (Bn, L, N):
        raise ValueError(f"peftu::lora: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, y {tuple(out.shape)} "
                         f"do not fit (B, L, K) / (S, R, K) / (S, N, R) / (B, L, N)")
    if x.dtype not in _DTYPE:
        raise ValueError(f"peftu::lora: dtype {x.dtype} unsupported (float32, float16, bfloat16)")
    slots, rank, scale = slots.long().contiguous(), rank.long().contiguous(), scale.float().contiguous()
    _check("lora", {"x": x, "A": A, "B": B, "y": out, "slots": slots, "rank": rank, "scale": scale}, x.dtype)
    lib = load()
    with torch.cuda.device(x.device):  # launches go to x's device, whatever the current one is
        h = torch.zeros(Bn * L, R, device=x.device, dtype=torch.float32)
        sizes = f"B={Bn} L={L} K={K} N={N} R={R} S={S} dtype={x.dtype}"
        _call("lora(shrink)", lib.peftu_lora_shrink, sizes, _DTYPE[x.dtype], _ptr(x), _ptr(A), _ptr(h), _ptr(slots),
              _ptr(rank), ctypes.c_int64(S), ctypes.c_int64(Bn * L), ctypes.c_int64(L), ctypes.c_int64(K),
              ctypes.c_int64(R), _stream(x.device))
        _call("lora(expand)", lib.peftu_lora_expand, sizes, _DTYPE[x.dtype], _ptr(h), _ptr(B), _ptr(out),
              _ptr(slots), _ptr(rank), _ptr(scale), ctypes.c_int64(S), ctypes.c_int64(Bn * L), ctypes.c_int64(L),
              ctypes.c_int64(N), ctypes.c_int64(R), _stream(x.device))


@torch.library.custom_op("peftu::lora", mutates_args=())
def lora_op(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
            slots: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """y + scale[s] * (x @ A[s, :r].T) @ B[s, :, :r].T per row (see ops/reference.py::lora); a new tensor."""
    out = y.clone()
    _lora_into(out, x, A, B, scale, slots, rank)
    return out


@torch.library.custom_op("peftu::lora_", mutates_args=("y",))
def lora_inplace_op(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                    slots: torch.Tensor, rank: torch.Tensor) -> None:
    """The same, accumulated into y: the inference path, which needs no copy of y."""
    _lora_into(y, x, A, B, scale, slots, rank)


@lora_op.register_fake
def _(y, x, A, B, scale, slots, rank):
    return torch.empty_like(y)


@torch.library.custom_op("peftu::adapter", mutates_args=())
def adapter_op(h: torch.Tensor, residual: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor,
               up: torch.Tensor, up_bias: torch.Tensor, act: str, slots: torch.Tensor) -> torch.Tensor:
    """residual + up[s] @ act(down[s] @ h + down_bias[s]) + up_bias[s] per row (see ops/reference.py::adapter)."""
    Bn, L, D = h.shape
    S, M, _ = down.shape
    if down.shape != (S, M, D) or up.shape != (S, D, M) or down_bias.shape != (S, M) or up_bias.shape != (S, D) \
            or residual.shape != h.shape:
        raise ValueError(f"peftu::adapter: h {tuple(h.shape)}, down {tuple(down.shape)}, up {tuple(up.shape)} do not fit")
    if not activations.known(act):
        raise ValueError(f"peftu::adapter: activation {act!r} unsupported; known {sorted(activations.NAMES)}")
    slots = slots.long().contiguous()
    _check("adapter", {"h": h, "residual": residual, "down": down, "down_bias": down_bias, "up": up,
                       "up_bias": up_bias, "slots": slots}, h.dtype)
    lib = load()
    with torch.cuda.device(h.device):
        out = torch.empty_like(residual)
        _call("adapter", lib.peftu_adapter, f"B={Bn} L={L} D={D} M={M} S={S} dtype={h.dtype}", _DTYPE[h.dtype],
              _ptr(h), _ptr(residual), _ptr(out), _ptr(down), _ptr(down_bias), _ptr(up), _ptr(up_bias), _ptr(slots),
              ctypes.c_int64(S), ctypes.c_int64(Bn * L), ctypes.c_int64(L), ctypes.c_int64(D), ctypes.c_int64(M),
              ctypes.c_int(activations.code(act)), _stream(h.device))
    return out


@adapter_op.register_fake
def _(h, residual, down, down_bias, up, up_bias, act, slots):
    return torch.empty_like(residual)


def _no_grad(op: str, *ts) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        raise RuntimeError(f"the cuda backend's {op} has no backward: train with backend='triton' or 'reference'")


def lora(y, x, A, B, scale, slots, rank=None, seg=None):
    """Accumulates into y (a fresh activation from the caller) and returns it. Banks in another dtype than the
    activations (float32 masters under a 16-bit base) are cast, as the Triton backend's loads do."""
    _no_grad("lora", y, x, A, B)
    if rank is None:
        rank = torch.full((A.shape[0],), A.shape[1], dtype=torch.long, device=A.device)
    y = y.contiguous()
    lora_inplace_op(y, x.contiguous(), A.to(x.dtype).contiguous(), B.to(x.dtype).contiguous(), scale, slots, rank)
    return y


def adapter(h, residual, down, down_bias, up, up_bias, act, slots, seg=None):
    _no_grad("adapter", h, residual, down, down_bias, up, up_bias)
    c = lambda t: t.to(h.dtype).contiguous()  # noqa: E731
    return adapter_op(h.contiguous(), residual.contiguous(), c(down), c(down_bias), c(up), c(up_bias), act, slots)


def register() -> None:
    """Register as backend "cuda" (forward only: training uses the Triton or reference backward)."""
    load()
    from . import ops
    ops.register("cuda", {"lora": lora, "adapter": adapter})


if torch.cuda.is_available():
    try:
        register()
    except RuntimeError as e:  # no nvcc / build failure: the backend stays unavailable and says why
        raise ImportError(f"CUDA backend unavailable: {e}") from e
