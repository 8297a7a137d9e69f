#!/usr/bin/env bash
# One call on the GPU machine: install the staged MLX CUDA build (.gpu/b, after .gpu/a was
# copied to /tmp/gpu-stage by the previous call; see ../shared/gpu/stage-mlx-cuda.sh), then run
# the named steps in order, each cut off at a shared deadline (BUDGET_S seconds from the start,
# default 540). Logs go to the terminal and to $OUT.
#
#   bash kernels/gpu_session.sh STEP...
#
# DECODE_ARGS replaces decode's default extra arguments (--resident $M/mlx).
# CLOCK_MS=N: the card's clocks logged every N ms (default 250; 0: not at all). PIN=CPUS: the steps'
# processes kept on those cores (taskset -c).
# DUMP_EVERY=S (any steps; py-spy carried in .gpu/tools): every S seconds the native stacks of each
# running llm_flashmoe process go to $OUT/dumps.log (what a step that prints nothing is doing).
# Steps (issue 7, GPU streaming; the model is built once per machine under $M, default /dev/shm/m
# where /dev/shm has room for it, else /tmp/m):
#   prep     synthetic 397b-shaped model, LAYERS layers (default 4): MLX layout, then converted (packed)
#   prepmlx  the MLX layout only (enough for kdecode, ncu, firststep, firstcalls: saves the
#            30-45 s conversion)
#   upload   expert upload throughput: store path vs pinned+cudaMemcpyAsync vs the limits
#   check    logits with the GPU expert cache on and off are identical
#   decode   decode with GPU caches of 25/50/100% (warm; 50% cold too), all-resident and mlx-lm beside
#   profile  the host round trip's cost per layer; hostread: kernels reading host memory directly
#   firstuse the host tier's first-use stall taken apart (registration, first reads, page touches)
# Steps (issue 6, fused kernels):
#   kcheck   every kernel vs its twin, and timings (KCHECK_ONLY: a comma-separated subset)
#   kdecode  fused vs plain decode, tolerance check
#            (KDECODE_ARGS replaces its default --check-layers 2,all)
#   ktiny    the same tolerance check on the tiny preset (4 layers, built under /tmp; no timing)
#   interop  what MLX arrays' DLPack exports give on CUDA (device addresses?) and what the driver says of
#            them: whether the kernels could be launched outside MLX's graph (kernels/interop.py)
#   hostpad  what an input costs the host: the tiny preset's pipelined loop, 6 s, with each launch given
#            N more unread inputs, for each N in $PADS (default "0 20 0 20"; a process each)
#   normbisect where the fused input norm's error comes from, layer by layer (decode_bench --norm-bisect)
#   kncu     the check's GPU time per call, fused and plain side by side (ncu, NCU_ARGS as below; the
#            check's timed regions between marker kernels), of KNCU_ONLY's kernels (default the MoE block)
#   settings decode under each kernel setting in $SETTINGS (';'-separated, e.g. "-;grid=2 words=16"),
#            one process, step by step and pipelined, medians of SETTINGS_ROUNDS rounds (default 3)
#            visiting the settings in turn; the fastest one's environment (pipelined) goes to
#            /tmp/fm-best.env (SETTINGS_TOL=N: each round also each setting's tolerance ratio on N
#            layers, against a float32 copy), and with USE_BEST=1
#            the steps kcheck, kdecode, kncu and ncu run under it
#   rows     rows per warp of qmv and the MoE kernels, checked and timed
#   firststep the first decode step's stall in two processes in a row (MLX's kernel cache; FIRST_MODEL=tiny: the tiny preset)
#   firstcalls the first decode steps' fused ops timed one by one (what the first step's stall is)
#   odecode  a decode step's build/evaluate split, op by op and compiled (resident; all experts cached)
#   ncu      each kernel's GPU time in decode steps (ncu), summed per kernel; NCU_ARGS adds ncu
#            options (e.g. "--clock-control none --cache-control none": the card's own clocks, warm L2)
#   mlxdecode a decode step's build/evaluate split under each MLX setting in $MLX_SETTINGS
#            (e.g. "- MLX_MAX_OPS_PER_BUFFER=4"), a process each; with USE_BEST=1 under the fastest setting
#   mlxpipe  decode_bench's pipelined decode (no tolerance check) under each MLX setting in
#            $MLX_SETTINGS (e.g. "- MLX_MAX_OPS_PER_BUFFER=60 MLX_MAX_OPS_PER_BUFFER=200"), a process each
#   host     where the host's time goes in a pipelined decode (build / launch / wait, per layer kind,
#            the Python profile), tiny preset and the 397B model, under each MLX setting in $MLX_SETTINGS
#   perf     where MLX's host time per operation goes: perf (or gdb) samples of a bare pipelined decode
#            loop on the tiny preset, by shared object and symbol (PERF_S, PERF_REC_S seconds)
#   pyspy    where the host's time goes by native function (py-spy, carried in .gpu/tools: no perf or
#            gdb there) in the bare pipelined loop, tiny and 397B; then the loop under Python's collector
#            modes (PYSPY_GC)
#   cudatrace the CUDA calls MLX makes per pipelined decode step and the time inside them
#            (kernels/cudatrace preloaded into `overhead loop`, tiny preset), per MLX setting
#   ncusweep kernel settings compared on GPU time alone: ncu over the same decode steps per setting in
#            $NCU_SETTINGS (e.g. "- FLASHMOE_GDN_THREADS=512 FLASHMOE_XV_INNER=1"), then per kernel family
#   bwfloor  what launches that only read each of a decode layer's launches' bytes cost (ncu; four
#            ways: one wave, one wave with the staging, short-lived staged groups in several waves, the same normalizing)
#   ncusettings as ncusweep, every setting of $SETTINGS (';'-separated, as for `settings`) in one process
#            (one model load, where ncusweep loads it per setting: 40-50 s each for 8 layers; and a
#            setting compiles only the kernels it changes); "kernels=off" is the plain path beside them,
#            and each setting's GPU time is split into the head's a token and the rest per layer
#   downids  moe_down's GPU time per expert set (patterned and random sets, twice over), per setting in
#            $SETTINGS: whether the set decides a call's ~13 or ~25-30 us (no model needed)
#   ncusol   as ncu, with each kernel's throughputs (% of peak), occupancy, registers and warp-stall
#            reasons (ncu sections SpeedOfLight, Occupancy, LaunchStats, WarpStateStats, SchedulerStats).
#            Slow: each kernel is replayed once per pass with the device memory saved and restored,
#            ~45 s per kernel on the 4-layer model; NCU_COUNT kernels (default 12: one layer)
#   overhead MLX's host cost per operation and a decode step's build/evaluate split, under each
#            MLX CUDA-graph setting in $MLX_SETTINGS (space-separated VAR=value lists, '-' = defaults)
set -uo pipefail
end=$((SECONDS + ${BUDGET_S:-540}))
[ -d /tmp/site/mlx ] || bash .gpu/b/install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
LAYERS=${LAYERS:-4}
# The synthetic model goes to memory (/dev/shm) where it has room: on the H200 machine writing an
# 8-layer 397B model (29 GB) to /tmp took ~125 s and loading it back 36-42 s of a session's device time.
# (~3.6 GB a layer in the MLX layout; the packed conversion of step `prep` as much again)
shm_gb=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
per_layer=4; [[ " $* " == *" prep "* ]] && per_layer=8
if [ -z "${M:-}" ]; then
  if [ "${shm_gb:-0}" -ge $((LAYERS * per_layer + 8)) ] 2>/dev/null; then M=/dev/shm/m; else M=/tmp/m; fi
