"""Compile every Triton kernel of this package for real GPU targets, on a machine without a GPU, and report the
resources each specialization takes. The interpreter accepts code the compiler rejects (tiny tl.dot blocks,
non-constexpr tl.arange bounds); Triton 3.6 runs its whole pipeline and ptxas to a cubin for a GPUTarget
without a device, so this checks what a GPU would build.

1. `record()` (under TRITON_INTERPRET=1): every kernel launch is recorded instead of run -- the kernel, each
   argument's Triton type and 16-byte divisibility (as the JIT specializes them), constexpr values, num_warps
   / num_stages -- while the launchers choose the configs a GPU would (their INTERPRET switches off). Kernels
   do not run, so `exercise()` drives every op at GPU-sized shapes in a second.
2. `compile_specs(specs, archs)`: each spec compiled in worker processes without the interpreter, for each
   arch; per spec and arch: the compiler's error, or registers per thread, local memory (spills), shared
   memory (static + dynamic) and the resulting occupancy.

    python -m benchmarks.kernel_resources        # the specs exercise() launches, compiled for sm_80 and sm_90
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ARCHS = (80, 90)
# per SM: registers, shared memory (bytes, the most a block may use), warps, blocks (CUDA occupancy tables)
LIMITS = {80: dict(regs=65536, smem_sm=167936, smem_block=166912, warps=64, blocks=32),
          90: dict(regs=65536, smem_sm=233472, smem_block=232448, warps=64, blocks=32)}


# --- recording (interpreter process) --------------------------------------------------------------------------
def _spec(fn, arg_names, args, kwargs, tag) -> dict:
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    params = inspect.signature(fn).parameters
    bound = dict(zip(arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    sig, const, div = {}, {}, []
    for i, (name, p) in enumerate(params.items()):
        v = bound.get(name, p.default)
        if "constexpr" in str(p.annotation):
            const[name] = v.value if hasattr(v, "value") else v
            continue
        if hasattr(v, "data_ptr"):
            ty, key = native_specialize_impl(BaseBackend, v, False, True, True)
            sig[name] = ty
        else:  # a scalar: what the JIT tells apart (type, == 1, divisible by 16), finished where params are known
            sig[name] = {"value": _representative(v)}
            key = None
        if key == "D":
            div.append(i)
    return {"module": fn.__module__, "file": inspect.getsourcefile(fn), "name": fn.__name__, "signature": sig,
            "constexprs": const, "divisible": div,
            "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3), "tag": tag}


def _representative(v):
    """A value that the JIT specializes as it does `v`: ints by width, == 1 and divisibility by 16."""
    if isinstance(v, bool) or not isinstance(v, int):
        return v
    big = 0 if -2**31 <= v < 2**31 else 2**32
    return 1 if v == 1 else big + (16 if v % 16 == 0 else 17)


class Recorder:
    def __init__(self):
        self.specs: dict[str, dict] = {}
        self.tag = "heuristic"

    def key(self, s: dict) -> str:
        return json.dumps({k: v for k, v in s.items() if k != "tag"}, sort_keys=True, default=str)

    def add(self, s: dict) -> None:
        old = self.specs.setdefault(self.key(s), s)
        if old["tag"] != "heuristic" and s["tag"] == "heuristic":
            old["tag"] = "heuristic"  # a config the heuristics pick is held to the resource budget


def distinct(specs: list[dict]) -> list[dict]:
    """One spec per kernel, argument dtypes, constexprs and num_warps / num_stages: the one with the most
    16-divisible arguments (the widest vector accesses, the most registers), tagged "heuristic" if any of its
    group is. Alignment variants of one config compile alike; what they change is the vector width."""
    groups: dict[str, dict] = {}
    for s in specs:
        ptrs = {n: t for n, t in s["signature"].items() if isinstance(t, str)}
        k = json.dumps([s["name"], ptrs, s["constexprs"], s["num_warps"], s["num_stages"]], sort_keys=True,
                       default=str)
        old = groups.get(k)
        if old is None or len(s["divisible"]) > len(old["divisible"]):
            groups[k] = {**s, "tag": "heuristic" if "heuristic" in (s["tag"], old and old["tag"]) else s["tag"]}
        elif s["tag"] == "heuristic":
            old["tag"] = "heuristic"
    return list(groups.values())


@contextlib.contextmanager
def gpu_configs():
    """The launchers choose the block sizes and warps a GPU would get (their INTERPRET switches off); kernels
    still run under the interpreter, so those configs can be checked for correctness on a CPU."""
    import peftu_kernels.triton as pkg
    mods = [importlib.import_module(f"{pkg.__name__}.{m}") for m in _kernel_modules()]
    switches = [(m, m.INTERPRET) for m in mods if hasattr(m, "INTERPRET")]
    for m, _ in switches:
        m.INTERPRET = False
    try:
        yield
    finally:
        for m, v in switches:
            m.INTERPRET = v


@contextlib.contextmanager
def record():
    """Launches are recorded, not run; launchers pick GPU configs. Yields the Recorder (set `.tag` to label
    launches that are not the heuristics' own, e.g. autotune candidates)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("record() needs TRITON_INTERPRET=1 (set before triton is imported)")
    from triton.runtime.interpreter import InterpretedFunction
    rec, old_run = Recorder(), InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            rec.add(_spec(self.fn, self.arg_names, args, kwargs, rec.tag))

    InterpretedFunction.run = run
    try:
        with gpu_configs():
            yield rec
    finally:
        InterpretedFunction.run = old_run


def _kernel_modules() -> list[str]:
    here = Path(__file__).parent
    return sorted(p.stem for p in here.glob("*.py") if p.stem not in ("__init__", "compile"))


# --- compiling (a process without the interpreter) ------------------------------------------------------------
def _module(s: dict):
    """The kernel's module, imported without the interpreter (by name, else from its file)."""
    try:
        return importlib.import_module(s["module"])
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location(s["module"], s["file"])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[s["module"]] = mod
        spec.loader.exec_module(mod)
        return mod


def kernels() -> list[str]:
    """Every kernel of this package (top-level @triton.jit functions named _*_kernel), as module.name."""
    out = []
    for m in _kernel_modules():
        mod = importlib.import_module(f"{__package__}.{m}")
        out += [f"{mod.__name__}.{n}" for n in vars(mod) if n.startswith("_") and n.endswith("_kernel")
                and hasattr(vars(mod)[n], "fn")]
    return sorted(out)


def _compile_one(s: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl
    fn = getattr(_module(s), s["name"])
    sig, const = {}, dict(s["constexprs"])
    params = {p.name: p for p in fn.params}
    for name, ty in s["signature"].items():
        if isinstance(ty, dict):  # a scalar: as the JIT would specialize it
            ty, _ = native_specialize_impl(BaseBackend, ty["value"], False, not params[name].do_not_specialize, True)
            if ty == "constexpr":
                const[name] = s["signature"][name]["value"]
        sig[name] = ty
    for name in const:
        sig[name] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i in s["divisible"]}
    out = {"arch": arch}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": s["num_warps"], "num_stages": s["num_stages"]})
    except Exception as e:  # the compiler's own message, first lines
        return {**out, "ok": False, "error": f"{type(e).__name__}: {str(e)[:1500]}"}
    out.update(ok=True, dynamic_shared=int(k.metadata.shared), **_ptxas_usage(k.asm["ptx"], arch))
    return out


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """ptxas -v on the kernel's PTX, as Triton runs it (its own ptxas, sm_90a for 90): registers, spills."""
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
                            "-o", str(src.with_suffix(".o"))], capture_output=True, text=True, check=True)
    return usage_from_text(r.stderr)


