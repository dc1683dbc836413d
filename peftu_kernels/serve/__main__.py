"""python -m peftu_kernels.serve --model FOLDER --adapters DIR [--port 8000]: the HTTP server (serve extra).

--model: an HF T5 folder (config.json + safetensors, tokenizer files if any) or a hub id; --shape NAME serves
random weights of a preset's shape instead (for load tests). --adapters: a folder of user folders (HF PEFT,
AdapterHub or peftu), loaded on a user's first request. --api-key / PEFTU_API_KEY or --api-keys FILE: who may
call which users (auth.py); without either the server is open to every client, and says so at start."""
from __future__ import annotations

import argparse
import sys


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m peftu_kernels.serve", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF T5 folder or hub id")
    src.add_argument("--shape", help="a preset name (flan-t5-small, ...): random weights of that shape")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder, if it has one)")
    ap.add_argument("--adapters", default=None, help="folder of user adapter folders")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--max-rows", type=int, default=32, help="concurrent decoding requests (KV pool rows)")
    ap.add_argument("--max-input-len", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device-capacity", type=int, default=256, help="users in bank slots")
    ap.add_argument("--host-capacity", type=int, default=4096, help="users in host memory")
    ap.add_argument("--max-queue", type=int, default=4096)
    ap.add_argument("--max-virtual", type=int, default=64,
                    help="most virtual tokens (prompt tuning) or prefix length an adapter may have")
    ap.add_argument("--max-labels", type=int, default=64, help="most label candidates per /v1/score request")
    ap.add_argument("--max-label-tokens", type=int, default=2048, help="most label tokens in all per score request")
    ap.add_argument("--request-timeout", type=float, default=120.0,
                    help="seconds from arrival after which a request ends with a timeout (504), whatever it waits on")
    ap.add_argument("--max-n", type=int, default=8, help="most choices (n) per completion request")
    ap.add_argument("--metrics-users", type=int, default=0,
                    help="per-user metric series for this many of the heaviest users (0: none, all summed)")
    ap.add_argument("--api-key", default=None, help="one key for every route (default: $PEFTU_API_KEY)")
    ap.add_argument("--api-keys", default=None, metavar="FILE", help="tenants: keys, their users and rights (JSON)")
    return ap.parse_args(argv)


def keys_of(a):
    """The server's keys, or exit at once with the reason (a key file that cannot be used stops the server)."""
    from .auth import KeyFileError, from_options
    try:
        keys = from_options(a.api_key, a.api_keys)
    except KeyFileError as e:
        raise SystemExit(f"peftu serve: {e}") from None
    if keys is None:
        print("peftu serve: no API key (--api-key, PEFTU_API_KEY or --api-keys): every client may call every user "
              "and manage adapters", file=sys.stderr)
    return keys


def build(a):
    import torch

    from .. import T5, T5Config, load_pretrained
    from ..checkpoint import resolve
    from ..tenancy import Engine
    from . import AdapterStore, ServingEngine
    if a.model:
        model = load_pretrained(a.model, device=a.device).eval()
        tok_dir = a.tokenizer or resolve(a.model)
    else:
        model = T5.from_config(T5Config.from_name(a.shape), device=a.device).eval()
        tok_dir = a.tokenizer
    tok = None
    if tok_dir is not None:
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(str(tok_dir))
        except (OSError, ValueError):
            tok = None  # ids only
    eng = Engine(model, backend=a.backend, capacity=a.device_capacity)
    store = AdapterStore(eng, a.adapters, host_capacity=a.host_capacity) if a.adapters else None
    srv = ServingEngine(model, eng, store, max_rows=a.max_rows, max_input_len=a.max_input_len,
                        max_new_tokens=a.max_new_tokens, max_queue=a.max_queue, max_virtual=a.max_virtual,
                        max_labels=a.max_labels, max_label_tokens=a.max_label_tokens,
                        request_timeout=a.request_timeout, max_n=a.max_n, metrics_users=a.metrics_users)
    torch.set_grad_enabled(False)
    return srv, tok


def main(argv=None):
    import uvicorn

    from .http import build_app
    a = parse(argv)
    keys = keys_of(a)  # before the model loads: a bad key file stops the server at once
    srv, tok = build(a)
    uvicorn.run(build_app(srv, tok, keys=keys), host=a.host, port=a.port, log_level="info")


if __name__ == "__main__":
    main()
