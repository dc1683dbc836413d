#!/usr/bin/env bash
# Fresh-machine set-up. The pinned CPU torch goes first: a plain `torch` requirement would pull a
# multi-GB CUDA build. numpy<2.4 keeps the Triton 3.6 interpreter working (it crashes with numpy >= 2.4
# on loops over a runtime bound; triton 3.6 is what the GPU machines carry).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" 2>/dev/null || python -m pip install -q "torch>=2.4"
python -m pip install -q -e ".[${1:-test}]"
