"""Span corruption as T5 defines it (every dropped span comes back in the target after its sentinel, about 15%
of tokens dropped) and the pretraining texts: train texts only, never a text any user is tested on."""
import random

from hypothesis import given, settings, strategies as st

from bench_suite.pretrain import corpus_texts, span_corrupt

SENT = list(range(3, 35))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(100, 4000), min_size=2, max_size=120), st.integers(0, 2 ** 32))
def test_span_corruption_round_trips(ids, seed):
    inp, tgt = span_corrupt(ids, SENT, random.Random(seed))
    assert inp[-1] == 1 and tgt[-1] == 1
    spans, k = {}, None
    for t in tgt[:-2]:
        if t in SENT:
            k = t
            spans[k] = []
        else:
            spans[k].append(t)
    used = [t for t in inp[:-1] if t in SENT]
    assert used == SENT[:len(used)] and list(spans) == used and tgt[-2] == SENT[len(used)]
    assert all(spans[s] for s in used)  # no empty span
    rebuilt = [x for t in inp[:-1] for x in (spans[t] if t in SENT else [t])]
    assert rebuilt == ids
    dropped = sum(map(len, spans.values()))
    assert 1 <= dropped <= max(1, round(0.15 * len(ids))) and dropped < len(ids)


def test_about_fifteen_percent_in_spans_of_about_three():
    rng = random.Random(0)
    ids = list(range(100, 300))
    d, s = 0, 0
    for _ in range(50):
        inp, tgt = span_corrupt(ids, SENT, rng)
        s += sum(t in SENT for t in inp)
        d += len(tgt) - 2 - sum(t in SENT for t in tgt[:-2])
    assert d == 50 * 30 and 8 <= s / 50 <= 12  # 15% of 200; 30 / 3 = 10 spans


class _Task:
    def __init__(self, users):
        self.users = users


def test_corpus_texts_leave_out_every_test_text():
    from bench_suite.data import split_users
    rnd = random.Random(1)
    texts = [f"text number {i}" for i in range(60)]
    users = {f"u{j}": {f"s{i}": {"text": texts[i], "label": [rnd.choice("ab")]} for i in rnd.sample(range(60), 25)}
             for j in range(8)}
    got = corpus_texts({"t": _Task(users)})
    test = {users[u][sid]["text"] for u, p in split_users(users).items() for sid in p["test"]}
    train = {users[u][sid]["text"] for u, p in split_users(users).items() for sid in p["train"] + p["val"]}
    assert got and not set(got) & test and set(got) == train - test
    assert got == sorted(set(got))


def test_user_selection_prefers_users_with_enough_test_examples():
    from bench_suite.workload import select_users
    parts = {f"u{i}": {"train": ["a"], "val": [], "test": ["t"] * (i % 7)} for i in range(40)}
    eligible = [u for u, p in parts.items() if p["test"]]
    rich = [u for u, p in parts.items() if len(p["test"]) >= 5]  # 10 users with 5 or 6
    assert select_users(parts, None, min_test=5) == sorted(eligible)  # every user when n is not set
    got = select_users(parts, 6, min_test=5)
    assert len(got) == 6 and set(got) <= set(rich) and got == select_users(parts, 6, min_test=5)
    got = select_users(parts, 14, min_test=5)  # more than the rich ones: all of them, then the others
    assert set(rich) <= set(got) and len(got) == 14 and set(got) <= set(eligible)
