"""benchmarks.best_epochs counts, per method, the epoch of lowest validation loss in a run's saved states."""
import json

from benchmarks.best_epochs import best_epochs


def test_counts_the_epoch_of_lowest_validation_loss(tmp_path, capsys):
    hist = {("t", "lora", "a"): [0.5, 0.4, 0.45], ("t", "lora", "b"): [0.3, 0.2, 0.1], ("u", "ia3", "c"): [0.1, 0.2]}
    for (task, m, u), h in hist.items():
        f = tmp_path / "train" / task / m / "users" / u / "state.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"method": m, "history": h}))
    by = best_epochs(tmp_path)
    assert by["lora"] == {2: 1, 3: 1} and by["ia3"] == {1: 1}
