"""Which epoch each user-module of a bench_suite run kept (lowest validation loss), per method.

python -m benchmarks.best_epochs runs/default   -> a table: method, then how many modules kept epoch 1, 2, ...
Reads the run's train/<task>/<method>/users/<user>/state.json (their validation-loss history); no test data.
"""
from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def best_epochs(out: Path) -> dict[str, Counter]:
    by = defaultdict(Counter)
    for f in sorted(Path(out).glob("train/*/*/users/*/state.json")):
        d = json.loads(f.read_text())
        h = d["history"]
        by[d["method"]][h.index(min(h)) + 1] += 1
    return by


def main(argv=None):
    out = Path((argv or sys.argv[1:] or ["runs/default"])[0])
    by = best_epochs(out)
    if not by:
        raise SystemExit(f"{out}: no train/*/*/users/*/state.json (a bench_suite run's output folder?)")
    epochs = sorted({e for c in by.values() for e in c})
    print("| method | " + " | ".join(f"epoch {e}" for e in epochs) + " | modules |")
    print("|---|" + "---|" * (len(epochs) + 1))
    for m, c in sorted(by.items()) + [("all", sum(by.values(), Counter()))]:
        print(f"| {m} | " + " | ".join(str(c[e]) for e in epochs) + f" | {sum(c.values())} |")


if __name__ == "__main__":
    main()
