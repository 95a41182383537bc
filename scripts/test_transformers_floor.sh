#!/usr/bin/env bash
# The transformers-facing tests on the oldest transformers that setup.cfg accepts (the GPU machines
# run it), in an environment of their own (.venv-floor) so that .venv keeps the pinned version.
# `make test-floor`; extra arguments go to pytest. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOOR=$(sed -n 's/^ *transformers>=\([0-9.]*\).*/\1/p' setup.cfg)
STAMP=.venv-floor/.installed
if ! .venv-floor/bin/python -c "import sys, transformers; sys.exit(transformers.__version__ != '$FLOOR')" 2>/dev/null \
    || [ requirements.txt -nt "$STAMP" ] || [ setup.cfg -nt "$STAMP" ]; then
  VENV=.venv-floor TRANSFORMERS=$FLOOR bash scripts/setup_env.sh
  touch "$STAMP"
fi
.venv-floor/bin/python -m pytest -q tests/test_transformers_integration.py tests/test_model_conventions.py \
  tests/test_processor_conventions.py tests/test_modeling.py tests/test_processing.py tests/test_serve.py \
  tests/test_chat.py tests/test_modality_experts.py tests/test_eve2.py "$@"
