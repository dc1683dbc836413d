"""One contract per op, every backend (ops.CONSUMES): each registered op of each backend that runs here (the
reference; Triton under the interpreter) is run on inputs the test then reuses -- contiguous, and strided views
of the activations and weights -- and must (1) equal the reference computed on fresh copies and (2) leave every
argument it does not consume exactly as it was. An op without an input builder here fails, so a new op gets
its contract checked."""
import pytest
import torch

from helpers import tol
from peftu_kernels import ops
from peftu_kernels.ops import reference
from peftu_kernels.ops.segments import make_segments

S, R, D, N = 4, 5, 24, 20


def strided(shape, g, how):
    """A tensor of `shape` that is contiguous, a step-2 slice of a wider one, or a transpose of its storage."""
    if how == "contiguous":
        return torch.randn(*shape, generator=g)
    if how == "sliced":
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
    return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)


def inputs(op, L, how, g):
    B = 6
    slots = torch.tensor([0, 2, -1, 2, 3, 0])
    seg = make_segments(slots)
    x, y = strided((B, L, D), g, how), torch.randn(B, L, N, generator=g)
    A, Bw = strided((S, R, D), g, how), strided((S, N, R), g, how)
    scale, rank = torch.rand(S, generator=g) + 0.5, torch.tensor([R, 2, R, 1])
    for u, r in enumerate(rank.tolist()):  # banks zero-pad mixed ranks: the ops may read or skip the padding
        A[u, r:] = 0
        Bw[u, :, r:] = 0
    if op == "lora":
        return (y, x, A, Bw, scale, slots), dict(rank=rank, seg=seg)
    if op == "lora_shrink":
        return (x, A, scale, slots), dict(rank=rank, seg=seg)
    if op == "lora_expand":
        return (y, reference.lora_shrink(x, A, scale, slots, rank, seg), Bw, slots), dict(rank=rank, seg=seg)
    if op == "lora_expand_group":
        h = reference.lora_shrink(x, torch.cat([A, A], 1), None, slots, None, seg)
        return ([y, torch.randn(B, L, N, generator=g)], h, [Bw, strided((S, N, R), g, how)], [0, R], slots,
                [rank, rank]), dict(seg=seg)
    if op == "ia3_scale":
        return (x, torch.rand(S, D, generator=g) + 0.5, slots), dict(seg=seg)
    if op == "adapter":
        return (x, strided((B, L, D), g, how), strided((S, 7, D), g, how), torch.randn(S, 7, generator=g),
                strided((S, D, 7), g, how), torch.randn(S, D, generator=g), "silu", slots), dict(seg=seg)
    if op == "prompt_prepend":
        return (x, torch.ones(B, L, dtype=torch.bool), torch.randn(S, 3, D, generator=g), torch.tensor([3, 1, 2, 3]),
                slots), dict(P=3)
    if op == "prefix_gather":
        return (torch.randn(S, 2, 3, 4, generator=g), torch.randn(S, 2, 3, 4, generator=g), slots, 2), {}
    if op == "dora":
        return (y, x, A, Bw, scale, torch.rand(S, N, generator=g) + 0.5, slots), dict(rank=rank, seg=seg)
    if op == "dora_norm":
        return (torch.randn(N, D, generator=g), A, Bw, scale), {}
    raise KeyError(op)


def clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, list):
        return [clone(t) for t in v]
    return v


def tensors_of(args, kwargs, skip):
    names = [(i, a) for i, a in enumerate(args)] + list(kwargs.items())
    return {k: v for k, v in names if k not in skip}


def consumed_positions(op):
    import inspect
    name = ops.CONSUMES.get(op)
    params = list(inspect.signature(ops.get(op)).parameters)
    return {params.index(name), name} if name else set()


def same(a, b):
    if isinstance(a, (list, tuple)):
        return all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return True


BACKENDS = ["reference", "triton"]


def test_every_registered_op_has_a_contract_case():
    import peftu_kernels.tenancy  # noqa: F401  (method files import the ops they register)
    g = torch.Generator().manual_seed(0)
    for op in ops.names():
        inputs(op, 1, "contiguous", g)  # raises KeyError for an op this file does not know


def test_consumed_arguments_are_real_parameters():
    for op, name in ops.CONSUMES.items():
        assert name in __import__("inspect").signature(ops.get(op)).parameters, (op, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["contiguous", "sliced", "transposed"])
@pytest.mark.parametrize("L", [1, 3])
def test_each_op_follows_the_contract(backend, how, L):
    import peftu_kernels.tenancy  # noqa: F401
    for op in ops.names():
        fn = ops.get(op, backend)
        if fn is ops.get(op, "reference") and backend != "reference":
            continue  # falls back to the reference, checked there
        g = torch.Generator().manual_seed(hash((op, how, L)) % 2**31)
        args, kwargs = inputs(op, L, how, g)
        want = ops.get(op, "reference")(*clone(args), **{k: clone(v) for k, v in kwargs.items()})
        skip = consumed_positions(op)
        before = {k: clone(v) for k, v in tensors_of(args, kwargs, skip).items()}
        with torch.no_grad():
            got = fn(*args, **kwargs)
        for k, v in tensors_of(args, kwargs, skip).items():
            assert same(v, before[k]), f"{backend} {op} ({how}, L={L}) changed argument {k}, which it does not consume"
        if op == "lora_shrink":  # its semantics leave rows without a user undefined (lora_expand never reads them)
            on = args[3] >= 0
            want, got = want[on], got[on]
        for w, o in (zip(want, got) if isinstance(want, (list, tuple)) else [(want, got)]):
            torch.testing.assert_close(o, w, **tol(torch.float32, "kernel"),
                                       msg=lambda m: f"{backend} {op} ({how}, L={L}): {m}")
