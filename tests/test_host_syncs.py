"""A generated token makes no host sync: everything that depends only on who is in the batch is planned once
in Engine.batch (PeftBatch's plans, Segments), and the decoder step reuses it. Counted with a dispatch mode
that sees every aten op: reading a value back (`item`, `bool`, `int`, `tolist`), nonzero / masked_select /
unique, and indexing with a bool mask (which finds its nonzeros on the host)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import small_cfg
from tenancy_users import KINDS, _prefix, make
from peftu_kernels.generate import greedy
from peftu_kernels.t5 import T5
from peftu_kernels.tenancy import Engine

_SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2", "unique_dim", "equal",
         "is_nonzero", "repeat_interleave", "item"}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name in _SYNC or bool_index:
            self.hits.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    cfg = small_cfg("relu-tied")
    model = T5.from_config(cfg).eval()
    eng = Engine(model, backend="reference")
    users = []
    for i, kind in enumerate(KINDS):
        eng.register(kind, make(cfg, kind, i))
        users.append(kind)
    eng.register("prefix_ah_all", [_prefix(cfg, 9, 2, ("encoder", "decoder", "cross"), "adapterhub")])
    users.append("prefix_ah_all")
    return cfg, model, eng, users + [None]


def test_counter_sees_a_sync():
    """The counter can fail: a plain bool() of a tensor and a bool-mask index are seen."""
    x = torch.randn(4)
    with SyncCounter() as c:
        bool(x.sum() > 0)
        x[x > 0]
    assert "_local_scalar_dense" in c.hits and "index" in c.hits


@pytest.mark.parametrize("rows", ["every kind", "one user", "lora and base"])
def test_a_decode_step_makes_no_host_sync(world, rows):
    cfg, model, eng, users = world
    rows = {"every kind": users, "one user": ["lora"] * 3, "lora and base": ["lora", None, "lora"]}[rows]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (len(rows), 7), generator=g)
    with torch.no_grad():
        peft = eng.batch(rows)
        enc, mask = model.encode(ids, None, peft)
        cache = model.new_cache(enc, mask, peft, 4)
        tok = torch.zeros(len(rows), 1, dtype=torch.long)
        model.decode(tok, enc, mask, peft, cache)  # first step outside: it may warm lazy caches
        with SyncCounter() as c:
            for _ in range(2):
                tok = model.decode(tok, enc, mask, peft, cache)[:, -1].argmax(-1)[:, None]
    assert c.hits == [], f"host syncs in a decode step: {c.hits}"


def test_greedy_syncs_only_for_its_stop_check(world):
    cfg, model, eng, users = world
    ids = torch.randint(3, cfg.vocab_size, (len(users), 6), generator=torch.Generator().manual_seed(2))
    peft = eng.batch(users)
    counts = {}
    for n in (2, 5):
        with SyncCounter() as c:
            greedy(model, ids, None, n, peft=peft, stop_at_eos=False)
        counts[n] = c.hits
    enc_only = SyncCounter()
    with enc_only, torch.no_grad():
        model.encode(ids, None, peft)
    # the encoder's input check reads the ids back once, the non-finite report once after the loop; no step of
    # the loop adds any (stop check off): 2 and 5 steps make the same syncs
    assert counts[2] == counts[5] and len(counts[5]) == len(enc_only.hits) + 1, (counts, enc_only.hits)
