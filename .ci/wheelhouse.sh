#!/usr/bin/env bash
# Print the directory holding a wheel of every pinned third-party package (requirements.txt with
# .ci/constraints.txt, plus .ci/requirements-nodeps.txt), downloading or building them the first time.
# Keyed like .ci/venv.sh's venv (requirements and Python version), so the multi-GB download happens once
# per machine and requirements; tests/test_install.py installs the llama-jax wheel with its declared
# dependencies from it, offline. Usage: .ci/wheelhouse.sh [PYTHON] (a Python 3.12 with pip; default .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
key=$( (cat requirements.txt .ci/constraints.txt .ci/requirements-nodeps.txt; "$PY" --version) | sha256sum | cut -c1-16)
dir="${LLAMA_JAX_CACHE:-$HOME/.cache/llama_jax}/wheels-$key"
if [ ! -f "$dir/.complete" ]; then
  echo "Filling $dir (once per requirements) ..." >&2
  rm -rf "$dir.partial"
  mkdir -p "$dir.partial"
  "$PY" -m pip wheel -q -w "$dir.partial" -r requirements.txt -c .ci/constraints.txt >&2
  "$PY" -m pip wheel -q --no-deps -w "$dir.partial" -r .ci/requirements-nodeps.txt >&2
  touch "$dir.partial/.complete"
  rm -rf "$dir"
  mv "$dir.partial" "$dir"
fi
echo "$dir"
