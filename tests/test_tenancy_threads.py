"""Thread safety of the engine as a property: several threads register / replace / remove / batch / serve on one
small engine with all three tiers (device capacity 2, host capacity 3, a disk tier), and every row served is
compared with its user's module alone at the version its handle pinned. A handle may refuse (StaleBatchError);
it may never serve a row with other weights. Remove the residency's lock (Residency.lock -> a no-op) and
test_threads_never_serve_another_users_weights fails: rows computed with a neighbour's slots."""
import random
import threading

import pytest
import torch

from helpers import assert_rel_close, small_cfg
from peftu_kernels.generate import greedy
from peftu_kernels.t5 import T5
from peftu_kernels.tenancy import Engine, StaleBatchError
from tenancy_users import KINDS, make

USERS = ["a", "b", "c", "d", "e", "f"]
SEEDS = range(3)
R, L = 4, 6


@pytest.fixture(scope="module")
def world():
    model = T5.from_config(small_cfg("gated-untied", d_model=36, d_kv=12, num_heads=3), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    ids, dec = torch.randint(3, 101, (R, L), generator=g), torch.randint(3, 101, (R, 3), generator=g)
    oracle = {}
    with torch.no_grad():
        for kind in KINDS:
            for seed in SEEDS:
                eng = Engine(model, backend="reference")
                eng.register("solo", make(model.cfg, kind, seed))
                h = eng.batch(["solo"] * R)
                oracle[kind, seed] = (model(ids, dec, peft=h), greedy(model, ids, None, 3, peft=h))
        oracle[None] = (model(ids, dec), greedy(model, ids, None, 3))
    return model, ids, dec, oracle


def drive(model, ids, dec, oracle, eng, seed, steps, truth, errors, served):
    rng = random.Random(seed)
    kept = []  # old handles, reused later: stale, or exactly their pinned versions
    for _ in range(steps):
        op = rng.random()
        u = rng.choice(USERS)
        spec = (rng.choice(KINDS), rng.choice(list(SEEDS)))
        try:
            if op < 0.25:
                with eng.lock:  # the version and what it stands for, recorded as one step
                    v = eng.register(u, make(model.cfg, *spec), replace=True)
                    truth[u, v] = spec
            elif op < 0.35:
                eng.remove(u)
            else:
                rows = [rng.choice(USERS[:4] + [None]) for _ in range(rng.randint(1, R))]
                distinct = {x for x in rows if x is not None}
                while len(distinct) > 2:  # the device capacity
                    distinct.pop()
                rows = [x if x in distinct else None for x in rows]
                if rng.random() < 0.5:  # batch + serve as one atomic step: never stale
                    with eng.lock:
                        check(model, ids, dec, oracle, eng.batch(rows), rows, truth, errors, served, rng.random() < 0.3)
                    continue
                h = eng.batch(rows)  # other threads may change its users before it serves
                if rng.random() < 0.3:
                    kept.append((h, rows))
                if kept and rng.random() < 0.3:
                    h, rows = kept.pop(rng.randrange(len(kept)))
                check(model, ids, dec, oracle, h, rows, truth, errors, served, greedy_too=rng.random() < 0.3)
        except (KeyError, StaleBatchError):
            pass  # removed by another thread before the batch, or the handle refused: both allowed
        except Exception as e:  # anything else is a failure of the engine
            errors.append(f"{type(e).__name__}: {e}")


def check(model, ids, dec, oracle, h, rows, truth, errors, served, greedy_too):
    n = len(rows)
    with torch.no_grad():
        got = model(ids[:n], dec[:n], peft=h)
        toks = greedy(model, ids[:n], None, 3, peft=h) if greedy_too else None
    for b, u in enumerate(rows):
        want = oracle[None] if u is None else oracle[truth[u, h.versions[u]]]
        try:
            assert_rel_close(got[b], want[0][b])
            if toks is not None:
                assert torch.equal(toks[b], want[1][b][: toks.shape[1]])
            served.append(u)
        except AssertionError as e:
            errors.append(f"row {b} user {u!r} version {h.versions.get(u)}: {str(e)[:200]}")


def test_threads_never_serve_another_users_weights(world, tmp_path):
    model, ids, dec, oracle = world
    eng = Engine(model, backend="reference", capacity=2, host_capacity=3, offload_dir=tmp_path)
    truth, errors, served = {}, [], []
    for i, u in enumerate(USERS):
        spec = (KINDS[i % len(KINDS)], i % 3)
        truth[u, eng.register(u, make(model.cfg, *spec))] = spec
    threads = [threading.Thread(target=drive, args=(model, ids, dec, oracle, eng, s, 80, truth, errors, served))
               for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} failures, first: {errors[:3]}"
    n = len([u for u in served if u is not None])
    assert n > 60, f"too few rows served ({n}) to say anything"
    tiers = eng.users
    assert len(eng.slots) <= 2 and sum(t != "disk" for t in tiers.values()) <= 3


def test_two_threads_that_evict_each_other(world):
    """Each thread's batch evicts the other's users (capacity 2, four users): handles refuse or serve exactly."""
    model, ids, dec, oracle = world
    eng = Engine(model, backend="reference", capacity=2)
    truth, errors, served = {}, [], []
    for i, u in enumerate("wxyz"):
        truth[u, eng.register(u, make(model.cfg, "lora", i % 3))] = ("lora", i % 3)

    def loop(pair):
        for _ in range(40):
            rows = [pair[0], pair[1], pair[0], None]
            try:
                check(model, ids, dec, oracle, eng.batch(rows), rows, truth, errors, served, False)
            except StaleBatchError:
                pass
            with eng.lock:  # batch + forward as one atomic step never goes stale
                check(model, ids, dec, oracle, eng.batch(rows), rows, truth, errors, served, False)

    threads = [threading.Thread(target=loop, args=(p,)) for p in ("wx", "yz")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(served) >= 2 * 40 * 4
