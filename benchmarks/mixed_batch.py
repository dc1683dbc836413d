"""Mixed-user forward: our engine vs the base model alone vs HF PEFT's `adapter_names` mixed batch.

python -m benchmarks.mixed_batch [--shape flan-t5-small] [--users 32] [--rank 8] [--batch 32] [--seq 128]
Every row a distinct LoRA user on all seven linears (q k v o wi_0 wi_1 wo). Ratios are against the base
model's forward on the same weights and inputs (1.0 = free); `vs_peft` = HF PEFT time / ours.
"""
from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.common import environment, interleaved, table, write_jsonl
from benchmarks.t5_forward import build
from peftu_kernels.tenancy import Engine
from peftu_kernels.tenancy.hf_peft import import_peft

TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def peft_users(hf, n: int, rank: int, folder):
    """n random LoRA adapters made by HF PEFT (saved as folders) and the PEFT model holding all of them."""
    import peft
    cfg = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg, adapter_name="u0")
    for i in range(1, n):
        pm.add_adapter(f"u{i}", cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
    pm.save_pretrained(folder)  # adapters not named "default" land in folder/<name>
    return pm.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="flan-t5-small")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dec", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--no-peft", action="store_true", help="skip the HF PEFT baseline")
    ap.add_argument("--out", default="results/mixed_batch.jsonl")
    a = ap.parse_args(argv)
    import tempfile
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    cfg, ours, hf = build(a.shape, a.device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        pm = peft_users(hf, a.users, a.rank, tmp)
        eng = Engine(ours, backend=a.backend)
        for i in range(a.users):
            eng.register(f"u{i}", import_peft(f"{tmp}/u{i}", ours))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (a.batch, a.seq), generator=g).to(a.device)
    mask = torch.ones_like(ids)
    dec = torch.randint(3, cfg.vocab_size, (a.batch, a.dec), generator=g).to(a.device)
    rows = [f"u{i % a.users}" for i in range(a.batch)]
    with torch.inference_mode():
        ref = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, adapter_names=rows).logits
        diff = (ours(ids, dec, mask, peft=eng.batch(rows)) - ref).abs().max().item()
        fns = {"base": lambda: ours(ids, dec, mask),
               "ours": lambda: ours(ids, dec, mask, peft=eng.batch(rows))}
        if not a.no_peft:
            fns["hf_peft"] = lambda: pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, adapter_names=rows)
        t = interleaved(fns, a.device)
    row = {"bench": "mixed_batch", "shape": a.shape, "users": a.users, "rank": a.rank, "batch": a.batch,
           "seq": a.seq, "backend": eng.backend, "base_ms": t["base"], "ours_ms": t["ours"],
           "ours_vs_base": t["ours"] / t["base"], "max_abs_diff_vs_peft": diff}
    if "hf_peft" in t:
        row.update(peft_ms=t["hf_peft"], peft_vs_base=t["hf_peft"] / t["base"], speedup_vs_peft=t["hf_peft"] / t["ours"])
    env = environment(a.device)
    print(f"device: {env['device']}, torch {env['torch']}, peft {env['peft']}")
    print(table([row], ["shape", "users", "rank", "batch", "seq", "backend", "base_ms", "ours_ms", "peft_ms",
                        "ours_vs_base", "peft_vs_base", "speedup_vs_peft", "max_abs_diff_vs_peft"]))
    write_jsonl(a.out, [row], env)


if __name__ == "__main__":
    main()
