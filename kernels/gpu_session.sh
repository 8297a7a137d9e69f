#!/usr/bin/env bash
# One GPU session for issue 6: install the staged MLX CUDA build (.gpu/b, after .gpu/a was
# copied to /tmp/gpu-stage by the previous call), then, most wanted first, each step cut off
# at a shared deadline (BUDGET_S seconds from the start, default 450):
#   1. the check of qmv and the MoE kernels  2. decode bench, 397b, LAYERS layers (timing and
#   the bf16-tolerance check on 2 and all layers)  3. the tolerance check on tiny (8 layers)
#   4. the check of the other kernels  5. qmv with 2 and 8 rows per warp
# Usage: bash kernels/gpu_session.sh          (logs under $OUT)
set -uo pipefail
end=$((SECONDS + ${BUDGET_S:-450}))
[ -d /tmp/site/mlx ] || bash .gpu/b/install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
runs=${RUNS:-5}
step() {  # step LOG CMD...: run CMD until the deadline, output to the terminal and $out/LOG
  local log=$1; shift
  local left=$((end - SECONDS))
  if [ "$left" -lt 15 ]; then echo "== skipped (deadline): $*"; return; fi
  echo "== [$SECONDS s, $left s left] $*"
  timeout "$left" "$@" 2>&1 | grep --line-buffered -v "^synth" | tee -a "$out/$log"
}
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())'
step check.log python3 -m llm_flashmoe.kernels.check --runs "$runs" --only "qmv,moe_gate_up,moe_down,MoE block"
step decode.log python3 -m llm_flashmoe.kernels.decode_bench --preset 397b --layers "${LAYERS:-4}" --check-layers 2,all
step decode.log python3 -m llm_flashmoe.kernels.decode_bench --preset tiny --layers 8 --no-timing --check-layers 2,all
step check.log python3 -m llm_flashmoe.kernels.check --runs "$runs" \
  --only "moe_route,decode_attention,qk_norm_rope,gdn_step,add_rms_norm"
for r in 2 8; do
  echo "== FLASHMOE_QMV_ROWS=$r" | tee -a "$out/qmv_rows.log"
  FLASHMOE_QMV_ROWS=$r step qmv_rows.log python3 -m llm_flashmoe.kernels.check --runs "$runs" --only qmv --dtypes bfloat16
done
echo "== done at $SECONDS s"
