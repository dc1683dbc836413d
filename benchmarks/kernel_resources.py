"""Registers, spills, shared memory and occupancy of every kernel, per GPU target, without a GPU.

python -m benchmarks.kernel_resources [--archs 80,90] [--out results/kernel_resources.jsonl]
Triton: every specialization the package launches (peftu_kernels/triton/exercise.py, recorded under the
interpreter with the configs a GPU would get; see triton/compile.py), compiled to cubins for each target and
read with cuobjdump; summarised per kernel and target over the configs the heuristics pick, autotune
candidates apart. CUDA: csrc/*.cu compiled with the build's flags and `-Xptxas -v`. Prints markdown tables.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET") != "1":  # recording needs the interpreter,
    os.environ["TRITON_INTERPRET"] = "1"                                   # set before triton is imported
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.kernel_resources", *sys.argv[1:]])

from benchmarks.common import environment, table, write_jsonl  # noqa: E402


def cuda_usage(archs=(80, 90)) -> list[dict]:
    """Per csrc kernel and arch: registers, spill stores / loads, stack and shared bytes (nvcc -Xptxas -v)."""
    from peftu_kernels.cuda import CSRC, FLAGS, sources
    rows = []
    for arch in archs:
        for src in sources():
            with tempfile.TemporaryDirectory() as tmp:
                r = subprocess.run(["nvcc", *FLAGS, f"-arch=sm_{arch}", "-Xptxas", "-v", f"-I{CSRC}", "-c", str(src),
                                    "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
            rows += _ptxas(r.stderr, src.name, arch)
    return rows


def _ptxas(text: str, file: str, arch: int) -> list[dict]:
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = {"file": file, "kernel": _demangle(m.group(1)), "arch": arch}
            rows.append(cur)
        elif cur is not None and "spill stores" in line:
            nums = dict((k, int(v)) for v, k in re.findall(r"(\d+) bytes (stack frame|spill stores|spill loads)", line))
            cur.update(stack=nums.get("stack frame", 0), spill_stores=nums.get("spill stores", 0),
                       spill_loads=nums.get("spill loads", 0))
        elif cur is not None and "Used" in line:
            cur["regs"] = int(re.search(r"Used (\d+) registers", line).group(1))
            m = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(m.group(1)) if m else 0
    return rows


def _demangle(name: str) -> str:
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name


def summarise(results: list[dict]) -> list[dict]:
    """Per kernel, arch and tag: how many configs, registers (max), spilled bytes (max), shared KiB (max),
    occupancy (min / median)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["ok"]:
            groups.setdefault((r["spec"]["name"], r["arch"], r["spec"]["tag"]), []).append(r)
    out = []
    for (name, arch, tag), rs in sorted(groups.items()):
        occ = [r["occupancy"] for r in rs]
        out.append({"kernel": name, "target": f"sm_{arch}", "configs": tag, "n": len(rs),
                    "regs_max": max(r["regs"] for r in rs),
                    "spill_bytes_max": max(r["spill_stores"] + r["spill_loads"] for r in rs),
                    "shared_kib_max": round(max(r["shared"] for r in rs) / 1024, 1),
                    "occupancy_min": round(min(occ), 3), "occupancy_median": round(statistics.median(occ), 3)})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--out", default="results/kernel_resources.jsonl")
    a = ap.parse_args(argv)
    archs = tuple(int(x) for x in a.archs.split(","))
    import triton

    from peftu_kernels.triton.compile import compile_specs, distinct, problems, record
    from peftu_kernels.triton.exercise import exercise
    with record() as rec:
        exercise(rec)
    specs = distinct(list(rec.specs.values()))
    res = compile_specs(specs, archs)
    env = environment()
    print(f"Triton {triton.__version__}, {len(specs)} specializations x {len(archs)} targets; {env.get('date', '')}")
    rows = summarise(res)
    print(table(rows, list(rows[0])))
    bad = problems(res)
    print("\nbudget (no spill, shared memory within sm_80's per-block limit, heuristic configs): "
          + ("met" if not bad else f"{len(bad)} problems:\n" + "\n".join(bad)))
    try:
        nv = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        crows = cuda_usage(archs)
        print(f"\nCUDA ({nv}), csrc/ with the build's flags:\n")
        print(table(crows, ["file", "kernel", "arch", "regs", "spill_stores", "spill_loads", "stack", "smem"]))
    except (OSError, subprocess.CalledProcessError) as e:
        crows = []
        print(f"\nCUDA: not compiled ({e})")
    write_jsonl(a.out, [{"triton": r} for r in rows] + [{"cuda": r} for r in crows], env)


if __name__ == "__main__":
    main()
