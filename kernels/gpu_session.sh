#!/usr/bin/env bash
# One GPU session for issue 6: install the staged MLX CUDA build (.gpu/b, after .gpu/a was
# copied to /tmp/gpu-stage by the previous call), then the kernel check and the decode bench.
# Usage: bash kernels/gpu_session.sh [check|decode|all]   (logs under $OUT)
set -uo pipefail
what=${1:-all}
[ -d /tmp/site/mlx ] || bash .gpu/b/install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())'
if [ "$what" = check ] || [ "$what" = all ]; then
  python3 -m llm_flashmoe.kernels.check ${CHECK_ARGS:-} 2>&1 | tee -a "$out/check.log"
fi
if [ "$what" = decode ] || [ "$what" = all ]; then
  python3 -m llm_flashmoe.kernels.decode_bench --preset tiny --layers 8 --no-timing 2>&1 | grep -v "^synth" | tee -a "$out/decode.log"
  python3 -m llm_flashmoe.kernels.decode_bench --preset 397b --layers ${LAYERS:-4} 2>&1 | grep -v "^synth" | tee -a "$out/decode.log"
fi
