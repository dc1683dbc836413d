"""The CLI end to end on a very small slice; the report files agree with each other."""
import json
import re

import pytest

from bench_suite import run
from bench_suite.data.core import data_root

pytestmark = pytest.mark.skipif(not (data_root() / "peftu").is_dir(), reason=f"shared data not found at {data_root()}")


def test_cli_small_slice_end_to_end(tmp_path, capsys):
    args = ["--tasks", "tweeteval", "--methods", "majority,ia3", "--users-per-task", "3", "--max-train", "16",
            "--epochs", "1", "--max-len", "64", "--max-new-tokens", "4", "--global-examples-per-task", "200",
            "--out", str(tmp_path / "out"), "--no-progress"]
    run.main(args)
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    rows = [json.loads(x) for x in open(out / "results.jsonl")]
    assert {r["method"] for r in rows} == {"majority", "ia3"} and all(r["task"] == "tweeteval" for r in rows)
    assert (out / "quality_vs_throughput.png").stat().st_size > 1000
    md = (out / "summary.md").read_text()
    assert md.strip() in printed  # the terminal shows what the file holds
    for r in rows:
        assert 0 <= r["accuracy"] <= 100 and r["n_users"] == 3 and "device" in r["env"]
        cell = re.search(r"\| tweeteval \| (.*) \|", md).group(1).split(" | ")
        assert any(c.startswith(f"{r['accuracy']:.1f} [") for c in cell)  # the accuracy, then its interval
    # the majority baseline equals a direct count on the same users and splits
    from bench_suite.data import load_task
    from bench_suite.workload import prepare
    task = load_task("tweeteval")
    users = prepare(task, 3, 16)
    maj = next(r for r in rows if r["method"] == "majority")
    for ud in users:
        train = [task.users[ud.user][sid]["label"][0] for sid, _, _ in ud.prompts["train"]]
        top = max(sorted(set(train)), key=train.count)
        test = [task.users[ud.user][sid]["label"][0] for sid, _, _ in ud.prompts["test"]]
        assert maj["per_user"][ud.user] == pytest.approx(sum(t == top for t in test) / len(test))
    assert (out / "train" / "tweeteval" / "ia3" / "users").is_dir()
    # the zero-set-up server: the run's users, text in, label out, each as the run's own module gives it
    from bench_suite.serve import load_run
    from peftu_kernels.generate import greedy
    from peftu_kernels.serve import Request, ServingEngine
    from peftu_kernels.tenancy import Engine
    model, tok, served, heads, max_len = load_run(out)
    assert set(served) == {f"tweeteval/ia3/{ud.user}" for ud in users}
    eng = Engine(model)
    for u, mods in served.items():
        eng.register(u, mods)
    srv = ServingEngine(model, eng, max_input_len=max_len, max_new_tokens=4)
    uid = sorted(served)[0]
    ids = tok(heads[uid] + "Text: I like it Label: ").input_ids[-max_len:]
    req = srv.submit(Request(uid, ids, max_new_tokens=4))
    srv.run_until_idle()
    import torch
    alone = greedy(model, torch.tensor([ids]), None, 4, eng.batch([uid]))[0].tolist()
    assert req.tokens == alone[:len(req.tokens)] and tok.decode(req.tokens, skip_special_tokens=True).strip()
    # a second run reuses the finished parts
    run.main(args)
    again = [json.loads(x) for x in open(out / "results.jsonl")]
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]


# measured, not computed: they change between runs on a shared machine; everything else must not
TIMED = {"env", "train_seconds", "train_examples_per_s", "infer_ratio", "infer_ratio_lo", "infer_ratio_hi",
         "infer_examples_per_s"}


def test_two_fresh_runs_give_byte_identical_results(tmp_path):
    """Determinism checked, not claimed: a small default (two tasks, a few users, global model included) run
    twice from fresh caches; every result field but the timings and the environment block is the same JSON."""
    args = ["--tasks", "tweeteval,studemo", "--methods", "majority,lora,ia3", "--users-per-task", "3",
            "--max-train", "8", "--epochs", "1", "--max-len", "64", "--max-new-tokens", "4",
            "--global-examples-per-task", "100", "--no-progress"]
    lines = []
    for i in range(2):
        run.main(args + ["--out", str(tmp_path / f"run{i}" / "out"), "--cache", str(tmp_path / f"run{i}" / "cache")])
        rows = [json.loads(x) for x in open(tmp_path / f"run{i}" / "out" / "results.jsonl")]
        lines.append([json.dumps({k: v for k, v in r.items() if k not in TIMED}, sort_keys=True) for r in rows])
    assert len(lines[0]) == 6 and lines[0] == lines[1]
    assert all('"per_example"' in x and '"ci95"' in x for x in lines[0])


def test_full_protocol_smoke_on_a_local_hf_folder(tmp_path):
    """--full --model FOLDER end to end (one task, two users, one epoch, short answers) on a Hugging Face folder of
    random weights with its own tokenizer, so the paper's path (whole prompts, no truncation, the checkpoint as
    it is) cannot rot unseen."""
    from peftu_kernels import T5, T5Config, save_pretrained, train_tokenizer
    folder = tmp_path / "hf-model"
    tok = train_tokenizer(["this is a tweet about the weather", "Label: positive negative neutral",
                           "Classify the sentiment of the text"], vocab_size=300)
    save_pretrained(T5.from_config(T5Config.from_name("tiny", vocab_size=len(tok)), seed=3), folder)
    tok.save_pretrained(str(folder))
    args = ["--full", "--model", str(folder), "--tasks", "tweeteval", "--methods", "majority,zero-shot,lora",
            "--users-per-task", "2", "--max-train", "16", "--epochs", "1", "--max-new-tokens", "4",
            "--out", str(tmp_path / "out"),
            "--no-progress"]
    assert run.parse(args).max_len == 512 and run.parse(["--full"]).max_train is None  # the paper's, where not given
    run.main(args)
    rows = {r["method"]: r for r in map(json.loads, open(tmp_path / "out" / "results.jsonl"))}
    assert set(rows) == {"majority", "zero-shot", "lora"} and all(r["n_users"] == 2 for r in rows.values())
    assert rows["lora"]["env"]["model"] == str(folder) and rows["lora"]["env"]["settings"]["full"] is True
    assert all(0 <= r["accuracy"] <= 100 for r in rows.values())
