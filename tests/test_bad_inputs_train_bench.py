"""Trainer and bench_suite CLI: each bad input a clear error naming it; one corrupt corpus costs its task only."""
import gzip
import json
import shutil

import pytest

from helpers import hf_twin
from peft_users import PEFT_CFG
from peftu_kernels.config import T5Config
from peftu_kernels.init import new_module
from peftu_kernels.train import MultiUserTrainer, TrainConfig

CFG = TrainConfig(epochs=1, batch_size=2, lr=1e-2)


@pytest.fixture(scope="module")
def model():
    return hf_twin(T5Config(**PEFT_CFG), seed=3)[1]


def data(users=("a", "b"), n=3):
    return {u: {"train": [([5, 6, 7, 1], [8, 1]) for _ in range(n)], "val": []} for u in users}


def trainer(model, out=None):
    return MultiUserTrainer(model, CFG, out, backend="reference", progress=False)


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", 0), ("batch_size", 2.5), ("lr", -1.0),
                                         ("lr", float("nan")), ("warmup_ratio", 1.5), ("users_per_step", 0),
                                         ("patience", 0), ("max_grad_norm", -1.0), ("betas", (0.9, 1.0)),
                                         ("eval_batch_size", 0), ("epochs", True)])
def test_bad_train_config(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("spoil,msg", [
    (lambda d, i, m: d["a"].update(train=[]), "user 'a' has no training examples"),
    (lambda d, i, m: d["a"]["train"].__setitem__(1, ([5, 6], [])), "user 'a' train example 1 needs non-empty"),
    (lambda d, i, m: d["b"]["train"].__setitem__(0, ([], [8, 1])), "user 'b' train example 0 needs non-empty"),
    (lambda d, i, m: d["a"]["train"].__setitem__(0, ([5, 999], [8])), "outside the vocabulary"),
    (lambda d, i, m: d["a"].update(val=[([5], [-3])]), "user 'a' val example 0 has ids"),
    (lambda d, i, m: i.pop("b"), r"no initial module in `init` for users \['b'\]"),
    (lambda d, i, m: i.update(b=new_module(m, "ia3", "b")), "one method per call"),
    (lambda d, i, m: d.clear(), "non-empty dict"),
])
def test_bad_training_data(model, spoil, msg):
    d = data()
    init = {u: new_module(model, "lora", u) for u in d}
    spoil(d, init, model)
    with pytest.raises(ValueError, match=msg):
        trainer(model).train(d, init)


def test_ids_are_safe_folders_under_out_dir(model, tmp_path):
    users = ("../escape", "/abs", "a/b")
    d = data(users)
    init = {u: new_module(model, "ia3", u) for u in d}
    best = trainer(model, tmp_path / "out").train(d, init)
    assert set(best) == set(users)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert len(list((tmp_path / "out" / "users").iterdir())) == 3


def test_resuming_with_other_settings_is_refused(model, tmp_path):
    d = data()
    init = {u: new_module(model, "lora", u) for u in d}
    trainer(model, tmp_path).train(d, init)
    other = MultiUserTrainer(model, TrainConfig(epochs=1, batch_size=2, lr=5e-3), tmp_path, backend="reference",
                             progress=False)
    with pytest.raises(ValueError, match=r"other settings .*'lr': \(0.01, 0.005\)"):
        other.train(d, init)
    with pytest.raises(ValueError, match="method 'lora' vs 'ia3'"):
        trainer(model, tmp_path).train(d, {u: new_module(model, "ia3", u) for u in d})
    st = tmp_path / "users" / "a" / "state.json"
    st.write_text("{broken")
    with pytest.raises(ValueError, match="state.json"):
        trainer(model, tmp_path).train(d, init)


def test_sigmoid_adapters_of_mixed_widths_train_as_alone(model):
    """Padded bottleneck units see act(0) = 0.5 under sigmoid: without masking their gradients the narrow
    user's padded up-columns would learn, and it would no longer equal its training alone."""
    d = data(("narrow", "wide"), n=4)
    init = {"narrow": new_module(model, "pfeiffer", "narrow", act="sigmoid", reduction_factor=12),
            "wide": new_module(model, "pfeiffer", "wide", act="sigmoid", reduction_factor=4)}
    cfg = TrainConfig(epochs=2, batch_size=2, lr=5e-2, weight_decay=0.0)
    together = MultiUserTrainer(model, cfg, backend="reference", progress=False).train(d, init)
    for u in d:
        alone = MultiUserTrainer(model, cfg, backend="reference", progress=False).train({u: d[u]}, {u: init[u]})
        assert max(float((together[u].tensors[k] - init[u].tensors[k]).abs().max()) for k in init[u].tensors) > 1e-3
        for k, v in alone[u].tensors.items():
            err = float((together[u].tensors[k] - v).norm() / v.norm().clamp(min=1e-30))
            assert err <= 1e-5, (u, k, err)


# --- bench_suite -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,msg", [
    (["--lr", "lora"], "expected METHOD=LR"), (["--lr", "lora=fast"], "not a number"),
    (["--lr", "nosuch=1e-3"], "expected METHOD=LR"), (["--lr", "lora=-1"], "positive"),
    (["--users-per-task", "-1"], "at least 1"), (["--users-per-task", "0"], "at least 1"),
    (["--max-new-tokens", "0"], "at least 1"), (["--max-len", "0"], "at least 1"), (["--epochs", "x"], "integer"),
])
def test_bad_cli_arguments(argv, msg, capsys):
    from bench_suite import run
    with pytest.raises(SystemExit):
        run.parse(argv)
    assert msg in capsys.readouterr().err


