"""bench_suite.run over 2 CPU processes (torchrun, gloo) equals the single-process run: the same per-user
results and modules, each user trained by exactly one rank, the global model trained once; a run killed
mid-way resumes with another number of processes to the same result."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench_suite.data.core import data_root
from peftu_kernels.tenancy import load_user

pytestmark = pytest.mark.skipif(not (data_root() / "peftu").is_dir(), reason=f"shared data not found at {data_root()}")
ARGS = ["--tasks", "tweeteval", "--methods", "majority,ia3", "--users-per-task", "4", "--max-train", "6",
        "--epochs", "20", "--max-len", "48", "--max-new-tokens", "3", "--global-examples-per-task", "80",
        "--workload-rows", "8", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}


def run(out, cache, nproc=1, wait=True, extra=()):
    cmd = [sys.executable, "-m", "bench_suite.run", *ARGS, "--out", str(out), "--cache", str(cache), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), *cmd[1:]]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    if not wait:
        return p
    text = p.communicate(timeout=600)[0]
    assert p.returncode == 0, text[-3000:]
    return [json.loads(x) for x in open(out / "results.jsonl")]


def modules(out):
    return {p.parent.name: load_user(p)[0] for p in (out / "train" / "tweeteval" / "ia3" / "users").glob("*/best")}


def same_results(a, b, ma, mb):
    assert [(r["method"], r["per_example"]) for r in a] == [(r["method"], r["per_example"]) for r in b]
    assert ma.keys() == mb.keys() and len(ma) == 4
    for u in ma:
        for k, t in ma[u].tensors.items():
            err = float((mb[u].tensors[k] - t).norm() / t.norm().clamp(min=1e-30))
            assert err <= 1e-5, (u, k, err)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return root, run(root / "out", root / "cache")


def test_two_processes_equal_one(single, tmp_path):
    root, ref = single
    got = run(tmp_path / "out", tmp_path / "cache", nproc=2)
    same_results(ref, got, modules(root / "out"), modules(tmp_path / "out"))
    env = got[0]["env"]
    assert env["ranks"] == 2 and env["global_model_trained_by_ranks"] == [0]  # trained once, by rank 0
    assert len(list((tmp_path / "cache").glob("global-*"))) == 1
    ranks = next(r for r in got if r["method"] == "ia3")["ranks"]
    assert sorted(ranks) == sorted(ref[1]["per_example"]) and sorted(set(ranks.values())) == [0, 1]


def test_a_killed_run_resumes_with_one_process(single, tmp_path):
    root, ref = single
    import shutil
    shutil.copytree(root / "cache", tmp_path / "cache")  # the same global model: compare the users alone
    p = run(tmp_path / "out", tmp_path / "cache", nproc=2, wait=False)
    t0 = time.time()
    while time.time() - t0 < 300 and not list((tmp_path / "out" / "train").glob("*/*/users/*/state.json")):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # every rank, mid-training
    p.wait()
    assert not (tmp_path / "out" / "results.jsonl").exists()
    got = run(tmp_path / "out", tmp_path / "cache", nproc=1)
    same_results(ref, got, modules(root / "out"), modules(tmp_path / "out"))
