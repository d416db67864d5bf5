#!/usr/bin/env bash
# Create .venv with torch first (the pinned CPU wheel on these machines; any torch>=2.4
# elsewhere), then safeneuron and its dependencies at the versions CI tested (constraints.txt).
# Idempotent: a ready venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${SAFENEURON_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
stamp=.venv/.safeneuron-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  # constraints.txt: the versions CI tested; SAFENEURON_UNPINNED=1 takes the newest the floors allow
  if [ -n "${SAFENEURON_UNPINNED:-}" ]; then
    .venv/bin/pip install -q -e ".[test]"
  else
    .venv/bin/pip install -q -c constraints.txt -e ".[test]"
  fi
  touch "$stamp"
fi
