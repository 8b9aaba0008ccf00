#!/usr/bin/env bash
# Give this checkout its own light virtual environment in ./.venv on top of a shared one (SHARED_VENV,
# built by .ci/venv.sh): the shared packages come in through a .pth line, and only this clone is installed
# (editable) in ./.venv, never in the shared venv, so two clones on one machine never import each other's
# code. Seconds; rerun it any time. Usage: .ci/checkout_venv.sh SHARED_VENV
set -euo pipefail
cd "$(dirname "$0")/.."
shared=$(readlink -f "$1")
if [ -L .venv ]; then rm .venv; fi  # earlier versions linked .venv to the shared venv itself
if [ ! -x .venv/bin/python ] || ! grep -qs "^# shared: $shared$" .venv/llama_jax_shared; then
  rm -rf .venv
  "$shared/bin/python" -m venv --without-pip .venv
  echo "# shared: $shared" > .venv/llama_jax_shared
fi
purelib=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
shared_purelib=$("$shared/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
# After the editable finder of this clone ("__editable__*" sorts first); addsitedir also runs the shared
# venv's own .pth files.
echo "import site; site.addsitedir('$shared_purelib')" > "$purelib/zz_llama_jax_shared.pth"
"$shared/bin/python" -m pip --python .venv/bin/python install -q --no-deps --no-build-isolation -e .
for tool in lmplz build_binary; do  # KenLM's programs (.ci/build_kenlm.sh), looked for beside the interpreter
  if [ -x "$shared/bin/$tool" ]; then ln -sfn "$shared/bin/$tool" ".venv/bin/$tool"; fi
done
