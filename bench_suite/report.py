"""results.jsonl, summary.md and quality_vs_throughput.png, all from the same rows."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

PAPER = "PEFT-U paper (Clarke et al., Flan-T5-base, 13 tasks): Adapters best at 64.4 average accuracy."
EMBEDDED_NOTE = (" The embedded default is a tiny T5 trained here, not Flan-T5: compare methods with each other, "
                 "not with the paper's numbers.")


def write_jsonl(path: Path, rows: list[dict], env: dict) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "env": env}) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in open(path) if x.strip()]


def _fmt(v, nd=1):
    return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def accuracy_table(rows: list[dict], methods: list[str]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    acc = {(r["task"], r["method"]): r["accuracy"] for r in rows}
    partial = {r["task"] for r in rows if r.get("partial")}
    lines = ["| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for t in tasks:
        name = f"{t} (partial)" if t in partial else t
        lines.append(f"| {name} | " + " | ".join(_fmt(acc.get((t, m))) for m in methods) + " |")
    avg = [statistics.fmean([acc[(t, m)] for t in tasks if (t, m) in acc]) if any((t, m) in acc for t in tasks) else None
           for m in methods]
    lines.append("| **average** | " + " | ".join(f"**{_fmt(a)}**" for a in avg) + " |")
    return "\n".join(lines)


def method_summary(rows: list[dict], methods: list[str]) -> list[dict]:
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        mean = lambda k: statistics.fmean(r[k] for r in rs)
        out.append({"method": m, "accuracy": mean("accuracy"), "spread": mean("spread"),
                    "params_per_user": rs[0]["params_per_user"], "bytes_per_user": rs[0]["bytes_per_user"],
                    "train_seconds": sum(r["train_seconds"] for r in rs), "train_examples_per_s": mean("train_examples_per_s"),
                    "infer_examples_per_s": mean("infer_examples_per_s"), "peak_mem_mb": max(r["peak_mem_bytes"] for r in rs) / 2**20})
    return out


def cost_table(summary: list[dict]) -> str:
    cols = ["method", "accuracy", "spread", "params_per_user", "bytes_per_user", "train_seconds",
            "train_examples_per_s", "infer_examples_per_s", "peak_mem_mb"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in summary:
        lines.append("| " + " | ".join(_fmt(s[c]) for c in cols) + " |")
    return "\n".join(lines)


def summary_md(rows: list[dict], methods: list[str], env: dict, notes: list[str]) -> str:
    s = method_summary(rows, methods)
    parts = ["# PEFT-U benchmark\n", f"model: {env.get('model')}; device: {env.get('device')}; "
             f"commit {env.get('commit')}; {env.get('date')}\n",
             "## Accuracy (per-user accuracy averaged over users, x100)\n", accuracy_table(rows, methods), "",
             PAPER + (EMBEDDED_NOTE if str(env.get("model", "")).startswith("embedded") else ""), "", "## Cost per method (averaged over tasks; time summed)\n", cost_table(s), ""]
    if notes:
        parts += ["## Notes\n"] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def plot(rows: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = method_summary(rows, methods)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    big = max([x["bytes_per_user"] for x in s] + [1])
    for x in s:
        size = 40 + 600 * x["bytes_per_user"] / big
        ax.scatter(x["infer_examples_per_s"], x["accuracy"], s=size, alpha=0.6)
        ax.annotate(x["method"], (x["infer_examples_per_s"], x["accuracy"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("inference throughput, mixed-user batches (examples/s, log)")
    ax.set_ylabel("accuracy (mean over users and tasks)")
    ax.set_title("PEFT-U: quality vs throughput (marker size = bytes per user)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
