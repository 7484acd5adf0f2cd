#!/usr/bin/env bash
# One device call, what to run named by words: tests (all GPU parity tests), select-tests (page
# selection only), cli-tests (inspect-heads and the chat engine on the GPU), variants (benchmarks/select_variants.py), step
# (benchmarks/decode_attention.py, page selection), step-long (the same at 128k and 512k only), kernel
# (benchmarks/kernel_decode.py at 2k-8k read tokens), kernel-2k (at 2116 read tokens), kernel-tests (the decode
# kernel and backend parity tests), ncu (Nsight Compute on the 128k step's kernels), smoke (every benchmark at a
# tiny size, a check that it runs), step-fitted (the step at 128k and 512k, top_k 2048: page selection with no
# estimator, prf and the fitted clusters, compact selection with none, clusters and its own pages; the fits timed),
# step-fitted-128k (the same at 128k only), fitted-tests (torch CUDA and Triton parity of the fitted summaries). Logs go to $OUT. Kernel errors raise (the backend never falls back silently;
# the step benchmarks print the path each primitive took, `path: TritonPath(select=..., attend=...)`).
#   bash benchmarks/gpu_check.sh "tests step"        # default: tests step
set -o pipefail
OUT=${OUT:-/tmp/topkphi-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
what=" ${1:-tests step} "
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
  | tee "$OUT/device.log"
if [[ $what == *" tests "* ]]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/backends/test_triton_select.py \
    tests/backends/test_triton_backend.py tests/backends/test_triton_fitted.py tests/kernels/test_triton_decode.py 2>&1 \
    | tail -15 | tee "$OUT/tests.log"
fi
if [[ $what == *" select-tests "* ]]; then
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/backends/test_triton_select.py 2>&1 | tail -15 \
    | tee "$OUT/tests.log"
fi
if [[ $what == *" cli-tests "* ]]; then
  timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/commands/test_inspect_heads.py \
    tests/integrations/test_hf.py -k cuda 2>&1 \
    | tail -5 | tee "$OUT/cli_tests.log"
fi
if [[ $what == *" variants "* ]]; then
  timeout 240 python3 benchmarks/select_variants.py 2>&1 | tee "$OUT/select_variants.log"
fi
if [[ $what == *" step "* ]]; then
  timeout 420 python3 benchmarks/decode_attention.py --selection page --reps 30 2>&1 | tee "$OUT/decode_attention.log"
fi
if [[ $what == *" step-long "* ]]; then
  timeout 300 python3 benchmarks/decode_attention.py --selection page --n 131072 524288 --top-k 256 2048 --reps 30 \
    2>&1 | tee "$OUT/decode_attention_long.log"
fi
if [[ $what == *" fitted-tests "* ]]; then
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/backends/test_torch_fitted.py \
    tests/backends/test_torch_backend.py -k "cuda or fitted or cluster or compact" 2>&1 | tail -5 \
    | tee "$OUT/fitted_tests.log"
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/backends/test_triton_fitted.py 2>&1 | tail -5 \
    | tee -a "$OUT/fitted_tests.log"
fi
if [[ $what == *" step-fitted "* ]]; then
  timeout 300 python3 benchmarks/decode_attention.py --selection page compact --n 131072 524288 --top-k 2048 \
    --reps 30 --estimators none prf cluster compact 2>&1 | tee "$OUT/decode_attention_fitted.log"
fi
if [[ $what == *" step-fitted-128k "* ]]; then
  timeout 200 python3 benchmarks/decode_attention.py --selection page compact --n 131072 --top-k 2048 --reps 30 \
    --estimators none cluster compact 2>&1 | tee "$OUT/decode_attention_fitted.log"
fi
if [[ $what == *" kernel-tests "* ]]; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_triton_decode.py \
    tests/backends/test_triton_backend.py 2>&1 | tail -15 | tee "$OUT/kernel_tests.log"
fi
if [[ $what == *" ncu "* ]]; then  # the step's kernels at 128k, top_k 2048, with phi (second step of two)
  timeout 300 ncu --clock-control none -k regex:'select_pages|decode_kernel|page_bounds|merge' -s 4 -c 4 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SchedulerStats --section ComputeWorkloadAnalysis \
    python3 benchmarks/decode_attention.py --ncu --n 131072 --top-k 2048 2>&1 | tail -600 > "$OUT/ncu.log"
  grep -E "^  [a-z_]+kernel|Duration|Registers Per|Eligible Warps|Executed Ipc Active" "$OUT/ncu.log"
fi
if [[ $what == *" smoke "* ]]; then
  { timeout 120 python3 benchmarks/kernel_decode.py --ns 4096 --ks 256 --reps 5 \
    && timeout 120 python3 benchmarks/decode_attention.py --n 4096 --top-k 256 --reps 5 \
    && timeout 120 python3 benchmarks/select_variants.py --n 8192 --top-k 256 --reps 5; } 2>&1 | tail -40 \
    | tee "$OUT/smoke.log"
fi
if [[ $what == *" kernel-2k "* ]]; then
  timeout 200 python3 benchmarks/kernel_decode.py --ns 131072 --ks 2048 --out "$OUT" 2>&1 | tee "$OUT/kernel_decode.log"
fi
if [[ $what == *" kernel "* ]]; then
  timeout 200 python3 benchmarks/kernel_decode.py --ns 131072 --ks 2048,4096,8192 --out "$OUT" 2>&1 \
    | tee "$OUT/kernel_decode.log"
fi
