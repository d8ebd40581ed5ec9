#!/usr/bin/env bash
# The whole GPU check in one command, from the repository root on the GPU machine (no package index there):
#     bench/gpu_run.sh                      # every stage in priority order within GPU_BUDGET_S (540 s: one call of
#                                           # a 10-minute command limit); the stages the budget skips are recorded,
#                                           # run them in a second call by name, e.g. bench/gpu_run.sh kernels sampler
#     bench/gpu_run.sh --dry-run            # CPU: every command's argument parsing and plan, no GPU work (CI)
# Stages: install (always first: the wheels of bench/gpu_prepare.sh from .whl*/ into $GPU_SITE, offline),
#   tests   pytest -m gpu
#   kernels bench/kernel_speed.py (Triton connector kernels vs eager, B 1/4/8 x 4096 x 64, bf16)
#   sampler bench/sampler.py at 512² and 1024² (ours eager / compiled / compiled + CUDA graph vs FluxPipeline;
#           --backbone sd3|flux2|qwenimage runs the others)
#   memory  bench/memory.py --model flux-dev (configs/flux_leapalign.toml's step, random weights)
#   train   bench/gpu_train_steps.py (4 compiled LeapAlign LoRA steps at 512², CUDA-graph sampler)
# Writes under $OUT (default ./gpu-results): gpu_results.json (GPU name, versions, every command with its exit
# status and seconds, every benchmark's JSON), summary.md (the tables) and gpu_run.log (all output).
# A stage that fails or runs out of time is recorded and the next one runs; the exit status is the number of
# failed stages. GPU_BUDGET_S (default 540) bounds the whole run; each stage has its own limit inside it. The
# summary is rewritten after every stage, so a call stopped from outside still leaves the finished stages' results.
# Default order: tests, train, memory, kernels, sampler (correctness and the end-to-end step before timings).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
STAGES=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    tests|kernels|sampler|memory|train) STAGES+=("$a") ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_run: unknown argument '$a' (stages: tests kernels sampler memory train; --dry-run)" >&2; exit 2 ;;
  esac
done
(( ${#STAGES[@]} )) || STAGES=(tests train memory kernels sampler)
OUT=${OUT:-$ROOT/gpu-results}
WORK=${GPU_WORK:-/tmp/gpu-bench}          # results of every call on this machine (kept while it stays up)
SITE=${GPU_SITE:-/tmp/site}
BUDGET=${GPU_BUDGET_S:-540}
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT" "$WORK/results"
LOG=$OUT/gpu_run.log
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}

log() { echo "$*" | tee -a "$LOG"; }

# install: offline, into $SITE (kept across calls while the machine stays up); the project's own package from
# its wheel (leapalign_fast/kernels is a link to ../kernels in the tree, so `python -m` from the root finds it too).
install() {
  local wheels=(.whl*/*.whl)
  if [[ ! -e "${wheels[0]}" ]]; then
    log "install: no wheels under .whl*/ (run bench/gpu_prepare.sh here and carry .whl); using what $SITE holds"
  elif (( DRY )); then
    log "install (dry run): would install ${#wheels[@]} wheels into $SITE: ${wheels[*]}"
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
      >>"$LOG" 2>&1 || { log "install: pip failed (see log)"; return 1; }
  fi
  export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  (( DRY )) || { nvidia-smi >>"$LOG" 2>&1 || log "install: nvidia-smi failed"; }
  (( DRY )) || "$PY" -c "import torch, diffusers, leapalign_fast.kernels.connector; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$LOG"
}

FAILED=0
# stage NAME LIMIT_S COMMAND...: run with a time limit inside the remaining budget; record it.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit <= 10 )); then
    log "== $name: skipped, the ${BUDGET}s budget is spent"
    "$PY" bench/gpu_summary.py record "$WORK" "$name" skipped 0 "$*"
    FAILED=$((FAILED + 1)); return
  fi
  log "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  (( rc == 0 )) || FAILED=$((FAILED + 1))
  "$PY" bench/gpu_summary.py record "$WORK" "$name" "$rc" $(( $(date +%s) - t0 )) "$*"
  "$PY" bench/gpu_summary.py summarize "$WORK" "$OUT" $( (( DRY )) && echo --dry-run ) >/dev/null 2>&1 || true
}

install || FAILED=$((FAILED + 1))
R=$WORK/results
for s in "${STAGES[@]}"; do
  if (( DRY )); then
    case $s in
      tests)   stage tests 120 "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider ;;
      kernels) stage kernels 60 "$PY" bench/kernel_speed.py --reps 100 --out "$R" --help ;;
      sampler) stage sampler 60 "$PY" bench/sampler.py --resolutions 512 1024 --reps 3 --out "$R" --help ;;
      memory)  stage memory 60 "$PY" bench/memory.py --dry-run --model flux-dev --methods leapalign full --steps 10 25 50 \
                 --resolutions 512 --repeats 2 --set 'model.compile="none"' --out "$R" ;;
      train)   stage train 60 "$PY" bench/gpu_train_steps.py --dry-run --steps 4 --resolution 512 --out "$R" ;;
    esac
    continue
  fi
  case $s in
    tests)   stage tests 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider ;;
    kernels) stage kernels 120 "$PY" bench/kernel_speed.py --reps 100 --out "$R" ;;
    sampler) stage sampler 420 "$PY" bench/sampler.py --resolutions 512 1024 --reps 3 --out "$R" ;;
    memory)  # the shipped LoRA config's step at 512² (LeapAlign and full backprop, N 10/25/50; full may OOM: a
             # result), then LeapAlign at 1024² in both orders (reward first, the default, and the grad forwards
             # inside the trajectory: the decoder's backward on top of them); eager (compile changes memory little).
             stage memory 300 "$PY" bench/memory.py --model flux-dev --methods leapalign full --steps 10 25 50 \
               --resolutions 512 --repeats 2 --set 'model.compile="none"' --out "$R"
             stage memory-1024 300 "$PY" bench/memory.py --model flux-dev --methods leapalign leapalign:reward_first=false --steps 25 \
               --resolutions 1024 --repeats 2 --set 'model.compile="none"' --out "$R/m1024" ;;
    train)   stage train 420 "$PY" bench/gpu_train_steps.py --steps 4 --resolution 512 --out "$R" ;;
  esac
done
"$PY" bench/gpu_summary.py summarize "$WORK" "$OUT" $( (( DRY )) && echo --dry-run ) 2>&1 | tee -a "$LOG"
log "gpu_run: $FAILED stage(s) failed; wrote $OUT/gpu_results.json, $OUT/summary.md, $LOG"
exit $FAILED
