#!/bin/bash
# End-to-end TTFT on the GPU machine (no network there): SGLang 0.5.17 + objectcache + SeaweedFS.
#
#   bash benchmarks/gpu/run_e2e.sh setup     # carry .carry/site-517.tar.xz .carry/w1 (<= 64 MiB)
#   bash benchmarks/gpu/run_e2e.sh s3        # carry .carry/weed.xz .carry/w2
#   bash benchmarks/gpu/run_e2e.sh run [--with-file] [--py-spy $OUT/spy.raw]
#                                            # one server, both shapes: benchmarks/e2e_gpu.py
#   bash benchmarks/gpu/run_e2e.sh live [--backends objectcache,l2]
#                                            # the live shared-prefix table: benchmarks/gpu/live.py
#                                            # (points kept in $LIVE_DIR, default /tmp/live; all packed
#                                            # into $OUT/live.tgz)
#
# What to carry: benchmarks/gpu/prepare_carry.sh builds it on a networked machine into .carry/.
# The machine is released after 30 s idle: issue `s3`, `setup` and `run` back to back (setup+run can
# be one call).
set -e
C=${CARRY:-.carry}
S=/tmp/site
export PYTHONPATH=$S SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 WEED_BINARY=/tmp/weed PATH=$S/bin:$PATH
case "$1" in
setup)
  # a native helper built elsewhere (benchmarks/gpu/prepare_carry.sh), for an image without a C
  # compiler or OpenSSL's headers; used only if its recorded hashes match
  if [ -d $C/native ] && ! { command -v cc >/dev/null && [ -f /usr/include/openssl/ssl.h ]; }; then
    N=$HOME/.cache/sglang_objectcache; mkdir -p $N && cp $C/native/* $N/ && chmod 700 $N && chmod 644 $N/*
  fi
  mkdir -p $S && tar -C $S -xJf $C/site-517.tar.xz
  # transformers 5.12.1 refuses the image's tokenizers at import; the check is all that fails
  sed -i 's/^\(\s*\)require_version_core(deps\[pkg\])/\1pass/' $S/transformers/dependency_versions_check.py
  python3 -m pip install -q --no-index --no-deps --target $S $C/w1/*.whl
  python3 -m sglang_objectcache.cli.main patch-sglang
  python3 -m sglang_objectcache.cli.main version
  python3 benchmarks/gpu/make_model.py /tmp/m8b
  ;;
s3)
  xz -dc $C/weed.xz > /tmp/weed && chmod +x /tmp/weed
  python3 -m pip install -q --no-index --no-deps --target $S $C/w2/*.whl
  ;;
run)
  mkdir -p ${OUT:-results}
  python3 benchmarks/e2e_gpu.py --out ${OUT:-results}/e2e.json --log ${OUT:-results}/sglang.log "${@:2}" 2>&1 | tee ${OUT:-results}/e2e.txt
  ;;
live)
  # points accumulate in $LIVE_DIR across calls on one machine ($OUT is emptied before each call);
  # each call packs all of them (JSON, server logs, /metrics) into one file
  D=${LIVE_DIR:-/tmp/live}
  mkdir -p $D ${OUT:-results}
  python3 benchmarks/gpu/live.py --out $D "${@:2}" 2>&1 | tee -a ${OUT:-results}/live.txt
  tar -C $D -czf ${OUT:-results}/live.tgz --exclude='*.png' .
  ;;
*) echo "usage: $0 setup|s3|run|live" >&2; exit 2 ;;
esac