fi
echo "== model directory $M (/dev/shm: ${shm_gb:-?} GB free)"
runs=${RUNS:-5}
# the card's clocks, power and performance state through the session (the timings depend on them),
# every CLOCK_MS ms (0: not logged; NVML's queries may take driver locks that CUDA calls then wait on)
clocks_pid=
if [ "${CLOCK_MS:-250}" != 0 ]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,pstate,temperature.gpu --format=csv \
    -lms "${CLOCK_MS:-250}" > "$out/clocks.csv" 2>/dev/null &
  clocks_pid=$!
fi
# PIN=CPUS: every step's process kept on those cores (taskset -c), against the host's timings moving
# with the scheduler
pin=()
if [ -n "${PIN:-}" ]; then
  if command -v taskset >/dev/null; then pin=(taskset -c "$PIN"); else echo "== PIN: no taskset here"; fi
fi
pyspy_install() {  # py-spy from the wheel carried in .gpu/tools (no registry there) -> /tmp/pyspy/bin/py-spy
  [ -x /tmp/pyspy/bin/py-spy ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pyspy \
    .gpu/tools/py_spy-*.whl >/dev/null 2>&1
  [ -x /tmp/pyspy/bin/py-spy ]
}
# DUMP_EVERY=S: every S seconds, each running llm_flashmoe process's native stacks (py-spy dump) go to
# $out/dumps.log: what a step that prints nothing for long is doing (compiling, waiting on the GPU, ...)
dump_pid=
if [ -n "${DUMP_EVERY:-}" ]; then
  if pyspy_install; then
    (while sleep "$DUMP_EVERY"; do
       for p in $(pgrep -f "^python3 -m llm_flashmoe"); do
         { echo "== $(date +%T) pid $p: $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null)"
           /tmp/pyspy/bin/py-spy dump --native --pid "$p" 2>&1 | head -${DUMP_LINES:-60}; } >> "$out/dumps.log"
       done
     done) &
    dump_pid=$!
  else
    echo "== DUMP_EVERY: no py-spy wheel in .gpu/tools (carry it)"
  fi
fi
trap 'kill $clocks_pid $dump_pid 2>/dev/null' EXIT
step() {  # step LOG CMD...: run CMD until the deadline, output to the terminal and $out/LOG
  local log=$1; shift
  local left=$((end - SECONDS))
  if [ "$left" -lt 15 ]; then echo "== skipped (deadline): $*"; return; fi
  echo "== [$SECONDS s, $left s left] $*"
  timeout "$left" "${pin[@]}" "$@" 2>&1 | grep --line-buffered -v "^synth\|^convert \[" | tee -a "$out/$log"
}
prep() {  # prep [mlx]: the MLX layout, then (unless "mlx") the packed conversion
  if [ ! -f "$M/mlx/config.json" ]; then
    step prep.log python3 -c "
import time; from llm_flashmoe import synth
synth._write_tokenizer = lambda d: None   # the engine needs no tokenizer
t = time.perf_counter(); synth.write_synthetic('$M/mlx', preset='397b', layout='mlx', layers=$LAYERS, progress=False,
                                              workers=$(nproc))
print(f'synth 397b x $LAYERS layers (mlx layout) in {time.perf_counter() - t:.0f} s')"
  fi
  if [ "${1:-}" != mlx ] && [ ! -f "$M/packed/complete" ]; then
    local t0=$SECONDS
    step prep.log python3 -m llm_flashmoe.convert "$M/mlx" "$M/packed"
    echo "converted in $((SECONDS - t0)) s" | tee -a "$out/prep.log"
  fi
  df -h /tmp | tail -1 | tee -a "$out/prep.log"
}
profile() {  # profile NAME [ncu options] -- CMD...: each kernel's GPU time under ncu, summed per kernel
  local name=$1; shift
  local opts=()
  while [ "$1" != -- ]; do opts+=("$1"); shift; done; shift
  [[ " ${opts[*]} " == *" --metrics "* ]] || opts+=(--metrics gpu__time_duration.sum)   # one --metrics only
  step "$name.log" "$(command -v ncu || echo /usr/local/cuda/bin/ncu)" "${opts[@]}" \
    ${NCU_ARGS:-} --csv --log-file "$out/$name.csv" "$@"
  [ "${NO_SUMMARY:-0}" = 1 ] || python3 -m llm_flashmoe.kernels.overhead ncu "$out/$name.csv" | tee -a "$out/$name.log"
}
tiny() {  # the tiny preset under $M/tiny (the same kernels per layer as 397B, little GPU time)
  [ -f "$M/tiny/config.json" ] || python3 -c "
from llm_flashmoe import synth
synth._write_tokenizer = lambda d: None
synth.write_synthetic('$M/tiny', preset='tiny', layout='mlx', progress=False)"
}
best() { [ "${USE_BEST:-0}" = 1 ] && [ -f /tmp/fm-best.env ] && cat /tmp/fm-best.env; }
nvidia-smi --query-gpu=name,clocks.sm,memory.used,memory.total --format=csv,noheader
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())'
for s in "$@"; do
  case $s in
    prep) prep ;;
    prepmlx) prep mlx ;;
    upload) step upload.log python3 -m llm_flashmoe.experts.gpu_bench upload --packed "$M/packed" ;;
    check) step check.log python3 -m llm_flashmoe.experts.gpu_bench check --packed "$M/packed" --settings "${CHECK:-25%,100%}" ;;
    profile) step profile.log python3 -m llm_flashmoe.experts.gpu_bench profile --packed "$M/packed" ;;
    hostread) step hostread.log python3 -m llm_flashmoe.experts.gpu_bench hostread --packed "$M/packed" ;;
    decode) step decode.log python3 -m llm_flashmoe.experts.gpu_bench decode --packed "$M/packed" ${DECODE_ARGS:---resident $M/mlx} ;;
    firstuse) step firstuse.log python3 -m llm_flashmoe.experts.gpu_bench firstuse --packed "$M/packed" ;;
    overhead)
      for e in ${MLX_SETTINGS:--}; do e=${e#-}
        step overhead.log env ${e//,/ } python3 -m llm_flashmoe.kernels.overhead launch --n "${N_OPS:-200}"
      done
      for e in ${MLX_SETTINGS:--}; do e=${e#-}
        step overhead.log env ${e//,/ } python3 -m llm_flashmoe.kernels.overhead decode --dir "$M/mlx"
      done ;;
    rows)  # rows per warp of qmv and the MoE kernels; falls back to one row per warp if the MoE's fail
      step rows.log python3 -m llm_flashmoe.kernels.overhead rows
      if grep -q "^  moe.*FAIL" "$out/rows.log"; then
        export FLASHMOE_MOE_ROWS=1,1; echo "== MoE kernels FAIL with several rows per warp: FLASHMOE_MOE_ROWS=1,1 from here"
      fi ;;
    firststep)  # is the first decode step's stall compilation, and does MLX's kernel cache remove it?
      d=$M/mlx; [ "${FIRST_MODEL:-}" = tiny ] && { tiny; d=$M/tiny; }
      rm -rf /tmp/mlx/*/ptx
      for i in 1 2; do
        echo "== MLX kernel cache: $(ls /tmp/mlx/*/ptx 2>/dev/null | wc -l) files; the driver's:" \
          "$(du -sh ~/.nv/ComputeCache 2>/dev/null | cut -f1)" | tee -a "$out/firststep.log"
        step firststep.log python3 -m llm_flashmoe.kernels.overhead decode --dir "$d" --steps 4
      done ;;
    firstcalls) step firstcalls.log python3 -m llm_flashmoe.kernels.overhead firstcalls --dir "$M/mlx" ;;
    odecode)
      step overhead.log python3 -m llm_flashmoe.kernels.overhead decode --dir "$M/mlx"
      step overhead.log python3 -m llm_flashmoe.kernels.overhead decode --packed "$M/packed" ;;
    ncu)  # each kernel's time on the GPU over 3 decode steps, op by op and compiled
      profile ncu --profile-from-start off -- env $(best) python3 -m llm_flashmoe.kernels.overhead decode --dir "$M/mlx" --steps 8 --profile ;;
    mlxdecode)  # decode (op by op, compiled) under each MLX setting in $MLX_SETTINGS, one process each
      for e in ${MLX_SETTINGS:--}; do e=${e#-}
        step mlxdecode.log env ${e//,/ } $(best) python3 -m llm_flashmoe.kernels.overhead decode --dir "$M/mlx" --steps 16
      done ;;
    mlxpipe)  # pipelined decode under each MLX setting (read once per process: a process each)
      for e in ${MLX_SETTINGS:--}; do e=${e#-}
        echo "== MLX setting: ${e:-defaults}" | tee -a "$out/mlxpipe.log"
        step mlxpipe.log env ${e//,/ } $(best) python3 -m llm_flashmoe.kernels.decode_bench --dir "$M/mlx" \
          --check-steps 0 --steps 8 --pipe-rounds "${PIPE_ROUNDS:-3}"
      done ;;
    host)  # where the host's time goes in a pipelined decode, under each MLX setting in $MLX_SETTINGS
           # (a process each): the tiny preset (built here if absent: the same kernels per layer, little
           # GPU time) and the 397B model if prepared
      tiny
      for e in ${MLX_SETTINGS:--}; do e=${e#-}
        for d in "$M/tiny" "$M/mlx"; do
          [ -f "$d/config.json" ] && step host.log env ${e//,/ } $(best) python3 -m llm_flashmoe.kernels.overhead host --dir "$d"
        done
      done ;;
    perf)  # where MLX's host time per operation goes: a sampling profile of a bare pipelined decode
           # loop (`overhead loop`) on the tiny preset, taken once it runs (after the kernels' first
           # compilation), by shared object and by symbol; without perf, stacks sampled with gdb
      tiny
      python3 -m llm_flashmoe.kernels.overhead loop --dir "$M/tiny" --seconds "${PERF_S:-25}" > /tmp/loop.log 2>&1 &
      lpid=$!
      for _ in $(seq 120); do grep -q "^looping" /tmp/loop.log && break; sleep 1; done
      if command -v perf >/dev/null; then
        step perf.log perf record -F 1999 -g -p "$lpid" -o /tmp/perf.data -- sleep "${PERF_REC_S:-12}"
        perf report -i /tmp/perf.data --stdio --no-children --sort dso --percent-limit 0.5 2>/dev/null \
          | grep -v "^$" | head -40 | tee -a "$out/perf.log"
        perf report -i /tmp/perf.data --stdio --no-children -g none --sort dso,sym --percent-limit 0.25 2>/dev/null \
          | grep -v "^$" | head -120 | tee -a "$out/perf.log"
        echo "== inclusive (with callees; frame-pointer stacks, partial where a library has none)" | tee -a "$out/perf.log"
        perf report -i /tmp/perf.data --stdio --children -g none --sort sym --percent-limit 2 2>/dev/null \
          | grep -v "^$" | head -70 | tee -a "$out/perf.log"
      elif gdb=$(command -v gdb); then    # (not cuda-gdb: on the H200 its attach hung, 20 s a sample)
        echo "== no perf: stacks sampled with $gdb" | tee -a "$out/perf.log"
        for _ in $(seq "${GDB_SAMPLES:-40}"); do
          timeout 5 "$gdb" -p "$lpid" -batch -ex "bt 8" 2>/dev/null | grep "^#" | sed 's/ (.*//; s/0x[0-9a-f]* in //' | head -8
          echo "--"
        done > /tmp/gdb.txt
        echo "frames most often on top of the stack:" | tee -a "$out/perf.log"
        awk '/^#0/' /tmp/gdb.txt | sort | uniq -c | sort -rn | head -30 | tee -a "$out/perf.log"
        echo "frames anywhere in the first 8:" | tee -a "$out/perf.log"
        grep "^#" /tmp/gdb.txt | sed 's/^#[0-9]* *//' | sort | uniq -c | sort -rn | head -40 | tee -a "$out/perf.log"
      else
        echo "== neither perf nor gdb here" | tee -a "$out/perf.log"
      fi
      wait "$lpid"; cat /tmp/loop.log | tee -a "$out/perf.log" ;;
    pyspy)  # where the host's time goes, by native function: py-spy (wheel carried in .gpu/tools) samples
            # the bare pipelined loop (`overhead loop`) of the tiny preset and of the 397B model where
            # prepared, PYSPY_S seconds each, then `overhead stacks` sums the raw samples; then the
            # tiny loop alone under each of Python's collector modes in $PYSPY_GC (default "on freeze
            # off"), PYSPY_GC_ROUNDS times over (default 2)
      tiny
      pyspy_install || { echo "== no py-spy wheel in .gpu/tools"; continue; }
      for d in "$M/tiny" "$M/mlx"; do
        [ -f "$d/config.json" ] || continue
        name=$(basename "$d")
        python3 -m llm_flashmoe.kernels.overhead loop --dir "$d" --seconds $((${PYSPY_S:-12} + 8)) > /tmp/loop.log 2>&1 &
        lpid=$!
        for _ in $(seq 150); do grep -q "^looping" /tmp/loop.log && break; sleep 1; done
        step pyspy.log /tmp/pyspy/bin/py-spy record --native --threads -r "${PYSPY_RATE:-200}" -d "${PYSPY_S:-12}" -p "$lpid" \
          -f raw -o "$out/stacks-$name.txt"
        wait "$lpid"; tee -a "$out/pyspy.log" < /tmp/loop.log
        python3 -m llm_flashmoe.kernels.overhead stacks "$out/stacks-$name.txt" --top 50 | tee -a "$out/pyspy.log"
      done
      for r in $(seq "${PYSPY_GC_ROUNDS:-2}"); do
        for g in ${PYSPY_GC:-on freeze off}; do
          step pyspy.log python3 -m llm_flashmoe.kernels.overhead loop --dir "$M/tiny" --seconds 6 --gc "$g"
        done
      done ;;
    cudatrace)  # how much of MLX's host time per decode step is spent inside CUDA calls: the bare
                # pipelined loop on the tiny preset with kernels/cudatrace preloaded, per MLX setting
      tiny
      gcc -O2 -shared -fPIC -o /tmp/libcudatrace.so kernels/cudatrace/cudatrace.c -ldl || { echo "== no gcc: cudatrace skipped"; continue; }
      lib=$(python3 -c "import mlx.core, pathlib; print(pathlib.Path(mlx.core.__file__).parent / 'lib')")
      echo "== CUDA libraries MLX links: $(ldd "$lib"/libmlx.so 2>/dev/null | grep -io 'libcud[a-z]*\.so[.0-9]*' | sort -u | tr '\n' ' ')" \
        | tee -a "$out/cudatrace.log"
      for e in ${MLX_SETTINGS:--}; do e=${e#-}
        echo "== MLX setting: ${e:-defaults}" | tee -a "$out/cudatrace.log"
        step cudatrace.log env ${e//,/ } LD_PRELOAD=/tmp/libcudatrace.so python3 -m llm_flashmoe.kernels.overhead loop \
          --dir "$M/tiny" --seconds "${PERF_S:-8}"
      done ;;
    ncusweep)  # kernel settings A/B on GPU time alone (no host noise): each kernel family's time under
               # ncu over the same decode steps, per setting in $NCU_SETTINGS (space-separated VAR=value
               # lists joined by commas, '-' = defaults), a process each, then side by side
      i=0; logs=(); labels=""
      for e in ${NCU_SETTINGS:--}; do e=${e#-}
        i=$((i + 1))
        echo "== setting $i: ${e:-defaults}" | tee -a "$out/ncusweep.log"
        profile "ncusweep-$i" --profile-from-start off -- env ${e//,/ } python3 -m llm_flashmoe.kernels.overhead decode \
          --dir "$M/mlx" --steps 6 --profile
        if [ -s "$out/ncusweep-$i.csv" ]; then   # (a label names its setting with '+' for ',': labels are comma-joined)
          logs+=("$out/ncusweep-$i.csv"); l=${e//,/+}; labels+="${labels:+,}${l:-defaults}"
        fi
      done
      # each setting's own log into ncusweep.log: at most 8 files come back from a device call
      for ((j = 1; j <= i; j++)); do
        [ -f "$out/ncusweep-$j.log" ] && cat "$out/ncusweep-$j.log" >> "$out/ncusweep.log" && rm "$out/ncusweep-$j.log"
      done
      [ ${#logs[@]} -gt 1 ] && python3 -m llm_flashmoe.kernels.overhead ncu "${logs[@]}" --labels "$labels" \
        | tee -a "$out/ncusweep.log" ;;
    bwfloor)  # the floor under each of a layer's launches: a kernel that only reads as many bytes
              # (overhead bwfloor: one wave, one wave staged, short-lived staged groups, normed too), under ncu
      step bwfloor.log python3 -m llm_flashmoe.kernels.overhead bwfloor          # wall time per call
      profile bwfloor -- python3 -m llm_flashmoe.kernels.overhead bwfloor --reps 4 --runs 1 ;;   # GPU time
    ncusettings)  # kernel settings A/B on GPU time in ONE process: the model loaded once, each setting
                  # in $SETTINGS (';'-separated key=value lists as for `settings`, '-' = defaults) then
                  # decodes (compiled) and its last 3 steps are profiled after a marker kernel; the log is
                  # cut at the markers and compared per kernel family, then split per layer and the head
                  # ("kernels=off": the plain path, as the engine runs it, beside the kernels)
      NO_SUMMARY=1 profile ncusettings --profile-from-start off -- python3 -m llm_flashmoe.kernels.overhead ncusettings \
        --dir "$M/mlx" --settings="${SETTINGS:--}"
      python3 -m llm_flashmoe.kernels.overhead ncu "$out/ncusettings.csv" --marked="${SETTINGS:--}" \
        --layers "$LAYERS" --steps 3 | tee -a "$out/ncusettings.log" ;;
    downids)  # moe_down's time per expert set (sweeps.down_id_sets), twice over, per setting in $SETTINGS:
              # does the set decide whether a call takes ~13 or ~25-30 us? (ncu flushes the caches before
              # each call unless NCU_ARGS says --cache-control none: cold weights, as in decode;
              # DOWNIDS_ARGS=--gate-up: each after the gate/up launch of the same experts; --repeat N:
              # moe_down N times a set, the later calls with everything at hand)
      NO_SUMMARY=1 profile downids -- python3 -m llm_flashmoe.kernels.overhead downids --settings="${SETTINGS:--}" \
        ${DOWNIDS_ARGS:-}
      python3 -m llm_flashmoe.kernels.overhead downids --summary "$out/downids.csv" --settings="${SETTINGS:--}" ${DOWNIDS_ARGS:-} \
        | tee -a "$out/downids.log" ;;
    ncusol)  # the same decode steps with ncu's speed-of-light, occupancy and warp-stall figures per kernel
      profile ncusol --profile-from-start off --launch-count "${NCU_COUNT:-12}" --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section SchedulerStats \
        --metrics 'gpu__time_duration.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        -- env $(best) python3 -m llm_flashmoe.kernels.overhead decode --dir "$M/mlx" --steps 6 --profile ;;
    settings)
      step settings.log python3 -m llm_flashmoe.kernels.overhead settings --dir "$M/mlx" ${SETTINGS:+--settings="$SETTINGS"} \
        ${SETTINGS_ROUNDS:+--rounds "$SETTINGS_ROUNDS"} ${SETTINGS_TOL:+--tolerance "$SETTINGS_TOL"} \
        --best /tmp/fm-best.env
      echo "== fastest: $(cat /tmp/fm-best.env 2>/dev/null)" | tee -a "$out/settings.log" ;;
    kcheck) step kcheck.log env $(best) python3 -m llm_flashmoe.kernels.check --runs "$runs" ${KCHECK_ONLY:+--only "$KCHECK_ONLY"} ;;
    normbisect) step normbisect.log python3 -m llm_flashmoe.kernels.decode_bench --dir "$M/mlx" --norm-bisect ;;
    kdecode) step kdecode.log env $(best) python3 -m llm_flashmoe.kernels.decode_bench --dir "$M/mlx" ${KDECODE_ARGS:---check-layers 2,all} ;;
    ktiny) step ktiny.log env $(best) python3 -m llm_flashmoe.kernels.decode_bench --preset tiny --layers 4 --no-timing --check-layers 2,all ;;
    interop) step interop.log python3 -m llm_flashmoe.kernels.interop ;;
    hostpad)  # the tiny preset's bare pipelined loop with each launch given N more (unread) inputs, N in $PADS
      tiny
      for n in ${PADS:-0 20 0 20}; do
        step hostpad.log python3 -m llm_flashmoe.kernels.overhead loop --dir "$M/tiny" --seconds 6 --pad-inputs "$n"
      done ;;
    kncu)  # KNCU_ONLY: the check's kernels (default the MoE block alone: qmv's ten shapes take minutes under ncu)
      NO_SUMMARY=1 profile kncu -- env $(best) python3 -m llm_flashmoe.kernels.check --only "${KNCU_ONLY:-MoE block}" \
        --runs 1 --dtypes bfloat16 --ncu-marks
      python3 -m llm_flashmoe.kernels.overhead ncu "$out/kncu.csv" --check-log "$out/kncu.log" | tee -a "$out/kncu.log" ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "== done at $SECONDS s"
