#!/usr/bin/env bash
# Build (or reuse) .venv/sglang-<VERSION>: CPU torch, SGLang <VERSION> without its CUDA
# dependency tree, what its HiCache modules import, and this package with its test extras.
# Usage: .ci/venv.sh 0.5.23   -> prints the venv's python path on the last line.
set -euo pipefail
V=${1:?sglang version}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.venv/sglang-$V
REQ=$ROOT/tests/requirements-sglang-$V.txt
STAMP=$VENV/.objectcache-stamp
want=$(cat "$REQ" "$ROOT/pyproject.toml" "$0" | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "$VENV/bin/python"; exit 0
fi
python3 -m venv "$VENV"
PY=$VENV/bin/python
PIP="$PY -m pip install -q --disable-pip-version-check"
CONS=$VENV/torch-constraint.txt
echo "torch==2.13.0" > "$CONS"   # keeps every dependency off the multi-GB CUDA torch
$PIP torch==2.13.0 >&2
$PIP --no-deps "sglang==$V" >&2
$PIP -c "$CONS" -r "$REQ" >&2
[ "$V" = 0.5.17 ] && $PIP --no-deps xgrammar==0.2.1 >&2
$PIP -c "$CONS" -e "$ROOT[test,bench]" >&2
echo "$want" > "$STAMP"
echo "$PY"
