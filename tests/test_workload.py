"""Which users and examples a run uses: the validation cap leaves train and test as they were, and the server
that serves a finished run loads the users that run trained (its settings, its selection rule)."""
import json

import pytest

from bench_suite import run
from bench_suite.data.core import data_root
from bench_suite.workload import prepare, run_users

pytestmark = pytest.mark.skipif(not (data_root() / "peftu").is_dir(), reason=f"shared data not found at {data_root()}")


def test_the_validation_cap_is_a_seeded_subsample_and_touches_nothing_else():
    from bench_suite.data import load_task, split_users
    task = load_task("convabuse")  # its users rated hundreds of conversations: long validation splits
    whole = {ud.user: ud for ud in prepare(task, 4, 20, min_test=10)}
    capped = {ud.user: ud for ud in prepare(task, 4, 20, min_test=10, max_val=15)}
    parts = split_users(task.users)
    assert whole.keys() == capped.keys()
    for u, ud in capped.items():
        val = [sid for sid, _, _ in ud.prompts["val"]]
        full = parts[u]["val"]
        assert len(full) > 15 and len(val) == 15 and set(val) <= set(full)
        assert val == sorted(val, key=full.index)  # in the split's order
        assert val != full[:15]  # sampled, not the head
        for split in ("train", "test"):
            assert ud.prompts[split] == whole[u].prompts[split], split
        assert ud.majority == whole[u].majority
    again = {ud.user: [s for s, _, _ in ud.prompts["val"]] for ud in prepare(task, 4, 20, min_test=10, max_val=15)}
    assert again == {u: [s for s, _, _ in ud.prompts["val"]] for u, ud in capped.items()}  # seeded


def test_the_default_caps_validation_and_full_keeps_all():
    assert run.parse([]).max_val == 40 and run.parse(["--full"]).max_val is None
    assert run.parse(["--full", "--max-val", "7"]).max_val == 7


def test_the_server_of_a_run_loads_the_users_that_run_trained(tmp_path):
    """bench_suite.serve re-derives a run's users from its recorded settings; it once left out --min-test and
    chose other users on tasks where that rule matters (hatexplain), so their modules were not served."""
    from bench_suite.data import load_task
    from bench_suite.serve import load_run
    from peftu_kernels import T5, T5Config, save_pretrained, train_tokenizer
    from peftu_kernels.init import new_module
    from peftu_kernels.tenancy import save_user
    tok = train_tokenizer(["Text: a post Label: offensive normal hatespeech"], vocab_size=200)
    m = T5.from_config(T5Config.from_name("tiny", vocab_size=len(tok)), seed=1)
    save_pretrained(m, tmp_path / "cache" / "global-x")
    tok.save_pretrained(str(tmp_path / "cache" / "global-x"))
    out = tmp_path / "out"
    settings = json.loads(json.dumps({k: v for k, v in vars(run.parse(["--users-per-task", "3"])).items()
                                      if k != "progress"}))
    trained = [ud.user for ud in run_users(load_task("hatexplain"), settings)]
    other = [ud.user for ud in prepare(load_task("hatexplain"), 3, 20)]  # the rule left out
    assert set(trained) != set(other)  # else this test could not tell
    for u in trained:
        save_user(out / "train" / "hatexplain" / "ia3" / "users" / u / "best", [new_module(m, "ia3", u)], u)
    (out / "results.jsonl").write_text(json.dumps({"env": {"settings": settings,
                                                           "model_dir": str(tmp_path / "cache" / "global-x")}}) + "\n")
    _, _, served, heads, _ = load_run(out)
    assert set(served) == {f"hatexplain/ia3/{u}" for u in trained} and set(heads) == set(served)
