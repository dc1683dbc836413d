"""python -m bench_suite.serve [--out runs/default] [--port 8000]: serve the model and users of a finished
`python -m bench_suite.run` over HTTP (peftu_kernels.serve), text in, label out.

Every trained user is a model named `<task>/<method>/<user>`; `base` is the global model. A text prompt is
wrapped the way the run prompted that user (the task's instruction and the user's own demonstrations, left-
truncated to the run's --max-len), so `{"model": "tweeteval/lora/3", "prompt": "some text"}` returns the label
that user's module gives."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_run(out: Path):
    """(model, tokenizer, {user id: modules}, {user id: prompt head}, max_len) of a finished run."""
    from peftu_kernels import load_pretrained, load_tokenizer
    from peftu_kernels.tenancy import load_user
    from peftu_kernels.tenancy.store import read_manifest

    from .data import load_task
    from .workload import run_users
    res = out / "results.jsonl"
    if not res.is_file():
        raise SystemExit(f"{res}: no finished run here; run `python -m bench_suite.run --out {out}` first")
    env = json.loads(res.read_text().splitlines()[0])["env"]
    s = env["settings"]
    model_dir = env.get("model_dir") or next(iter(sorted((out.parent / "cache").glob("global-*"))), None)
    if s.get("model") or model_dir is None:
        raise SystemExit("this command serves runs of the embedded default; for a checkpoint run use "
                         "`python -m peftu_kernels.serve --model ... --adapters ...`")
    model, tok = load_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    users, heads = {}, {}
    for task_dir in sorted((out / "train").glob("*")):
        task = load_task(task_dir.name, s.get("data_dir"))
        prompts = {ud.user: ud.prompts["test"][0][1] for ud in run_users(task, s)}
        for best in sorted(task_dir.glob("*/users/*/best")):
            user = (read_manifest(best) or {}).get("user")
            if user is None or user not in prompts:
                continue
            uid = f"{task_dir.name}/{best.parents[2].name}/{user}"
            users[uid] = load_user(best)
            heads[uid] = prompts[user].rsplit("Text: ", 1)[0]
    return model, tok, users, heads, s["max_len"]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench_suite.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/default", help="the run's output folder")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=None, help="one key for every route (default: $PEFTU_API_KEY)")
    ap.add_argument("--api-keys", default=None, metavar="FILE", help="tenants: keys, their users and rights (JSON)")
    a = ap.parse_args(argv)
    import uvicorn

    from peftu_kernels.serve.__main__ import keys_of
    keys = keys_of(a)  # a key file that cannot be used stops here, before the model loads

    from peftu_kernels.serve import ServingEngine
    from peftu_kernels.serve.http import build_app
    from peftu_kernels.tenancy import Engine
    model, tok, users, heads, max_len = load_run(Path(a.out))
    eng = Engine(model)
    for u, mods in users.items():
        eng.register(u, mods)

    def encode(user, text):
        ids = tok(heads.get(user, "") + f"Text: {text} Label: ").input_ids
        return ids[-max_len:]
    srv = ServingEngine(model, eng, max_rows=32, max_input_len=max_len, max_new_tokens=16)
    print(f"serving {len(users)} users of {a.out} on http://{a.host}:{a.port} (models: GET /v1/models)")
    uvicorn.run(build_app(srv, tok, encode_prompt=encode, keys=keys), host=a.host, port=a.port, log_level="info")


if __name__ == "__main__":
    main()
