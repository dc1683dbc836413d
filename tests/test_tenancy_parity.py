"""Mixed batches: every row equals its user's adapter alone (HF PEFT as the oracle where it has the method)."""
import pytest
import torch

from helpers import TOL, assert_rel_close, hf_twin
from peft_users import PEFT_CFG, SingleAdapter, adapter_module, peft_configs, peft_model
from peftu_kernels.config import T5Config
from peftu_kernels.generate import greedy, score_labels
from peftu_kernels.tenancy import Engine
from peftu_kernels.tenancy.hf_peft import export_peft, import_peft


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = T5Config(**PEFT_CFG)
    hf, ours = hf_twin(cfg, seed=11)
    root = tmp_path_factory.mktemp("peft")
    oracles, eng = {}, Engine(ours, backend="reference")
    for i, (name, pc) in enumerate(peft_configs().items()):
        pm = peft_model(hf, pc, seed=100 + i)
        pm.save_pretrained(root / name)
        oracles[name] = pm
        eng.register(name, import_peft(root / name, ours))
    adapters = {"houlsby": adapter_module(cfg, "houlsby", 5, "silu", 1),
                "pfeiffer": adapter_module(cfg, "pfeiffer", 3, "relu", 2),
                "houlsby_gelu": adapter_module(cfg, "houlsby", 8, "gelu_new", 3)}
    for name, m in adapters.items():
        eng.register(name, m)
    return cfg, hf, ours, eng, oracles, adapters


def batch(cfg, B, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(B):  # mixed padding, both sides
        n = int(torch.randint(0, 3, (1,), generator=g))
        if b % 2:
            mask[b, :n] = 0
        elif n:
            mask[b, -n:] = 0
    dec = torch.randint(3, cfg.vocab_size, (B, 4), generator=g)
    return ids.masked_fill(mask == 0, 0), mask, dec


def oracle_logits(world, user, ids, mask, dec):
    cfg, hf, ours, eng, oracles, adapters = world
    with torch.no_grad():
        if user is None:
            return hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        if user in oracles:
            return oracles[user](input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        return ours(ids, dec, mask, peft=SingleAdapter(adapters[user]))


def test_every_method_changes_the_output(world):
    cfg, hf, ours, eng, oracles, adapters = world
    ids, mask, dec = batch(cfg, 2)
    base = oracle_logits(world, None, ids, mask, dec)
    for user in list(oracles) + list(adapters):
        assert (oracle_logits(world, user, ids, mask, dec) - base).abs().max() > 1e-2, user


def test_mixed_batch_rows_equal_each_user_alone(world):
    cfg, hf, ours, eng, oracles, adapters = world
    users = list(oracles) + list(adapters) + [None]
    rows = users + users[::-1]  # every method, twice, and rows with no user
    ids, mask, dec = batch(cfg, len(rows), seed=3)
    with torch.no_grad():
        got = ours(ids, dec, mask, peft=eng.batch(rows))
    for b, u in enumerate(rows):
        ref = oracle_logits(world, u, ids[b:b + 1], mask[b:b + 1], dec[b:b + 1])
        assert_rel_close(got[b:b + 1], ref, msg=lambda m: f"row {b} user {u}: {m}")


def test_batch_invariance_with_random_batch_mates(world):
    cfg, hf, ours, eng, oracles, adapters = world
    users = list(oracles) + list(adapters) + [None]
    g = torch.Generator().manual_seed(5)
    ids, mask, dec = batch(cfg, 1, seed=9)
    for target in users:
        with torch.no_grad():
            alone = ours(ids, dec, mask, peft=eng.batch([target]))
        for trial in range(2):
            mates = [users[int(i)] for i in torch.randint(0, len(users), (5,), generator=g)]
            pos = int(torch.randint(0, 6, (1,), generator=g))
            rows = mates[:pos] + [target] + mates[pos:]
            o_ids, o_mask, o_dec = batch(cfg, 6, seed=trial + 20)
            o_ids[pos], o_mask[pos], o_dec[pos] = ids[0], mask[0], dec[0]
            with torch.no_grad():
                got = ours(o_ids, o_dec, o_mask, peft=eng.batch(rows))
            assert_rel_close(got[pos:pos + 1], alone)


def test_generation_and_label_scores_per_row_equal_user_alone(world):
    cfg, hf, ours, eng, oracles, adapters = world
    rows = ["prefix", "lora_all_r7", None, "prompt", "houlsby", "ia3", "prefix2", "ptuning", "pfeiffer"]
    ids, mask, _ = batch(cfg, len(rows), seed=4)
    labels = [[5, 1], [7, 8, 1], [9, 1]]
    gen = greedy(ours, ids, mask, 6, peft=eng.batch(rows))
    sc = score_labels(ours, ids, mask, labels, peft=eng.batch(rows))
    for b, u in enumerate(rows):
        alone = greedy(ours, ids[b:b + 1], mask[b:b + 1], 6, peft=eng.batch([u]))
        n = alone.shape[1]
        assert torch.equal(gen[b, :n], alone[0]), (u, gen[b], alone)
        assert (gen[b, n:] == cfg.pad_token_id).all()
        torch.testing.assert_close(sc[b:b + 1], score_labels(ours, ids[b:b + 1], mask[b:b + 1], labels,
                                                             peft=eng.batch([u])), **TOL[torch.float32])


def test_generation_matches_peft_generate(world):
    cfg, hf, ours, eng, oracles, adapters = world
    ids, mask, _ = batch(cfg, 3, seed=6)
    for u in ("lora_qv_r4", "prompt", "prefix", "ia3"):
        ref = oracles[u].generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=1)
        got = greedy(ours, ids, mask, 5, peft=eng.batch([u] * 3))
        assert torch.equal(got, ref[:, 1:1 + got.shape[1]]), u


def test_label_scores_match_peft(world):
    cfg, hf, ours, eng, oracles, adapters = world
    ids, mask, _ = batch(cfg, 2, seed=8)
    labels = [[5, 6, 1], [11, 1]]
    for u in ("prefix", "ptuning", "lora_rs_r1"):
        got = score_labels(ours, ids, mask, labels, peft=eng.batch([u, u]))
        for c, lab in enumerate(labels):
            t = torch.tensor(lab).expand(2, -1).contiguous()
            with torch.no_grad():
                lg = oracles[u](input_ids=ids, attention_mask=mask, labels=t).logits
            ref = torch.log_softmax(lg, -1).gather(-1, t[..., None]).squeeze(-1).sum(-1)
            assert_rel_close(got[:, c], ref)


@pytest.mark.parametrize("name", ["lora_all_r7", "ia3", "prompt", "ptuning", "prefix"])
def test_peft_folder_round_trip(world, tmp_path, name):
    import peft
    cfg, hf, ours, eng, oracles, adapters = world
    mod = eng.modules(name)[0]
    export_peft(mod, tmp_path / name, ours)
    again = import_peft(tmp_path / name, ours)
    assert again.method == mod.method and again.tensors.keys() == mod.tensors.keys()
    for k in mod.tensors:
        assert torch.equal(again.tensors[k], mod.tensors[k]), k
    # and PEFT itself reads the export and computes the same as the original adapter
    import copy
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / name).eval()
    ids, mask, dec = batch(cfg, 2, seed=1)
    with torch.no_grad():
        got = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert_rel_close(got, oracle_logits(world, name, ids, mask, dec))
