#!/usr/bin/env bash
# Issue 21's GPU checks in one run, for a lent device machine (its image has torch, triton and transformers
# for Python 3.12, no Ray and no NIXL; nothing can be fetched there). Prepare the missing wheels here first:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl msgspec==0.22.0 gguf==0.19.0
#
# then run `scripts/gpu_check.sh` there with `.whl` carried. It runs the gpu-marked engine tests that need no
# Ray (the Triton kernels compiled against a dense reference in float32 and bf16, the engine with them equal to
# transformers, CUDA float32 equal to CPU, CUDA-graph decode equal to eager, TP/PP ranks on CUDA), then
# benchmarks/paged_attention.py. Results go to $OUT.
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TANDEM_PAGED_ATTENTION=auto
nvidia-smi -L | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/unit/test_triton_attention.py \
  tests/component/test_engine_triton_attention.py tests/component/test_gpu.py tests/component/test_cuda_graphs.py \
  2>&1 | tee "$out/tests.log"
python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/component/test_engine_parallel.py -k "cuda or nccl" \
  2>&1 | tee -a "$out/tests.log"
python3 benchmarks/paged_attention.py --out "$out" 2>&1 | tee "$out/bench.log"
