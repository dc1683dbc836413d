"""Per-row decoding in the library (peftu_kernels.sample): greedy rows equal `greedy` beside sampling rows,
sampled tokens follow the asked distribution (chi-square against the model's own softmax, truncated by an
independent top-k / top-p written here), a seeded row is the same in any batch, stop sequences, logprobs equal
the model's teacher-forced log-softmax, every bad setting refused by name."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import small_cfg
from peftu_kernels import Sampling, greedy, sample
from peftu_kernels.sampling import pick, row_generator
from peftu_kernels.t5 import T5
from peftu_kernels.tenancy import Engine
from tenancy_users import make

scipy_stats = pytest.importorskip("scipy.stats", reason="needs scipy (the test extra) for the chi-square test")


@pytest.fixture(scope="module")
def world():
    m = T5.from_config(small_cfg("gated-untied", d_model=36, d_kv=12, num_heads=3), seed=7).eval()
    eng = Engine(m, backend="reference")
    for i, kind in enumerate(["lora", "prefix", "prompt", "ia3"]):
        eng.register(f"u{i}", make(m.cfg, kind, 30 + i))
    return m, eng


def _expected(logits: torch.Tensor, T: float, top_k: int, top_p: float) -> np.ndarray:
    """The asked distribution, written independently of sampling.py: float64, a loop over sorted tokens."""
    p = torch.softmax(logits.double() / T, -1).numpy()
    order = np.argsort(-p, kind="stable")
    keep, mass = [], 0.0
    for rank, t in enumerate(order):
        if (top_k and rank >= top_k) or (top_p < 1 and mass >= top_p):
            break
        keep.append(t)
        mass += p[t]
    q = np.zeros_like(p)
    q[keep] = p[keep]
    return q / q.sum()


@pytest.mark.parametrize("T,top_k,top_p", [(1.0, 0, 1.0), (0.4, 0, 1.0), (0.7, 6, 1.0), (1.3, 0, 0.5), (0.8, 10, 0.8)])
def test_sampled_tokens_follow_the_asked_distribution(world, T, top_k, top_p):
    m, eng = world
    N = 6000
    ids = torch.tensor([[5, 9, 14, 3, 22]] * N)
    s = Sampling(temperature=T, top_k=top_k, top_p=top_p)
    out = sample(m, ids, None, [Sampling(T, top_p, top_k, seed=i) for i in range(N)], 1, eng.batch(["u0"] * N))
    got = np.bincount([t[0] for t in out.tokens], minlength=m.cfg.vocab_size)
    with torch.no_grad():  # the model's own next-token logits for this prompt, one row
        logits = m.decode(torch.tensor([[m.cfg.decoder_start_token_id]]), *m.encode(ids[:1], None, eng.batch(["u0"])),
                          eng.batch(["u0"]))[0, -1]
    q = _expected(logits, s.temperature, s.top_k, s.top_p)
    assert got[q == 0].sum() == 0, "tokens outside top-k / top-p were sampled"
    exp = q * N
    big = exp >= 5  # chi-square needs >= 5 expected per bin: the small ones pooled
    f_obs, f_exp = list(got[big]), list(exp[big])
    if (~big & (q > 0)).any():
        f_obs.append(got[~big & (q > 0)].sum())
        f_exp.append(exp[~big & (q > 0)].sum())
    assert len(f_obs) >= 2
    p = scipy_stats.chisquare(f_obs, f_exp).pvalue
    assert p > 1e-4, (p, f_obs[:8], f_exp[:8])


def test_greedy_rows_beside_sampling_rows_are_greedy_to_the_token(world):
    m, eng = world
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (6, 9), generator=g)
    users = ["u0", "u1", None, "u2", "u3", "u0"]
    want = greedy(m, ids, None, 8, eng.batch(users))
    rows = [Sampling(), Sampling(1.0, seed=1), Sampling(), Sampling(0.5, top_k=3, seed=2), Sampling(), Sampling()]
    out = sample(m, ids, None, rows, 8, eng.batch(users))
    for i in (0, 2, 4, 5):
        w = want[i].tolist()
        w = w[:w.index(m.cfg.eos_token_id) + 1] if m.cfg.eos_token_id in w else w
        assert out.tokens[i] == w


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2 ** 40), st.integers(1, 7), st.integers(0, 6), st.data())
def test_a_seeded_row_gives_the_same_tokens_in_any_batch(world, seed, B, at, data):
    m, eng = world
    at = min(at, B - 1)
    mine = Sampling(0.9, top_p=0.95, seed=seed)
    ids = [5, 7, 11, 2, 40]
    alone = sample(m, torch.tensor([ids]), None, [mine], 6, eng.batch(["u1"])).tokens[0]
    others = [data.draw(st.sampled_from(["u0", "u1", "u2", "u3", None])) for _ in range(B)]
    rows = [Sampling(data.draw(st.sampled_from([0.0, 0.7, 1.5])), seed=data.draw(st.integers(0, 99)))
            for _ in range(B)]
    L = 9
    batch = torch.randint(3, 90, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    batch[at], mask[at] = 0, 0
    batch[at, :len(ids)], mask[at, :len(ids)] = torch.tensor(ids), 1
    others[at], rows[at] = "u1", mine
    out = sample(m, batch, mask, rows, 6, eng.batch(others))
    assert out.tokens[at] == alone


def test_stop_sequences_end_a_row_and_are_left_out(world):
    m, eng = world
    ids = torch.tensor([[5, 9, 14, 3, 22], [8, 8, 9, 30, 31]])
    g = greedy(m, ids, None, 8, eng.batch(["u0", "u2"]), stop_at_eos=False)[0].tolist()
    seq = tuple(g[3:5])
    first = next(i for i in range(len(g) - 1) if tuple(g[i:i + 2]) == seq)
    out = sample(m, ids, None, [Sampling(stop=(seq, (999 % m.cfg.vocab_size,))), Sampling()], 8,
                 eng.batch(["u0", "u2"]))
    assert out.tokens[0] == g[:first] and out.finish_reason[0] == "stop"
    one = sample(m, ids[:1], None, [Sampling(stop=((g[2],),))], 8, eng.batch(["u0"]))
    assert one.tokens[0] == g[:g.index(g[2])] and one.finish_reason[0] == "stop"


def test_logprobs_are_the_models_own_log_softmax(world):
    m, eng = world
    ids = torch.tensor([[5, 9, 14, 3, 22], [8, 8, 9, 30, 31]])
    users = ["u1", "u3"]
    out = sample(m, ids, None, [Sampling(0.8, seed=3, logprobs=4), Sampling(logprobs=0)], 6, eng.batch(users))
    for i in range(2):
        toks = out.tokens[i]
        dec = torch.tensor([[m.cfg.decoder_start_token_id] + toks[:-1]])
        with torch.no_grad():  # teacher-forced: one pass over the row's own tokens, no cache
            p = eng.batch([users[i]])
            logp = torch.log_softmax(m.decode(dec, *m.encode(ids[i:i + 1], None, p), p)[0].double(), -1)
        want = [logp[j, t].item() for j, t in enumerate(toks)]
        assert out.logprobs[i] == pytest.approx(want, abs=2e-4)
        k = [0, 4][i == 0]
        for j, top in enumerate(out.top_logprobs[i]):
            assert [t for t, _ in top] == logp[j].topk(k).indices.tolist() if k else top == []
            assert [v for _, v in top] == pytest.approx(logp[j].topk(k).values.tolist(), abs=2e-4)


@pytest.mark.parametrize("field,value,msg", [
    ("temperature", -0.1, "temperature"), ("temperature", 2.5, "temperature"), ("temperature", float("nan"), "temperature"),
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("top_k", -1, "top_k"), ("top_k", 10 ** 9, "top_k"),
    ("top_k", True, "top_k"), ("seed", -1, "seed"), ("seed", 2 ** 63, "seed"), ("seed", 1.5, "seed"),
    ("logprobs", 21, "logprobs"), ("logprobs", -1, "logprobs"), ("stop", ((),), "stop sequence 0"),
    ("stop", ((5, 10 ** 7),), "stop sequence 0"), ("stop", ([5],), "stop sequence 0"),
])
def test_bad_settings_are_refused_by_name(world, field, value, msg):
    m, _ = world
    with pytest.raises(ValueError, match=msg):
        sample(m, torch.tensor([[5, 6]]), None, Sampling(**{field: value}), 2)


def test_pick_draws_one_uniform_per_sampling_row_from_its_own_stream():
    logits = torch.randn(3, 50)
    rows = [Sampling(1.0, seed=4), Sampling(), Sampling(1.0, seed=4)]
    gens = [row_generator(4), None, row_generator(4)]
    a = pick(logits, rows, gens).tokens
    assert a[1] == logits[1].argmax().item() and a[0] == pick(logits[:1], rows[:1], [row_generator(4)]).tokens[0]
    assert a[2] == pick(logits[2:], rows[2:], [row_generator(4)]).tokens[0]
    # choice k of a seeded request has its own stream: choices differ, each reproducible
    streams = [[torch.rand(1, generator=g).item() for _ in range(3)] for g in map(lambda k: row_generator(4, k), range(3))]
    assert len({tuple(s) for s in streams}) == 3
    g = row_generator(4, 1)
    assert streams[1] == [torch.rand(1, generator=g).item() for _ in range(3)]
