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
LOG=$ROOT/.venv/sglang-$V.setup.log
: > "$LOG"
# SGLang goes in with --no-deps (its CUDA tree is not wanted on CPU), so pip's resolver prints
# pages of "dependency conflicts" that are expected: they go to the log, one line per step here.
trap 'echo "setup of $VENV failed; the last lines of $LOG:" >&2; tail -20 "$LOG" >&2' ERR
step() { echo "setting up $VENV: $1 ..." >&2; shift; "$@" >>"$LOG" 2>&1; }
echo "torch==2.13.0" > "$CONS"   # keeps every dependency off the multi-GB CUDA torch
step "CPU torch" $PIP torch==2.13.0
step "SGLang $V (without its CUDA dependencies)" $PIP --no-deps "sglang==$V"
step "what SGLang's HiCache modules import" $PIP -c "$CONS" -r "$REQ"
if [ "$V" = 0.5.17 ]; then step "xgrammar" $PIP --no-deps xgrammar==0.2.1; fi
step "this package and its test extras" $PIP -c "$CONS" -e "$ROOT[test,bench]"
# transport: nixl (NIXL's OBJ plugin, CPU build): --no-deps, as its metadata asks for CUDA torch
if [ "$V" = 0.5.23 ]; then step "nixl-cu12 (transport: nixl)" $PIP --no-deps nixl-cu12==1.5.1; fi
echo "setting up $VENV: done (pip's log, with its expected dependency warnings: $LOG)" >&2
echo "$want" > "$STAMP"
echo "$PY"
