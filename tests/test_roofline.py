"""The roofline report's byte / FLOP model (hand counts) and a quick CPU run of the report."""
import pytest

from benchmarks import roofline


def test_cost_model_counts_by_hand():
    # LoRA, 3 tokens, width 4, 2 users, fp32, rank 2: x 12 + y 2 * 12 values, A and B 2 users * 2 * 2 * 4
    c = roofline.cost("lora", T=3, D=4, U=2, e=4, r=2)
    assert c == {"bytes": 4 * (12 + 24 + 32), "flops": 2 * 3 * 2 * 2 * 4}
    d = roofline.cost("dora", T=3, D=4, U=2, e=4, r=2)
    assert d["bytes"] - c["bytes"] == 4 * 2 * 4 and d["flops"] - c["flops"] == 12
    a = roofline.cost("adapter", T=2, D=4, U=1, e=2, m=3)
    assert a == {"bytes": 2 * (3 * 8 + 2 * 3 * 4 + 3 + 4), "flops": 2 * 2 * 3 * 2 * 4}
    assert roofline.cost("ia3_scale", T=5, D=4, U=3, e=2) == {"bytes": 2 * (40 + 12), "flops": 20}
    with pytest.raises(ValueError, match="no cost model"):
        roofline.cost("nope", T=1, D=1, U=1, e=1)


def test_quick_report_on_cpu():
    rows, meta = roofline.report("cpu", quick=True, backend="reference")
    assert meta["copy_GBps"] > 0 and meta["matmul_TFLOPs"] > 0
    assert {r["op"] for r in rows} == {"lora", "dora", "ia3_scale", "adapter"}
    for r in rows:
        assert r["GBps"] > 0 and 0 < r["pct_bw"] and r["bound"] in ("memory", "compute")
        assert abs(r["GBps"] - r["MB"] / r["ms"]) < 1e-6 * r["GBps"]  # MB per ms = GB/s
