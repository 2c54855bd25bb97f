#!/usr/bin/env bash
# The core tests that guard the transformers internals we rely on (fused 3-D experts, logits-first router
# outputs, adapter discovery) on the NEWEST transformers the registry serves, in its own venv (.venv-latest),
# so a break shows the day a release lands. Everything else keeps constraints.txt's versions; the hub
# stack (transformers, tokenizers, huggingface-hub, safetensors) floats to what the newest transformers needs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
V=.venv-latest
if [ ! -x $V/bin/python ]; then "$PY" -m venv $V; fi
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
grep -viE "^(transformers|tokenizers|huggingface[-_]hub|safetensors)==" constraints.txt > "$pin"
q() { "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
q $V/bin/python -m pip install -q -c "$pin" torch
q $V/bin/python -m pip install -q -c "$pin" --upgrade transformers -e ".[test]"
$V/bin/python -c "import transformers, torch; print('latest-transformers venv: transformers', transformers.__version__, '| torch', torch.__version__)"
$V/bin/python -m pytest -q -p no:cacheprovider tests/test_adapters.py tests/test_profile.py tests/test_quantize_archs.py "$@"
