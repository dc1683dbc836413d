#!/usr/bin/env bash
# README's test command: set up, then the default (quick) suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python -m pytest -q -m "not slow and not gpu"
