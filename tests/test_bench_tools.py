"""The programs behind docs/benchmark.md's protocol choices: the learning-rate sweep reads validation losses only
(and picks the lowest), and flat_tasks counts departures from the majority floor per example."""
import json
from types import SimpleNamespace

import pytest

from benchmarks.flat_tasks import departures, minority_counts
from benchmarks.lr_sweep import best_val_losses


def test_best_val_losses_takes_each_users_lowest(tmp_path):
    for u, h in {"a": [0.5, 0.4, 0.45], "b": [0.3, 0.2, 0.1]}.items():
        f = tmp_path / "users" / u / "state.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"user": u, "history": h}))
    assert best_val_losses(tmp_path) == {"a": 0.4, "b": 0.1}


def test_departures_count_examples_scored_unlike_the_floor():
    rows = [{"task": "t", "method": "majority", "per_example": {"u": [1, 0, 1], "v": [0]}},
            {"task": "t", "method": "lora", "per_example": {"u": [1, 1, 0], "v": [0]}},
            {"task": "t", "method": "ia3", "per_example": {"u": [1, 0, 1], "v": [0]}},
            {"task": "s", "method": "lora", "per_example": {"u": [0, 0, 0]}}]
    assert departures(rows, "t") == {"lora": 2, "ia3": 0}
    assert departures(rows, "s") == {}  # no floor to compare with


def test_minority_counts_per_user():
    ud = SimpleNamespace(user="u", majority="no", gold={"1": ["no"], "2": ["yes"], "3": ["yes", "no"], "4": ["yes"]},
                         prompts={"train": [("1", "", ""), ("2", "", ""), ("3", "", "")], "test": [("4", "", "")]})
    assert minority_counts([ud]) == [("u", 3, 1, 1, 1)]


@pytest.mark.skipif(not __import__("bench_suite.data.core", fromlist=["data_root"]).data_root().joinpath("peftu").is_dir(),
                    reason="shared data not found")
def test_the_sweep_trains_each_rate_and_marks_the_lowest(tmp_path, capsys, monkeypatch):
    import bench_suite.workload as wl
    from benchmarks import lr_sweep
    seen = []
    real = wl.run_users

    def spy(task, settings):  # the sweep trains the run's own users
        users = real(task, settings)
        seen.append([u.user for u in users])
        return users
    monkeypatch.setattr(wl, "run_users", spy)
    monkeypatch.setattr("bench_suite.methods.evaluate", lambda *a, **k: pytest.fail("the sweep scored test data"))
    lr_sweep.main(["--methods", "ia3", "--factors", "1,10", "--tasks", "tweeteval", "--out", str(tmp_path / "sw"),
                   "--", "--users-per-task", "2", "--max-train", "16", "--max-val", "4", "--epochs", "3",
                   "--max-len", "48", "--global-examples-per-task", "60", "--cache", str(tmp_path / "cache")])
    table = capsys.readouterr().out
    lines = [x for x in table.splitlines() if x.startswith("| ia3 |")]
    assert len(lines) == 2 and sum("(lowest)" in x for x in lines) == 1
    losses = [float(x.split(" | ")[2]) for x in lines]
    assert ("(lowest)" in lines[0]) == (losses[0] <= losses[1])
    assert len(seen) == 1 and len(seen[0]) == 2
    for lr in ("0.1", "1"):
        assert len(best_val_losses(tmp_path / "sw" / f"ia3-{lr}" / "tweeteval")) == 2
