"""benchmarks.serve_load, small: a burst above the queue and the KV pool, over more users than the device tier,
with hostile requests mixed in. Every answered request is exact, every refusal JSON with the right status,
nothing hangs, the server is idle afterwards."""
from benchmarks.serve_load import main


def test_a_burst_with_hostile_requests_answers_exactly_refuses_in_json_and_ends_idle(tmp_path):
    summary, codes = main(["--requests", "60", "--users", "10", "--rows", "3", "--queue", "12",
                           "--device-capacity", "2", "--timeout", "30", "--seed", "1",
                           "--out", str(tmp_path / "load.jsonl")])
    assert summary["wrong"] == 0 and summary["exact"] == codes["normal"].get(200, 0) > 0, summary
    assert summary["non_json_errors"] == 0 and summary["requests"] == sum(sum(c.values()) for c in codes.values())
    assert set(codes["normal"]) <= {200, 429}, codes  # answered, or the queue was full
    assert set(codes.get("hostile adapter", {})) <= {400, 429} and set(codes.get("too many labels", {})) <= {400}
    assert set(codes.get("tiny deadline", {})) <= {504, 429}, codes
    assert summary["pending"] == 0 and summary["kv_rows_used"] == 0 and summary["device_users"] <= 2
