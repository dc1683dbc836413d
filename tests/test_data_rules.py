"""Split, prompt and metric rules pinned against SPEC.md."""
import random

import pytest

from bench_suite.data import Task, build_prompts, parse, split_list, split_users, user_accuracy
from bench_suite.data.stats import krippendorff_alpha, masi_distance


@pytest.mark.parametrize("n,sizes", [(1, (0, 1, 0)), (2, (0, 1, 1)), (3, (1, 1, 1)), (5, (3, 1, 1)),
                                     (7, (5, 1, 1)), (10, (8, 1, 1)), (15, (12, 2, 1)), (25, (20, 2, 3))])
def test_split_sizes(n, sizes):
    # k = max(2, round(0.19999999999999996 * n)); val = round(k / 2), banker's rounding (15 -> k=3 -> 2 val)
    tr, va, te = split_list(list(range(n)))
    assert (len(tr), len(va), len(te)) == sizes
    assert sorted(tr + va + te) == list(range(n))


def test_split_is_deterministic_and_uses_seed_42():
    a, b = split_list(list("abcdefghijkl")), split_list(list("abcdefghijkl"))
    assert a == b
    items = list("abcdefghijkl")
    random.seed(42)
    random.shuffle(items)
    assert a[0] == items[:-2]


def users_fixture():
    rng = random.Random(0)
    users = {}
    for u in range(6):
        n = [3, 9, 10, 14, 25, 40][u]
        users[f"u{u}"] = {f"t{rng.randrange(60)}_{i}": {"text": f"text {i}", "label": [rng.choice("ab")]}
                          for i in range(n)}
    return users


def test_leakage_split_is_stratified_and_drops_small_users():
    users = users_fixture()
    parts = split_users(users)
    assert set(parts) == {"u2", "u3", "u4", "u5"}  # fewer than 10 annotations dropped
    for u, p in parts.items():
        ids = p["train"] + p["val"] + p["test"]
        assert sorted(ids) == sorted(users[u])
        for lab in "ab":
            n = sum(users[u][s]["label"] == [lab] for s in users[u])
            if n >= 3:
                assert any(users[u][s]["label"] == [lab] for s in p["train"])
    assert split_users(users) == parts


def test_no_leak_split_never_shares_a_text():
    users = {f"u{u}": {f"s{i}": {"text": "x", "label": ["a"]} for i in range(u, u + 30)} for u in range(5)}
    parts = split_users(users, leakage=False)
    where = {}
    for p in parts.values():
        for split, ids in p.items():
            for s in ids:
                assert where.setdefault(s, split) == split


def test_multilabel_sample_lands_in_one_split():
    users = {"u": {f"s{i}": {"text": str(i), "label": ["a", "b"] if i % 2 else ["a"]} for i in range(20)}}
    p = split_users(users)["u"]
    ids = p["train"] + p["val"] + p["test"]
    assert len(ids) == len(set(ids)) == 20


def task(labels=("Hateful", "Non-hateful")):
    return Task("t", list(labels), "Say it.", {})


def test_prompt_template_and_self_demo_quirk():
    samples = {f"s{i}": {"text": f"T{i}", "label": ["Hateful" if i < 2 else "Non-hateful"]} for i in range(12)}
    parts = {"train": ["s0", "s2", "s3"], "val": ["s4"], "test": ["s5"]}
    pr = build_prompts(task(), samples, parts)
    # only one Hateful train text: s0 is its own demonstration under the original code's quirk
    sid, prompt, target = pr["train"][0]
    assert sid == "s0" and prompt.startswith("Say it. Text: T0 Label: Hateful. Text: ")
    assert prompt.endswith("Text: T0 Label: ") and target == "Hateful"
    fixed = build_prompts(task(), samples, parts, fix_self_demo=True)["train"][0][1]
    assert "Text: T0 Label: Hateful." not in fixed
    assert pr["test"][0][1].count("Text: ") == 3


def test_prompt_keeps_first_three_label_options():
    labels = ["a", "b", "c", "d"]
    samples = {f"s{i}": {"text": f"T{i}", "label": [labels[i % 4]]} for i in range(12)}
    parts = {"train": [f"s{i}" for i in range(8)], "val": ["s8"], "test": ["s9", "s10"]}
    p = build_prompts(task(labels), samples, parts)["test"][0][1]
    assert "Label: a." in p and "Label: b." in p and "Label: c." in p and "Label: d." not in p


@pytest.mark.parametrize("out,gold,labels,ok", [
    ("", ["Hateful"], ["Hateful", "Non-hateful"], True),                # empty piece maps to the first label
    ("", ["Non-hateful"], ["Hateful", "Non-hateful"], False),
    ("Hate", ["Hateful"], ["Hateful", "Non-hateful"], True),            # substring mapping
    ("surprised", ["surprise"], ["anger", "surprise"], True),          # trailing 'ed' stripped
    ("annoying", ["anger"], ["anger", "annoy"], False),                 # 'ing' stripped -> 'annoy' != gold
    ("joy, sadness", ["sadness"], ["joy", "sadness"], True),           # any piece hitting a gold label
    ("Non-hateful.", ["Non-hateful"], ["Hateful", "Non-hateful"], True),
    ("banana", ["Hateful"], ["Hateful", "Non-hateful"], False),        # unknown label discarded
    ("'normal'", ["normal"], ["hatespeech", "normal"], False),         # only a trailing quote is removed
])
def test_metric_edge_cases(out, gold, labels, ok):
    assert (user_accuracy([out], [gold], labels) == 1.0) is ok


def test_parse_strips_each_suffix_once_in_order():
    assert parse("joyed.", ["joy"]) == ["joy"]
    assert parse("fear)", ["fear"]) == ["fear"]
    assert parse("x, y", ["a"]) == []


def test_alpha_perfect_and_chance():
    same = {f"u{u}": {f"s{i}": {"label": [str(i % 2)], "text": ""} for i in range(20)} for u in range(3)}
    assert krippendorff_alpha(Task("t", ["0", "1"], "", same)) == pytest.approx(1.0)
    assert masi_distance(frozenset("ab"), frozenset("a")) == pytest.approx(1 - 0.5 * 0.67)
    rng = random.Random(1)
    noise = {f"u{u}": {f"s{i}": {"label": [rng.choice("01")], "text": ""} for i in range(400)} for u in range(3)}
    assert abs(krippendorff_alpha(Task("t", ["0", "1"], "", noise))) < 0.1
