"""The benchmark's statistics on made-up per-user results whose answer is known."""
import numpy as np

from bench_suite import stats


def users(rng, U=20, n=10, p=None):
    p = rng.beta(6, 4, U) if p is None else p
    return {f"u{i}": list((rng.random(n) < p[i]).astype(int)) for i in range(U)}, p


def test_a_method_better_on_every_user_is_significant():
    rng = np.random.default_rng(0)
    base, _ = users(rng)
    better = {k: [1 if (j % 3 == 0) else x for j, x in enumerate(v)] for k, v in base.items()}
    for k in better:  # strictly better on every user
        v = better[k]
        v[next(j for j, x in enumerate(base[k]) if x == 0) if 0 in base[k] else 0] = 1
    p = stats.paired(better, base)
    assert p["significant"] and p["lo"] > 0 and p["improve"] == sum(0 in v for v in base.values())


def test_identical_methods_are_not_significant():
    rng = np.random.default_rng(1)
    a, _ = users(rng)
    p = stats.paired(a, a)
    assert not p["significant"] and p["diff"] == 0 and p["improve"] == p["worse"] == 0
    b, _ = users(rng)  # two draws of the same population: most of the time no significant difference
    same = [stats.paired(users(np.random.default_rng(s), p=np.full(20, 0.6))[0],
                         users(np.random.default_rng(100 + s), p=np.full(20, 0.6))[0], b=400)["significant"]
            for s in range(40)]
    assert sum(same) <= 6  # nominally 5% of 40 = 2


def test_the_interval_covers_the_true_mean_at_about_the_stated_rate():
    rng = np.random.default_rng(2)
    hits = 0
    for s in range(150):
        p = rng.beta(6, 4, 20)
        data, _ = users(rng, p=p)
        c = stats.cell(data, b=400, seed=s)
        hits += c["lo"] <= 100 * 0.6 <= c["hi"]  # the population mean of per-user accuracy: Beta(6, 4) -> 0.6
    assert 0.88 <= hits / 150 <= 0.995


def test_averages_over_tasks_narrow_the_interval():
    rng = np.random.default_rng(3)
    cells = [stats.cell(users(rng)[0], seed=i) for i in range(4)]
    avg = stats.average(cells)
    assert avg["lo"] < avg["mean"] < avg["hi"]
    assert avg["hi"] - avg["lo"] < np.mean([c["hi"] - c["lo"] for c in cells])


def test_the_report_resamples_each_task_independently():
    """Two tasks with the same data: averaged, the interval narrows by about 1/sqrt(2) only if their bootstraps
    are independent (one seed for every task repeats the same draws and keeps the width)."""
    from bench_suite.report import add_stats
    rng = np.random.default_rng(5)
    data, _ = users(rng)
    floor = {u: [0] * len(x) for u, x in data.items()}
    rows = [{"task": t, "method": m, "per_example": d} for t in ("task-a", "task-b")
            for m, d in (("lora", data), ("majority", floor))]
    avg = add_stats(rows)
    one = rows[0]["ci95"][1] - rows[0]["ci95"][0]
    assert rows[0]["ci95"] != rows[2]["ci95"]  # same data, different draws
    assert avg["lora"]["hi"] - avg["lora"]["lo"] < 0.85 * one
    pair_one = rows[0]["vs_majority"]["hi"] - rows[0]["vs_majority"]["lo"]
    assert avg["lora"]["vs_majority"]["hi"] - avg["lora"]["vs_majority"]["lo"] < 0.85 * pair_one
    again = [{**r, "per_example": r["per_example"]} for r in rows]
    add_stats(again)
    assert [r["ci95"] for r in again] == [r["ci95"] for r in rows]  # and the same on a second run


def test_the_report_states_its_resolution_from_its_own_intervals():
    from bench_suite.report import resolution
    avg = {"lora": {"vs_majority": {"lo": -1.0, "hi": 3.0}}, "ia3": {"vs_majority": {"lo": 0.0, "hi": 6.0}},
           "majority": {}, "zero-shot": {"vs_majority": {"lo": -9.0, "hi": -1.0}}}
    line = resolution(avg, ["zero-shot", "majority", "lora", "ia3"])
    assert "2.0-3.0 points (mean 2.50; lora 2.00, ia3 3.00)" in line and "about 5.0 points" in line  # no baselines
    assert resolution({"majority": {}}, ["majority"]) == ""
