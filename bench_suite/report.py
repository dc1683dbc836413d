"""results.jsonl, summary.md and quality_vs_throughput.png, all from the same rows."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from . import stats

PAPER = "PEFT-U paper (Clarke et al., Flan-T5-base, 13 tasks): Adapters best at 64.4 average accuracy."
EMBEDDED_NOTE = (" The embedded default is a tiny T5 trained here, not Flan-T5: compare methods with each other, "
                 "not with the paper's numbers.")


def write_jsonl(path: Path, rows: list[dict], env: dict) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "env": env}) + "\n")


def _fmt(v, nd=1):
    return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def add_stats(rows: list[dict]) -> dict:
    """95% intervals into every row (from its per-example results) and paired comparisons against the
    majority floor and the zero-shot model of the same task; returns per-method averages over tasks."""
    by = {(r["task"], r["method"]): r for r in rows}
    cells, pairs = {}, {}
    for r in rows:
        if not r.get("per_example"):
            continue
        c = stats.cell(r["per_example"], seed=stats.task_seed(r["task"]))
        cells.setdefault(r["method"], []).append(c)
        r["ci95"] = [c["lo"], c["hi"]]
        for ref in ("majority", "zero-shot"):
            o = by.get((r["task"], ref))
            if o is None or o is r or not o.get("per_example"):
                continue
            p = stats.paired(r["per_example"], o["per_example"], seed=stats.task_seed(r["task"]))
            pairs.setdefault((r["method"], ref), []).append(p)
            r["vs_" + ref.replace("-", "_")] = {k: v for k, v in p.items() if k != "replicates"}
    avg = {m: stats.average(cs) for m, cs in cells.items()}
    for (m, ref), ps in pairs.items():
        avg[m]["vs_" + ref.replace("-", "_")] = stats.average_paired(ps)
    return avg


def _ci(mean, lo, hi) -> str:
    return f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"


def accuracy_table(rows: list[dict], methods: list[str], avg: dict) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    by = {(r["task"], r["method"]): r for r in rows}
    partial = {r["task"] for r in rows if r.get("partial")}
    lines = ["| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for t in tasks:
        name = f"{t} (partial)" if t in partial else t
        cells = []
        for m in methods:
            r = by.get((t, m))
            if r is None:
                cells.append("")
                continue
            mark = "↑" if r.get("vs_majority", {}).get("significant") and r["vs_majority"]["diff"] > 0 else ""
            cells.append(_ci(r["accuracy"], *r["ci95"]) + mark if "ci95" in r else _fmt(r["accuracy"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **average** | " + " | ".join(f"**{_ci(avg[m]['mean'], avg[m]['lo'], avg[m]['hi'])}**"
                                                 if m in avg else "" for m in methods) + " |")
    return "\n".join(lines)


def paired_table(avg: dict, methods: list[str]) -> str:
    lines = ["| method | vs majority (points) | users better | vs zero-shot (points) | users better |",
             "|---|---|---|---|---|"]
    for m in methods:
        a = avg.get(m, {})
        cols = []
        for ref in ("vs_majority", "vs_zero_shot"):
            p = a.get(ref)
            if not p or p.get("users") is None:
                cols += ["", ""]
                continue
            sig = " **(significant)**" if p["significant"] else ""
            cols += [f"{p['diff']:+.1f} [{p['lo']:+.1f}, {p['hi']:+.1f}]{sig}", f"{p['improve']}/{p['users']}"]
        if any(cols):
            lines.append(f"| {m} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def method_summary(rows: list[dict], methods: list[str], avg: dict | None = None) -> list[dict]:
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        mean = lambda k: statistics.fmean(r.get(k, 0.0) for r in rs)  # noqa: E731
        timed = [r for r in rs if "infer_ratio" in r]
        a = (avg or {}).get(m, {})
        out.append({"method": m, "accuracy": mean("accuracy"), "ci_lo": a.get("lo"), "ci_hi": a.get("hi"),
                    "spread": mean("spread"), "params_per_user": rs[0]["params_per_user"],
                    "bytes_per_user": rs[0]["bytes_per_user"],
                    "train_seconds": sum(r["train_seconds"] for r in rs),
                    "train_examples_per_s": mean("train_examples_per_s"),
                    "infer_ratio": statistics.median([r["infer_ratio"] for r in timed] or [float("nan")]),
                    "infer_ratio_lo": min([r["infer_ratio_lo"] for r in timed] or [float("nan")]),
                    "infer_ratio_hi": max([r["infer_ratio_hi"] for r in timed] or [float("nan")]),
                    "infer_examples_per_s": statistics.fmean([r["infer_examples_per_s"] for r in timed] or [0.0]),
                    "peak_mem_mb": max([r["peak_mem_bytes"] for r in timed] or [0]) / 2**20})
    return out


def cost_table(summary: list[dict]) -> str:
    cols = ["method", "accuracy", "params_per_user", "bytes_per_user", "train_seconds", "train_examples_per_s",
            "infer_ratio", "infer_ratio_range", "infer_examples_per_s", "peak_mem_mb"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in summary:
        s = {**s, "infer_ratio_range": f"{s['infer_ratio_lo']:.2f}-{s['infer_ratio_hi']:.2f}"}
        lines.append("| " + " | ".join(_fmt(s[c]) if c != "infer_ratio" else f"{s[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def summary_md(rows: list[dict], methods: list[str], env: dict, notes: list[str], avg: dict | None = None) -> str:
    avg = avg if avg is not None else add_stats(rows)
    s = method_summary(rows, methods, avg)
    n_users = sorted({r["n_users"] for r in rows})
    parts = ["# PEFT-U benchmark\n", f"model: {env.get('model')}; device: {env.get('device')}; "
             f"commit {env.get('commit')}; {env.get('date')}\n",
             "## Accuracy (per-user accuracy averaged over users, x100, with its 95% interval)\n",
             accuracy_table(rows, methods, avg), "",
             f"Intervals: two-level bootstrap (users, then each user's test examples), {stats.B} replicates; "
             f"users per task: {n_users}. ↑ marks a cell significantly above the majority floor of its task.", "",
             "## Paired differences on the same users and examples (average over tasks)\n",
             paired_table(avg, methods), "", resolution(avg, methods), "",
             PAPER + (EMBEDDED_NOTE if str(env.get("model", "")).startswith("embedded") else ""), "",
             "## Cost per method (averaged over tasks; time summed)\n", cost_table(s), "",
             "infer_ratio: base-model time / method time on a fixed mixed-user workload of the task's prompts "
             "(every row another user, fixed decode length), timed in alternation with the base model; its range "
             "over rounds and tasks. peak_mem_mb: GPU peak above the base on a GPU, bank bytes on CPU.", ""]
    if notes:
        parts += ["## Notes\n"] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def resolution(avg: dict, methods: list[str]) -> str:
    """What this run can separate, from its own intervals: the 95% half-widths of the personalised methods'
    paired differences against the majority floor (averaged over tasks)."""
    hw = {m: (avg[m]["vs_majority"]["hi"] - avg[m]["vs_majority"]["lo"]) / 2 for m in methods
          if m not in ("majority", "zero-shot", "few-shot") and "vs_majority" in avg.get(m, {})}
    if not hw:
        return ""
    mean = sum(hw.values()) / len(hw)
    return (f"Resolution: the paired differences against the majority floor have 95% half-widths of "
            f"{min(hw.values()):.1f}-{max(hw.values()):.1f} points (mean {mean:.2f}; "
            + ", ".join(f"{m} {v:.2f}" for m, v in hw.items()) + "). A difference larger than its "
            f"half-width is significant; differences of about {2 * mean:.1f} points (twice the mean half-width) "
            f"are resolved with margin, smaller ones may not be. Two methods are compared by their own paired "
            f"difference, not by these.")


def plot(rows: list[dict], methods: list[str], path: Path, avg: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    avg = avg if avg is not None else add_stats(rows)
    s = method_summary(rows, methods, avg)
    fig, ax = plt.subplots(figsize=(8, 5))
    big = max([x["bytes_per_user"] for x in s] + [1])
    refs = {"majority": ("majority floor", "tab:gray"), "zero-shot": ("zero-shot model", "tab:red")}
    for x in s:
        if x["method"] in refs:
            label, color = refs[x["method"]]
            ax.axhline(x["accuracy"], ls="--", color=color, lw=1, label=f"{label} ({x['accuracy']:.1f})")
            if x["ci_lo"] is not None:
                ax.axhspan(x["ci_lo"], x["ci_hi"], color=color, alpha=0.08)
            continue
        size = 40 + 600 * x["bytes_per_user"] / big
        yerr = [[x["accuracy"] - x["ci_lo"]], [x["ci_hi"] - x["accuracy"]]] if x["ci_lo"] is not None else None
        xerr = [[x["infer_ratio"] - x["infer_ratio_lo"]], [x["infer_ratio_hi"] - x["infer_ratio"]]]
        ax.errorbar(x["infer_ratio"], x["accuracy"], yerr=yerr, xerr=xerr, fmt="none", ecolor="k", alpha=0.4, lw=1)
        ax.scatter(x["infer_ratio"], x["accuracy"], s=size, alpha=0.6)
        ax.annotate(x["method"], (x["infer_ratio"], x["accuracy"]), fontsize=8, xytext=(5, 5),
                    textcoords="offset points")
    ax.set_xlabel("throughput / base model's, fixed mixed-user workload (1.0 = free)")
    ax.set_ylabel("accuracy, mean over tasks (95% interval)")
    ax.set_title("PEFT-U: quality vs throughput (marker size = bytes per user)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
