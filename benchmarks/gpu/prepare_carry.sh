#!/bin/bash
# On a networked machine: everything benchmarks/gpu/run_e2e.sh needs on the GPU machine, into
# .carry/ (git-ignored), in two transfers of at most 64 MiB each.
#   .carry/site-517.tar.xz + .carry/w1/   (setup)   SGLang 0.5.17 and what launch_server imports, for
#                                                   Python 3.12 / torch 2.11 (the GPU image), stripped
#                                                   to sm90 and the triton attention backend; cffi,
#                                                   pycparser, obstore, pyyaml; this package's wheel
#   .carry/weed.xz + .carry/w2/           (s3)      SeaweedFS's `weed` (xz); botocore/aioboto3; py-spy
#   .carry/native/                        (setup)   the native reader built here, https included, for an
#                                                   image without OpenSSL's headers ($PY: a Python
#                                                   with numpy and xxhash; x86-64, glibc <= the image's)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$ROOT/.carry; mkdir -p "$OUT/w1" "$OUT/w2"; cd "$OUT"
PLAT="--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64"
DL="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
 --abi cp312 --abi abi3 --abi none $PLAT"
if [ ! -f site-517.tar.xz ]; then
  W=$(mktemp -d)
  $DL -d "$W" sglang==0.5.17 sglang-kernel==0.4.5 xgrammar==0.2.1 apache-tvm-ffi==0.1.11 \
    flashinfer-python==0.6.15.post1 transformers==5.12.1 openai==2.6.1 pydantic pydantic-core \
    annotated-types typing-inspection fastapi starlette uvicorn python-multipart opentelemetry-api \
    importlib-metadata pyzmq orjson msgspec pybase64 setproctitle soundfile==0.13.1 ipython traitlets \
    compressed-tensors loguru gguf dill distro sniffio jiter partial-json-parser jsonschema \
    jsonschema-specifications referencing rpds-py
  S=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none $PLAT --only-binary=:all: "$W"/*.whl
  # what a Hopper run with --attention-backend triton never loads
  rm -f "$S"/sgl_kernel/flash_ops.abi3.so "$S"/sgl_kernel/flashmla_ops.abi3.so "$S"/sgl_kernel/infllm_ops*.so
  rm -rf "$S"/sgl_kernel/sm100 "$S"/xgrammar/lib
  tar -C "$S" -cf - . | xz -T0 -6 > site-517.tar.xz
  rm -rf "$W" "$S"
fi
$DL -d w1 cffi pycparser obstore==0.12.1 pyyaml==6.0.4
rm -f w1/sglang_objectcache-*.whl
python3 -m pip wheel -q --no-deps "$ROOT" -w w1
$DL -d w2 aioboto3==15.5.0 aiobotocore==2.25.1 botocore==1.40.61 boto3==1.40.61 s3transfer==0.14.0 \
  jmespath==1.1.0 python-dateutil==2.9.0.post0 six==1.17.0 urllib3==2.8.0 wrapt==1.17.3 \
  aioitertools==0.13.0 aiofiles==25.1.0 py-spy==0.4.3
if [ ! -f weed.xz ]; then
  WEED=$(python3 -c "import sys; sys.path.insert(0, sys.argv[1]); from testbed.servers import find_weed; print(find_weed())" "$ROOT/tests")
  xz -T0 -c "$WEED" > weed.xz
fi
rm -rf native
OBJECTCACHE_NATIVE_DIR=$OUT/native PYTHONPATH=$ROOT ${PY:-python3} -c \
  "from sglang_objectcache import native; print('native:', native.tls_status())"
du -ch site-517.tar.xz w1 | tail -1; du -ch weed.xz w2 | tail -1
