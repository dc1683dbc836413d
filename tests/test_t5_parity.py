"""Our T5 against transformers' T5ForConditionalGeneration on small random configs."""
import pytest
import torch

from helpers import SMALL_CONFIGS, TOL, hf_twin, padded_batch, small_cfg
from peftu_kernels.generate import greedy, score_labels


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_logits_match_transformers(name):
    cfg = small_cfg(name)
    hf, ours = hf_twin(cfg)
    ids, mask = padded_batch(cfg.vocab_size)
    dec = torch.randint(0, cfg.vocab_size, (ids.shape[0], 6))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        out = ours(ids, dec, mask)
    assert ref.std() > 0.1  # the test has signal
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("name", ["gated-untied", "relu-tied"])
def test_greedy_matches_hf_generate(name):
    cfg = small_cfg(name, num_decoder_layers=None)  # HF's cache in generate needs equal depths
    hf, ours = hf_twin(cfg, seed=3)
    ids, mask = padded_batch(cfg.vocab_size, B=5)
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, num_beams=1)
    out = greedy(ours, ids, mask, max_new_tokens=9)
    assert torch.equal(out, ref[:, 1:1 + out.shape[1]])
    assert out.shape[1] == ref.shape[1] - 1


def test_greedy_stops_at_eos_and_pads():
    cfg = small_cfg("gated-untied")
    hf, ours = hf_twin(cfg, seed=1)
    ids, mask = padded_batch(cfg.vocab_size, B=4)
    first = greedy(ours, ids, mask, max_new_tokens=6)
    t = int(first[0, 1])
    with torch.no_grad():  # EOS gets token t's head row: equal logits, and argmax takes the lower id (EOS)
        for m in (ours, hf):
            m.lm_head.weight[cfg.eos_token_id] = m.lm_head.weight[t]
    out = greedy(ours, ids, mask, max_new_tokens=6)
    assert out[0, 1] == cfg.eos_token_id
    for row in out.tolist():
        if cfg.eos_token_id in row:
            assert all(x == cfg.pad_token_id for x in row[row.index(cfg.eos_token_id) + 1:])
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=1)
    assert torch.equal(out, ref[:, 1:1 + out.shape[1]])
    assert greedy(ours, ids[:1], mask[:1], max_new_tokens=6).shape[1] == 2  # stops when every row is done


@pytest.mark.parametrize("name", ["gated-untied", "relu-tied"])
def test_label_scores_equal_summed_log_softmax(name):
    cfg = small_cfg(name)
    hf, ours = hf_twin(cfg, seed=5)
    ids, mask = padded_batch(cfg.vocab_size, B=3)
    labels = [[5, 6, 1], [7, 1], [9, 10, 11, 12, 1]]
    got = score_labels(ours, ids, mask, labels)
    for c, lab in enumerate(labels):
        t = torch.tensor(lab).expand(ids.shape[0], -1).contiguous()
        with torch.no_grad():
            lg = hf(input_ids=ids, attention_mask=mask, labels=t).logits
        ref = torch.log_softmax(lg, -1).gather(-1, t[..., None]).squeeze(-1).sum(-1)
        torch.testing.assert_close(got[:, c], ref, **TOL[torch.float32])


def test_padding_side_does_not_change_outputs():
    cfg = small_cfg("gated-untied")
    _, ours = hf_twin(cfg, seed=2)
    x = torch.randint(3, cfg.vocab_size, (1, 7))
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    right = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1)
    dec = torch.randint(3, cfg.vocab_size, (1, 4))
    with torch.no_grad():
        a = ours(x, dec)
        b = ours(left, dec, (left != 0).long())
        c = ours(right, dec, (right != 0).long())
    torch.testing.assert_close(b, a, **TOL[torch.float32])
    torch.testing.assert_close(c, a, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(dtype):
    cfg = small_cfg("gated-untied")
    _, ours = hf_twin(cfg, seed=4)
    ids, mask = padded_batch(cfg.vocab_size)
    dec = torch.randint(3, cfg.vocab_size, (ids.shape[0], 5))
    with torch.no_grad():
        ref = ours(ids, dec, mask)
        low = ours.to(dtype)(ids, dec, mask)
    assert low.dtype == dtype
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < (0.05 if dtype == torch.bfloat16 else 0.01), rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_training_attention_matches_fp32(dtype):
    """The CPU 16-bit training path (plain matmuls, fp32 softmax) against fp32 SDPA: output and gradients."""
    from peftu_kernels.t5 import attention
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 2, 7, 8, generator=g) for _ in range(3))
    bias = torch.randn(3, 2, 7, 7, generator=g)
    w = torch.randn(3, 2, 7, 8, generator=g)
    outs = []
    for dt in (torch.float32, dtype):
        leaves = [t.to(dt).requires_grad_(True) for t in (q, k, v)]
        b = bias.to(dt)
        b[1, :, :, 5:] = torch.finfo(dt).min  # padded keys, as mask_to_bias writes them
        out = attention(*leaves, b)
        outs.append([out.detach().float(), *(x.float() for x in torch.autograd.grad((out.float() * w).sum(), leaves))])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-2 * float(a.abs().max()))
