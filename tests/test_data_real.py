"""Loaders on the real files in ../shared/data: counts agree with SOURCES.md and SPEC.md's rules."""
import pytest

from bench_suite.data import MissingData, available, build_prompts, load_task, split_users
from bench_suite.data.core import data_root

ROOT = data_root()
pytestmark = pytest.mark.skipif(not (ROOT / "peftu").is_dir(), reason=f"shared data not found at {ROOT}")


def n_users(t):
    return len(t.users)


# (task, annotations after processing, distinct users) -- from SOURCES.md row counts and SPEC.md's rules
EXPECTED = {
    "tweeteval": (4_000, 20),
    "studemo": (7_411, 25),             # 7,463 rows, 52 with no dimension >= 1 dropped
    "hatexplain": (46_149 + 5_766 + 5_772, None),
    "subjectivediscourse_response": (6_206, 68),
    "hs_brexit": (6_720, 6), "armis": (2_829, 3), "convabuse": (12_168, 8), "md_agreement": (53_755, 819),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts_match_sources(name):
    t = load_task(name)
    ann, users = EXPECTED[name]
    assert t.n_annotations == ann
    if users is not None:
        assert n_users(t) == users
    assert all(s["label"] and set(s["label"]) <= set(t.labels) for u in t.users.values() for s in u.values())


def test_partial_tasks_are_marked():
    assert "19,229" in load_task("hatexplain").partial
    g = load_task("goemotion")
    assert g.partial and g.multi_label
    assert load_task("tweeteval").partial is None


def test_goemotion_drops_neutral_and_maps_to_ekman():
    g = load_task("goemotion")
    labels = [lab for u in g.users.values() for s in u.values() for lab in s["label"]]
    assert set(labels) <= {"anger", "disgust", "fear", "joy", "sadness", "surprise"}
    assert g.n_annotations < 4_895  # neutral and unclear ratings dropped


def test_subjectivediscourse_texts_and_sentiments():
    t = load_task("subjectivediscourse_question_sentiment")
    s = next(iter(next(iter(t.users.values())).values()))
    assert s["text"].count(" \n ") >= 3
    seen = {lab for u in t.users.values() for x in u.values() for lab in x["label"]}
    assert "somewhat-negative" in seen and "somewhatNegative" not in seen


def test_missing_corpora_name_their_files():
    av = available()
    for name in ("gabhate", "epic", "cockamamie"):
        if isinstance(av[name], MissingData):
            assert "missing" in str(av[name]) and "public release" in str(av[name])


def test_real_split_and_prompts_on_tweeteval():
    t = load_task("tweeteval")
    parts = split_users(t.users)
    assert len(parts) == 20
    for u, p in parts.items():
        ids = p["train"] + p["val"] + p["test"]
        assert sorted(ids) == sorted(t.users[u]) and len(set(ids)) == len(ids)
        assert p["val"] and p["test"]
    u = next(iter(parts))
    pr = build_prompts(t, t.users[u], parts[u])
    sid, prompt, target = pr["test"][0]
    assert prompt.startswith(t.instruction + " Text: ") and prompt.endswith("Label: ")
    assert prompt.count("Text: ") == 3  # two label options -> two demonstrations, then the sample
    assert target == t.users[u][sid]["label"][0]
