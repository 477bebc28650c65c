#!/bin/bash
# End-to-end TTFT on the GPU machine (no network there): SGLang 0.5.17 + objectcache + SeaweedFS.
#
#   bash benchmarks/gpu/run_e2e.sh setup     # carry .carry/site-517.tar.xz .carry/w1 (<= 64 MiB)
#   bash benchmarks/gpu/run_e2e.sh s3        # carry .carry/weed.xz .carry/w2
#   bash benchmarks/gpu/run_e2e.sh run [--with-file] [--py-spy $OUT/spy.raw]
#                                            # one server, both shapes: benchmarks/e2e_gpu.py
#
# What to carry, built on a networked machine:
#   .carry/site-517.tar.xz   SGLang 0.5.17 and what launch_server imports (build_sglang_0517_bundle.sh
#                            from the project's shared GPU tools; ~51 MiB)
#   .carry/w1/               cffi, pycparser, obstore, pyyaml wheels (cp312) and this package's wheel
#                            (pip wheel --no-deps --no-build-isolation . -w .carry/w1)
#   .carry/w2/               the botocore/aioboto3 wheels and py-spy; .carry/weed.xz: SeaweedFS 4.48's
#                            `weed`, xz
#   .carry/make_tiny_llama.py  a local tokenizer + config (no hub access there)
set -e
C=${CARRY:-.carry}
S=/tmp/site
export PYTHONPATH=$S SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 WEED_BINARY=/tmp/weed PATH=$S/bin:$PATH
case "$1" in
setup)
  mkdir -p $S && tar -C $S -xJf $C/site-517.tar.xz
  # transformers 5.12.1 refuses the image's tokenizers at import; the check is all that fails
  sed -i 's/^\(\s*\)require_version_core(deps\[pkg\])/\1pass/' $S/transformers/dependency_versions_check.py
  python3 -m pip install -q --no-index --no-deps --target $S $C/w1/*.whl
  python3 -m sglang_objectcache.cli.main patch-sglang
  python3 -m sglang_objectcache.cli.main version
  python3 $C/make_tiny_llama.py /tmp/m8b >/dev/null 2>&1
  python3 - <<'PY'
import json
c = json.load(open("/tmp/m8b/config.json"))
c.update(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
         num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, vocab_size=128256,
         rope_theta=500000.0, tie_word_embeddings=False)
json.dump(c, open("/tmp/m8b/config.json", "w"), indent=1)
PY
  ;;
s3)
  xz -dc $C/weed.xz > /tmp/weed && chmod +x /tmp/weed
  python3 -m pip install -q --no-index --no-deps --target $S $C/w2/*.whl
  ;;
run)
  mkdir -p ${OUT:-results}
  python3 benchmarks/e2e_gpu.py --out ${OUT:-results}/e2e.json --log ${OUT:-results}/sglang.log "${@:2}" 2>&1 | tee ${OUT:-results}/e2e.txt
  ;;
*) echo "usage: $0 setup|s3|run" >&2; exit 2 ;;
esac
