#!/usr/bin/env bash
# Build KenLM's lmplz and build_binary (needed to train the curation quality model) into VENV/bin.
# The kenlm wheel on PyPI is only the query module; the same source distribution builds the
# command-line tools with cmake and Boost. Runs once per venv: skipped when both binaries exist.
# Usage: bash .ci/build_kenlm.sh VENV
set -euo pipefail
venv=${1:?usage: build_kenlm.sh VENV}
version=0.3.0
if [ -x "$venv/bin/lmplz" ] && [ -x "$venv/bin/build_binary" ]; then exit 0; fi

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
for lib in program-options system thread test; do
  dpkg -s "libboost-$lib-dev" >/dev/null 2>&1 || missing+=("libboost-$lib-dev")
done
for lib in zlib1g-dev libbz2-dev liblzma-dev; do
  dpkg -s "$lib" >/dev/null 2>&1 || missing+=("$lib")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "error: KenLM needs the Debian packages: ${missing[*]} (install them as root)" >&2
    exit 1
  fi
  echo "Installing ${missing[*]} for the KenLM build ..." >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" -m pip download -q --no-deps --no-binary kenlm --no-build-isolation \
  "kenlm==$version" -d "$work"
tar -xzf "$work/kenlm-$version.tar.gz" -C "$work"
log="$work/build.log"
if ! { cmake -S "$work/kenlm-$version" -B "$work/build" -DCMAKE_BUILD_TYPE=Release &&
       cmake --build "$work/build" --target lmplz build_binary -j "$(nproc)"; } >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "error: KenLM build failed (log above)" >&2
  exit 1
fi
install -m 755 "$work/build/bin/lmplz" "$work/build/bin/build_binary" "$venv/bin/"
echo "Built lmplz and build_binary into $venv/bin" >&2