def test_a_bit_flipped_gzip_is_a_data_error_naming_the_file(tmp_path):
    from bench_suite.data import DataError, available
    from bench_suite.data.core import data_root
    src = data_root() / "peftu" / "raw" / "tweeteval" / "annotations_g3.csv.gz"
    if not src.is_file():
        pytest.skip(f"shared data not found at {src}")
    raw = tmp_path / "peftu" / "raw" / "tweeteval"
    raw.mkdir(parents=True)
    b = bytearray(gzip.compress(gzip.decompress(src.read_bytes())))
    b[len(b) // 2] ^= 0xFF
    (raw / "annotations_g3.csv.gz").write_bytes(bytes(b))
    shutil.copytree(data_root() / "peftu" / "raw" / "goemotion", tmp_path / "peftu" / "raw" / "goemotion")
    got = available(tmp_path, ["tweeteval", "goemotion"])
    assert isinstance(got["tweeteval"], DataError) and "annotations_g3.csv.gz" in str(got["tweeteval"])
    assert not isinstance(got["goemotion"], Exception)  # the other task still loads


def test_a_truncated_part_is_run_again(tmp_path, capsys):
    from bench_suite.run import _read_part
    p = tmp_path / "t__m.json"
    p.write_text(json.dumps({"run_key": "k", "row": {"accuracy": 1}})[:20])
    assert _read_part(p, "k") is None and "run again" in capsys.readouterr().out
    p.write_text(json.dumps({"run_key": "k", "row": {"accuracy": 1}}))
    assert _read_part(p, "k") == {"accuracy": 1} and _read_part(p, "other") is None


def _spoil_gzip_text(path, edit):
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes()).decode()).encode()))


def _extra_field(text):
    lines = text.splitlines()
    lines[3] += ",extra"
    return "\n".join(lines)


SPOILS = {  # corruption -> (task, file under the data root, how, words the error must hold besides the file)
    "truncated gzip": ("tweeteval", "peftu/raw/tweeteval/annotations_g3.csv.gz",
                       lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "end-of-stream"),
    "bit-flipped body": ("tweeteval", "peftu/raw/tweeteval/annotations_g3.csv.gz",
                         lambda p: p.write_bytes(bytes(b ^ (0xFF if i == p.stat().st_size // 2 else 0)
                                                       for i, b in enumerate(p.read_bytes()))), "unreadable"),
    "CSV row with an extra field": ("tweeteval", "peftu/raw/tweeteval/annotations_g3.csv.gz",
                                    lambda p: _spoil_gzip_text(p, _extra_field), "has 23 fields, the header has 22"),
    "JSON item missing a field": ("hs_brexit", "lewidi/raw/HS-Brexit/HS-Brexit_train.json.gz",
                                  lambda p: _spoil_gzip_text(p, lambda t: t.replace('"annotators"', '"annotatorz"', 1)),
                                  "['annotators'] missing"),
}


@pytest.mark.parametrize("spoil", list(SPOILS))
def test_a_corrupt_file_names_its_task_file_and_problem_and_costs_only_its_task(tmp_path, spoil):
    from bench_suite.data import DataError, available
    from bench_suite.data.core import data_root
    from bench_suite.data.fetch import missing_table
    task, rel, how, words = SPOILS[spoil]
    for sub in ("peftu/raw/tweeteval", "peftu/raw/goemotion", "lewidi/raw/HS-Brexit"):
        if not (data_root() / sub).is_dir():
            pytest.skip(f"shared data not found at {data_root() / sub}")
        shutil.copytree(data_root() / sub, tmp_path / sub)
        for f in (tmp_path / sub).iterdir():
            f.chmod(0o644)
    how(tmp_path / rel)
    got = available(tmp_path, ["tweeteval", "goemotion", "hs_brexit"])
    assert isinstance(got[task], DataError), got[task]
    assert str(tmp_path / rel) in str(got[task]) and words in str(got[task]), str(got[task])
    table = missing_table(got, tmp_path)
    row = next(line for line in table.splitlines() if line.startswith(f"| {task} |"))
    assert "corrupt" in row and str(tmp_path / rel) in row and words in row, row
    assert all(not isinstance(t, Exception) for n, t in got.items() if n != task)  # the others still load
