#!/usr/bin/env bash
# GPU check (issue #15), as one prepared script for a lent GPU machine: set up, then profile, balance,
# quantize (autoround, vsraq) and eval on Qwen3-30B-A3B's real width with LAYERS decoder layers (default 8;
# 48 = the full model, 61 GB bf16); writes benchmarks/results/gpu_check.json. CPU numbers: docs/scale.md.
#   bash benchmarks/gpu_check.sh [LAYERS]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/python benchmarks/gpu_check.py --layers "${1:-8}" --out runs/gpu-check
