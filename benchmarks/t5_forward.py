"""Our T5 against transformers' on the same weights: forward (encoder + short decoder) and greedy generation.

python -m benchmarks.t5_forward [--shape flan-t5-small] [--batch 32] [--seq 128] [--device cpu]
Prints a markdown table with ratios (transformers / ours: >1 means we are faster).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import environment, interleaved, table, write_jsonl
from peftu_kernels.config import T5Config
from peftu_kernels.generate import greedy
from peftu_kernels.checkpoint import to_hf
from peftu_kernels.t5 import T5


def build(shape: str, device, dtype):
    cfg = T5Config.from_name(shape)
    ours = T5.from_config(cfg, dtype=torch.float32).eval()
    return cfg, ours.to(device, dtype), to_hf(ours).to(device, dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="flan-t5-small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dec", type=int, default=4, help="decoder tokens (labels are 1-4 tokens)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default="results/t5_forward.jsonl")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    cfg, ours, hf = build(a.shape, a.device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (a.batch, a.seq), generator=g).to(a.device)
    mask = torch.ones_like(ids)
    dec = torch.randint(3, cfg.vocab_size, (a.batch, a.dec), generator=g).to(a.device)
    with torch.inference_mode():
        diff = (ours(ids, dec, mask).float() - hf(input_ids=ids, attention_mask=mask,
                                                   decoder_input_ids=dec).logits.float()).abs().max().item()
        fwd = interleaved({"ours": lambda: ours(ids, dec, mask),
                           "transformers": lambda: hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)},
                          a.device)
        gen = interleaved({"ours": lambda: greedy(ours, ids, mask, a.new_tokens),
                           "transformers": lambda: hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                               max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)},
                          a.device, rounds=3, reps=1)
    rows = [{"bench": "t5_forward", "what": w, "shape": a.shape, "batch": a.batch, "seq": a.seq,
             "dtype": str(dtype).split(".")[-1], "ours_ms": r["ours"], "transformers_ms": r["transformers"],
             "speedup": r["transformers"] / r["ours"], "max_abs_logit_diff": diff}
            for w, r in (("forward", fwd), (f"greedy {a.new_tokens} tokens", gen))]
    env = environment(a.device)
    print(f"device: {env['device']}, torch {env['torch']}, transformers {env['transformers']}")
    print(table(rows, ["what", "shape", "batch", "seq", "dtype", "ours_ms", "transformers_ms", "speedup", "max_abs_logit_diff"]))
    write_jsonl(a.out, rows, env)


if __name__ == "__main__":
    main()
