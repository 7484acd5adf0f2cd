#!/usr/bin/env bash
# One device call: the GPU parity tests, then the decode-step benchmark (page selection, both
# selectors), then optionally the fused-kernel benchmark. Logs go to $OUT (the device tool's folder).
#   bash benchmarks/gpu_check.sh [step|kernel|all]
set -o pipefail
OUT=${OUT:-/tmp/topkphi-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOPKPHI_STRICT=1 PYTHONPATH=$PWD
what=${1:-all}
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
  | tee "$OUT/device.log"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/backends/test_triton_select.py \
  tests/backends/test_triton_backend.py tests/kernels/test_triton_decode.py 2>&1 | tail -15 | tee "$OUT/tests.log"
if [ "$what" = step ] || [ "$what" = all ]; then
  timeout 420 python3 benchmarks/decode_attention.py --selection page --reps 30 2>&1 | tee "$OUT/decode_attention.log"
fi
if [ "$what" = kernel ] || [ "$what" = all ]; then
  timeout 300 python3 benchmarks/kernel_decode.py --ns 131072 --ks 2048,4096,8192 --out "$OUT" 2>&1 \
    | tee "$OUT/kernel_decode.log"
fi
