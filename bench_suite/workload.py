"""A task as the benchmark runs it: chosen users, their splits, prompts, and token ids."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from .data import Task, build_prompts, split_users


@dataclass
class UserData:
    user: str
    prompts: dict[str, list[tuple[str, str, str]]]   # split -> [(sample id, prompt, target)]
    gold: dict[str, list[str]]                         # sample id -> gold labels
    majority: str                                      # most frequent train label (ties: sorted first)
    tokens: dict[str, list[tuple[list[int], list[int]]]] = field(default_factory=dict)


def select_users(parts: dict, n: int | None, seed: int = 42, min_test: int = 0) -> list[str]:
    """Every user with non-empty train and test splits, or a seeded random sample of n of them. With min_test
    (part of the protocol, fixed before any run): the sample is drawn from the users with at least min_test
    test examples first, and only if fewer than n have that many, the rest is a seeded sample of the others."""
    ok = sorted(u for u, p in parts.items() if p["train"] and p["test"])
    if n is None or n >= len(ok):
        return ok
    rng = random.Random(seed)
    rich = [u for u in ok if len(parts[u]["test"]) >= min_test]
    if len(rich) >= n:
        return sorted(rng.sample(rich, n))
    rest = [u for u in ok if u not in set(rich)]
    return sorted(rich + rng.sample(rest, n - len(rich)))


def _subsample(ids: list[str], k: int | None, key: str) -> list[str]:
    """A seeded subsample of k ids in their split order (keeps labels mixed), or all of them."""
    if k is None or len(ids) <= k:
        return ids
    return sorted(random.Random(key).sample(ids, k), key=ids.index)


def prepare(task: Task, n_users: int | None, max_train: int | None, leakage: bool = True,
            fix_self_demo: bool = False, seed: int = 42, min_test: int = 0,
            max_val: int | None = None) -> list[UserData]:
    """The chosen users' splits, prompts and majority labels. max_val caps the validation split (used only to
    pick each module's best epoch) with a seeded subsample; the test split is never cut."""
    parts = split_users(task.users, leakage=leakage)
    out = []
    for u in select_users(parts, n_users, seed, min_test):
        p = parts[u]
        p = {**p, "train": _subsample(p["train"], max_train, f"{seed}/{u}"),
             "val": _subsample(p["val"], max_val, f"{seed}/{u}/val")}
        samples = task.users[u]
        counts = Counter(lab for sid in p["train"] for lab in samples[sid]["label"])
        top = max(counts.values())
        out.append(UserData(u, build_prompts(task, samples, p, seed, fix_self_demo),
                            {sid: samples[sid]["label"] for sid in p["train"] + p["val"] + p["test"]},
                            sorted(k for k, c in counts.items() if c == top)[0]))
    return out


def run_users(task: Task, settings: dict) -> list[UserData]:
    """The users a run with these settings (its `env.settings`, or vars() of its options) prepares: the one
    place the run and the server that serves its modules agree on (runs older than an option get its off value)."""
    return prepare(task, settings["users_per_task"], settings["max_train"], min_test=settings.get("min_test", 0),
                   max_val=settings.get("max_val"))


def tokenize(users: list[UserData], tokenizer, max_len: int, truncate_left: bool) -> None:
    """Token ids per split. Left truncation keeps the sample and 'Label: ' when a prompt is too long for a
    small model (the paper truncated on the right at 512 tokens, where prompts rarely overflow)."""
    texts = [(ud, split, i, pr) for ud in users for split, rows in ud.prompts.items() for i, (_, pr, _) in enumerate(rows)]
    tgts = [t for ud in users for rows in ud.prompts.values() for (_, _, t) in rows]
    enc = tokenizer([t[3] for t in texts], add_special_tokens=True).input_ids
    lab = tokenizer(tgts, add_special_tokens=True).input_ids
    for ud in users:
        ud.tokens = {s: [None] * len(r) for s, r in ud.prompts.items()}
    for (ud, split, i, _), ids, y in zip(texts, enc, lab):
        if len(ids) > max_len:
            ids = ids[-max_len:] if truncate_left else ids[:max_len - 1] + [ids[-1]]
        ud.tokens[split][i] = (ids, y[:32])
