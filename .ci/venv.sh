#!/usr/bin/env bash
# Build (once per machine and requirements) the shared Python 3.12 virtual environment, then give this
# checkout its own light ./.venv on top of it (.ci/checkout_venv.sh: this clone installed editable there,
# never in the shared venv, so `llama_jax` and the llama-jax-* commands are this clone's, and two clones
# on one machine never import each other's code).
# Every transitive version is pinned by .ci/constraints.txt. The venv lives outside the clone, keyed by a hash
# of the requirements, so a fresh clone or a CI run on the same machine reuses it and only a change of
# requirements pays the (multi-GB) install again; the per-checkout venv takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  if python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    command -v python3.12; return
  fi
  local candidate
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  echo "error: Python 3.12 not found (looked for python3.12 on PATH and under pyenv)" >&2
  exit 1
}

# Code evaluation runs generated programs only in bubblewrap containers (docs/evaluation.md).
if ! command -v bwrap >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "Installing bubblewrap for the code-evaluation sandbox ..." >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap >/dev/null
  else
    echo "warning: bwrap not found: code evaluation and its tests need the Debian package bubblewrap" >&2
  fi
fi

PY=$(find_python312)
key=$( (cat requirements.txt .ci/constraints.txt .ci/requirements-nodeps.txt .ci/build_kenlm.sh; "$PY" --version) | sha256sum | cut -c1-16)
cache="${LLAMA_JAX_CACHE:-$HOME/.cache/llama_jax}"
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "Creating $venv with $("$PY" --version) ..." >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r requirements.txt -c .ci/constraints.txt
  # Packages whose declared dependencies would break the environment (see that file).
  "$venv/bin/python" -m pip install -q --no-deps -r .ci/requirements-nodeps.txt
  bash .ci/build_kenlm.sh "$venv"
  touch "$venv/.complete"
fi
bash .ci/checkout_venv.sh "$venv"  # ./.venv: this clone alone on top of the shared packages
