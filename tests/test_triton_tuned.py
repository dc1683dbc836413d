"""The per-GPU tuned configs reach every decode path: with a tuned file for the card (a fake GPU name here), the
launch of each path changes as the file says (BLOCK_N 16 -> 32), and every result still equals the reference.
Paths: LoRA at one token per row (sgmv), the split shrink and expand of sites that share an input (lora_split),
the grouped expand of two or three sites (sgmv_group), the bottleneck adapter at decode."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from helpers import tol  # noqa: E402
from peftu_kernels.ops import reference as R  # noqa: E402
from peftu_kernels.ops.segments import make_segments  # noqa: E402
from peftu_kernels.triton import autograd as T, configs, lora_split, sgmv, sgmv_group  # noqa: E402

S, r, K, N, B = 3, 4, 40, 36, 9


def world():
    g = torch.Generator().manual_seed(0)
    slots = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    A, Bw = torch.randn(S, r, K, generator=g) / 6, torch.randn(S, N, r, generator=g) / 2
    x, y = torch.randn(B, 1, K, generator=g), torch.randn(B, 1, N, generator=g)
    return dict(slots=slots, seg=make_segments(slots), A=A, Bw=Bw, x=x, y=y, scale=torch.rand(S, generator=g) + 0.5,
                rank=torch.full((S,), r), down=torch.randn(S, 6, K, generator=g) / 6,
                db=torch.randn(S, 6, generator=g), up=torch.randn(S, K, 6, generator=g) / 3,
                ub=torch.randn(S, K, generator=g))


PATHS = {
    "lora decode": (lambda w: T.lora(w["y"].clone(), w["x"], w["A"], w["Bw"], w["scale"], w["slots"], w["rank"], w["seg"]),
                    lambda w: R.lora(w["y"], w["x"], w["A"], w["Bw"], w["scale"], w["slots"])),
    "split shrink + expand": (
        lambda w: lora_split.lora_expand(w["y"].clone(), lora_split.lora_shrink(w["x"], w["A"], w["scale"], w["slots"],
                                                                                 w["rank"], w["seg"]),
                                         w["Bw"], w["slots"], w["rank"], w["seg"]),
        lambda w: R.lora(w["y"], w["x"], w["A"], w["Bw"], w["scale"], w["slots"])),
    "grouped expand": (
        lambda w: torch.cat(sgmv_group.lora_expand_group(
            [w["y"].clone(), w["y"].clone()], R.lora_shrink(w["x"], torch.cat([w["A"]] * 2, 1), None, w["slots"]),
            [w["Bw"], w["Bw"]], [0, r], w["slots"], [w["rank"]] * 2, w["seg"]), -1),
        lambda w: torch.cat([R.lora(w["y"], w["x"], w["A"], w["Bw"], None, w["slots"])] * 2, -1)),
    "adapter decode": (
        lambda w: T.adapter(w["x"], w["x"], w["down"], w["db"], w["up"], w["ub"], "relu", w["slots"], w["seg"]),
        lambda w: R.adapter(w["x"], w["x"], w["down"], w["db"], w["up"], w["ub"], "relu", w["slots"])),
}


def launches(fn):
    """Run fn; the (kernel, BLOCK_N) of every launch it made."""
    from triton.runtime.interpreter import InterpretedFunction
    seen, run = [], InterpretedFunction.run

    def spy(self, *args, grid, warmup, **kwargs):
        seen.append((self.fn.__name__, kwargs.get("BLOCK_N")))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = spy
    try:
        out = fn()
    finally:
        InterpretedFunction.run = run
    return out, seen


@pytest.mark.parametrize("path", list(PATHS))
def test_a_tuned_entry_changes_the_launch_on_each_path(path, tmp_path, monkeypatch):
    run, ref = PATHS[path]
    w = world()
    monkeypatch.setattr(configs, "TUNED", tmp_path)
    for mod in (sgmv, lora_split, sgmv_group):
        monkeypatch.setattr(mod, "gpu_name", lambda t: "Fake GPU")
    keys = []
    real_key = configs.key
    monkeypatch.setattr(configs, "key", lambda *a: keys.append(real_key(*a)) or keys[-1])
    configs._tuned.cache_clear()
    try:
        plain, before = launches(lambda: run(w))
        assert keys, f"{path}: no tuned-file lookup (the GPU name does not reach decode_config)"
        configs.save_tuned("Fake GPU", {k: {"BLOCK_N": 32} for k in keys})
        tuned, after = launches(lambda: run(w))
    finally:
        configs._tuned.cache_clear()
    blocks = lambda seen: {b for _, b in seen if b is not None}  # noqa: E731
    assert blocks(before) == {16} and blocks(after) == {32}, (path, before, after)
    for got in (plain, tuned):
        torch.testing.assert_close(got, ref(w), **tol(torch.float32, "kernel"))