def usage_from_text(text: str) -> dict:
    """ptxas -v's report -> registers, spill stores / loads, stack frame and static shared bytes."""
    import re
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return {"regs": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "static_shared": num(r"(\d+) bytes smem")}


def occupancy(regs: int, shared: int, num_warps: int, arch: int) -> float:
    """Active warps / the SM's 64, from registers (allocated per warp in units of 256), shared memory and the
    block limit."""
    lim = LIMITS[arch]
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (lim["regs"] // per_warp) // num_warps
    by_smem = lim["smem_sm"] // (shared + 1024) if shared else lim["blocks"]  # 1 KiB reserved per block
    blocks = min(by_regs, by_smem, lim["blocks"], lim["warps"] // num_warps)
    return blocks * num_warps / lim["warps"]


def _worker(specs: list[dict], archs) -> list[dict]:
    return [{**_compile_one(s, a), "spec": i} for i, s in specs for a in archs]


def compile_specs(specs: list[dict], archs=ARCHS, workers: int = 2, timeout: float = 900) -> list[dict]:
    """Compile each spec for each arch in `workers` processes without the interpreter; one result per (spec,
    arch) with the spec attached, occupancy and total shared memory added."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    chunks = [[(i, s) for i, s in enumerate(specs) if i % workers == w] for w in range(workers)]
    code = "import sys; from peftu_kernels.triton.compile import worker_main; worker_main(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(list(archs))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for c in chunks if c]
    results = []
    for p, c in zip(procs, [c for c in chunks if c]):
        out, err = p.communicate(json.dumps(c), timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"compile worker failed ({p.returncode}): {err[-2000:]}")
        results += json.loads(out)
    for r in results:
        s = r["spec"] = specs[r["spec"]]
        if r["ok"]:
            r["shared"] = r["dynamic_shared"] + r["static_shared"]
            r["occupancy"] = occupancy(r["regs"], r["shared"], s["num_warps"], r["arch"])
    return sorted(results, key=lambda r: (r["spec"]["name"], json.dumps(r["spec"]["constexprs"], sort_keys=True,
                                                                         default=str), r["arch"]))


def problems(results: list[dict]) -> list[str]:
    """What fails the budget: a spec that does not compile (any), spills or shared memory over the sm_80 block
    limit (configs the heuristics pick)."""
    out = []
    for r in results:
        s = r["spec"]
        where = f"{s['name']} sm_{r['arch']} {s['constexprs']} warps {s['num_warps']}"
        if not r["ok"]:
            out.append(f"{where}: does not compile: {r['error']}")
        elif s["tag"] == "heuristic" and (r["spill_stores"] or r["spill_loads"]):
            out.append(f"{where}: spills ({r['spill_stores']} B stores, {r['spill_loads']} B loads per thread, "
                       f"{r['regs']} registers)")
        elif s["tag"] == "heuristic" and r["shared"] > LIMITS[80]["smem_block"]:
            out.append(f"{where}: {r['shared']} B shared memory, over sm_80's {LIMITS[80]['smem_block']} B per block")
    return out


def worker_main(archs: str) -> None:
    """A compile worker: specs as JSON on stdin, results as JSON on stdout."""
    print(json.dumps(_worker(json.loads(sys.stdin.read()), json.loads(archs))))
