#!/usr/bin/env bash
# The project's test command (README): set everything up on a fresh machine, then run the
# suite against real S3 servers for both supported SGLang releases.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null; then
  bash .ci/install-ceph.sh
else
  echo "not root: Ceph RGW tests will be skipped (run .ci/install-ceph.sh as root)" >&2
fi
PY23=$(.ci/venv.sh 0.5.23 | tail -1)
PY17=$(.ci/venv.sh 0.5.17 | tail -1)
echo "== sglang 0.5.23: the whole suite"
"$PY23" -m pytest -q -p no:cacheprovider "$@"
echo "== sglang 0.5.17: everything that touches SGLang, on SGLang with the patch set applied (layer-wise streaming, storage namespaces)"
"$PY17" -m sglang_objectcache.cli.main patch-sglang
"$PY17" -m pytest -q -p no:cacheprovider tests/test_backend.py tests/test_plugin.py tests/test_layerwise.py tests/test_isolation.py tests/test_tenants.py tests/test_metrics.py tests/test_load_or_recompute.py tests/test_weights.py tests/test_page_hash.py "$@"
