#!/usr/bin/env bash
# The GPU check as two device calls of at most ~8 minutes each, the most important numbers first, from the
# repository root on the GPU machine (no package index there; bench/gpu_prepare.sh's wheels carried in .whl):
#     bench/gpu_run.sh call1        # doctor (the machine: versions, kernels compiled vs references, attention),
#                                   # memory (LeapAlign vs full backprop, FLUX.1-dev size, 512², N 10/25/50),
#                                   # kernels (bandwidth at 64-512 MiB), tests (pytest -m gpu in parallel)
#     bench/gpu_run.sh call2        # sampler vs FluxPipeline at 512², training steps eager, then compiled
#     bench/gpu_run.sh STAGE...     # named stages: doctor memory kernels tests sampler train train-compiled
#                                   # memory-1024
#     bench/gpu_run.sh --cpu-check call1 call2   # CPU (CI): the same plan at toy size, no GPU
# With no argument: call1. GPU_BUDGET_S (default 470) bounds one invocation; each stage has its own limit inside
# it, and a stage the budget cannot reach is recorded as skipped.
# Everything lands under $OUT (default ./gpu-results) as it comes, at most 5 files:
#   results.jsonl    every row of every benchmark, appended and fsynced the moment it is measured, plus the
#                    environment (GPU, versions, where leapalign_fast was imported from) and each stage's exit
#                    status and seconds
#   gpu_run.log      all output;   tests.xml   pytest's junit report (call 1)
#   summary.md, gpu_results.json   rewritten from results.jsonl after every stage
# A stage that fails, runs out of memory or out of time is recorded and the next one runs; SIGTERM stops the
# running stage and writes the summary; after a SIGKILL, results.jsonl still holds every finished row. The exit
# status is the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CHECK=0
STAGES=()
for a in "$@"; do
  case "$a" in
    --cpu-check|--dry-run) CHECK=1 ;;
    call1) STAGES+=(doctor memory kernels tests) ;;
    call2) STAGES+=(sampler train train-compiled) ;;
    doctor|memory|kernels|tests|sampler|train|train-compiled|memory-1024) STAGES+=("$a") ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_run: unknown argument '$a' (call1 call2, or stages: doctor memory kernels tests sampler train" \
            "train-compiled memory-1024; --cpu-check)" >&2; exit 2 ;;
  esac
done
(( ${#STAGES[@]} )) || STAGES=(doctor memory kernels tests)
OUT=${OUT:-$ROOT/gpu-results}
WORK=${GPU_WORK:-/tmp/gpu-bench}          # each benchmark's own JSON, tables and plots (not sent back)
SITE=${GPU_SITE:-/tmp/site}
BUDGET=${GPU_BUDGET_S:-470}
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT" "$WORK/results"
LOG=$OUT/gpu_run.log
JSONL=$OUT/results.jsonl
R=$WORK/results
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}

log() { echo "$*" | tee -a "$LOG"; }
summarize() { "$PY" bench/gpu_summary.py summarize "$OUT" $( (( CHECK )) && echo --dry-run ) >/dev/null 2>&1 || true; }

# install: the carried third-party wheels (diffusers and what it needs) into $SITE, offline. The project itself
# is imported from this checkout: the repository comes FIRST on PYTHONPATH, so nothing installed earlier (a
# project wheel of an older call: $SITE outlives calls while the machine stays up) can shadow a fix.
install() {
  local wheels=() w
  for w in .whl*/*.whl; do
    [[ -e "$w" ]] || continue
    case "$(basename "$w")" in leapalign_fast-*|leapalign-fast-*) log "install: skipping $w (the checkout is used)"; continue ;; esac
    wheels+=("$w")
  done
  if (( ! ${#wheels[@]} )); then
    log "install: no wheels under .whl*/ (run bench/gpu_prepare.sh here and carry .whl); using what $SITE holds"
  elif (( CHECK )); then
    log "install (CPU check): would install ${#wheels[@]} wheels into $SITE: ${wheels[*]}"
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
      >>"$LOG" 2>&1 || { log "install: pip failed (see log)"; return 1; }
  fi
  rm -rf "$SITE"/leapalign_fast "$SITE"/leapalign_fast-*.dist-info "$SITE"/leapalign-fast*  # an older call's copy
  export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}
  (( CHECK )) || { nvidia-smi >>"$LOG" 2>&1 || log "install: nvidia-smi failed"; }
  "$PY" bench/gpu_summary.py environment "$JSONL" 2>&1 | tee -a "$LOG"
  local where
  where=$("$PY" -c "import leapalign_fast, os; print(os.path.dirname(os.path.realpath(leapalign_fast.__file__)))")
  if [[ "$where" != "$(realpath "$ROOT")"/* ]]; then
    log "install: leapalign_fast imports from $where, not from this checkout $ROOT: stopping"; return 3
  fi
}

FAILED=0
CHILD=
on_stop() {  # SIGTERM/SIGINT from outside: stop the running stage, keep what finished, write the summary
  [[ -n "$CHILD" ]] && kill -TERM "$CHILD" 2>/dev/null
  wait "$CHILD" 2>/dev/null
  "$PY" bench/gpu_summary.py record "$JSONL" "${CURRENT:-?}" 143 $(( $(date +%s) - ${T0:-START} )) "stopped from outside"
  summarize
  log "gpu_run: stopped from outside during ${CURRENT:-?}; $OUT holds what finished"
  exit 143
}
trap on_stop TERM INT

# stage NAME LIMIT_S COMMAND...: run with a time limit inside the remaining budget; record it.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit <= 10 )); then
    log "== $name: skipped, the ${BUDGET}s budget is spent"
    "$PY" bench/gpu_summary.py record "$JSONL" "$name" skipped 0 "$*"
    FAILED=$((FAILED + 1)); summarize; return
  fi
  log "== $name (limit ${limit}s): $*"
  CURRENT=$name T0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > >(tee -a "$LOG") 2>&1 &
  CHILD=$!
  wait "$CHILD"
  local rc=$?
  CHILD=
  (( rc == 0 )) || FAILED=$((FAILED + 1))
  "$PY" bench/gpu_summary.py record "$JSONL" "$name" "$rc" $(( $(date +%s) - T0 )) "$*"
  summarize
}

install
rc=$?
if (( rc )); then
  "$PY" bench/gpu_summary.py record "$JSONL" install "$rc" $(( $(date +%s) - START )) "install" 2>/dev/null
  summarize; exit 100
fi
if (( CHECK )); then  # what a call carries: this checkout as it would travel, and the wheels, each within 64 MiB
  for w in "" $(ls -d .whl*/ 2>/dev/null); do
    "$PY" bench/gpu_summary.py carry "$ROOT" 64 ${w:+"$w"} | tee -a "$JSONL" "$LOG" | grep -q '"fits": true' \
      || { log "carry: the checkout${w:+ with $w} is over 64 MiB"; FAILED=$((FAILED + 1)); }
  done
fi

TESTS=$(grep -l "mark\.gpu" tests/test_*.py | tr '\n' ' ')   # the files with GPU tests (less to import)
PYTEST_PAR=()
"$PY" -c "import xdist" 2>/dev/null && PYTEST_PAR+=(-n 4 --dist worksteal)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_PAR+=(--timeout 150)
J=(--jsonl "$JSONL")
# leapalign-fast doctor on the shipped toy config in bf16 (its files are in the checkout): devices, dtypes,
# versions against the project's bounds, each Triton kernel compiled for this GPU against its reference, the
# attention backend `auto` resolves to, memory and disk. Exit 2 if anything failed (the next stage still runs).
DOCTOR=("$PY" -m leapalign_fast.cli doctor model.dtype=bfloat16 report_to=none output_dir="$WORK/doctor")
for s in "${STAGES[@]}"; do
  if [[ $s == doctor ]]; then stage doctor 90 "${DOCTOR[@]}"; continue; fi
  if (( CHECK )); then  # the same scripts at toy size on CPU (the kernels under Triton's interpreter)
    case $s in
      memory)  stage memory 300 "$PY" bench/memory.py --model random-tiny --methods leapalign full --steps 2 \
                 --resolutions 64 --repeats 1 --set 'model.compile="none"' --out "$R" "${J[@]}" ;;
      kernels) stage kernels 300 "$PY" bench/kernel_speed.py --interpret-smoke --mib 1 --out "$R" "${J[@]}" ;;
      # shellcheck disable=SC2086
      tests)   stage tests 300 "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider $TESTS ;;
      sampler) stage sampler 300 "$PY" bench/sampler.py --quick --resolutions 64 --out "$R" "${J[@]}" ;;
      train)   stage train 120 "$PY" bench/gpu_train_steps.py --dry-run --steps 3 --resolution 512 \
                 --set 'model.compile="none"' --out "$R" "${J[@]}" ;;
      train-compiled) stage train-compiled 120 "$PY" bench/gpu_train_steps.py --dry-run --steps 3 --resolution 512 \
                 --out "$R" "${J[@]}" ;;
      memory-1024) stage memory-1024 120 "$PY" bench/memory.py --dry-run --model flux-dev \
                 --methods leapalign leapalign:reward_first=false --steps 25 --resolutions 1024 --repeats 1 \
                 --set 'model.compile="none"' --out "$R/m1024" "${J[@]}" ;;
    esac
    continue
  fi
  case $s in
    # The shipped LoRA config's step (configs/flux_leapalign.toml, eager) at 512², LeapAlign and full backprop,
    # N 10, 25, 50 in that order: a row per (method, N) as each finishes; full may run out of memory (a row).
    memory)  stage memory 250 "$PY" bench/memory.py --model flux-dev --methods leapalign full --steps 10 25 50 \
               --resolutions 512 --repeats 2 --set 'model.compile="none"' --out "$R" "${J[@]}" ;;
    # Bandwidth: 64/256/512 MiB tensors (FLUX's own latents, B 1 and 8 at 1024², measure launch overhead).
    kernels) stage kernels 60 "$PY" bench/kernel_speed.py --batch 1 8 --mib 64 256 512 --reps 30 --out "$R" "${J[@]}" ;;
    # shellcheck disable=SC2086
    tests)   stage tests 300 "$PY" -m pytest -m gpu -v -rfEs --durations=15 -p no:cacheprovider "${PYTEST_PAR[@]}" \
               --junitxml "$OUT/tests.xml" $TESTS ;;
    sampler) stage sampler 210 "$PY" bench/sampler.py --resolutions 512 --reps 3 --out "$R" "${J[@]}" ;;
    train)   stage train 150 "$PY" bench/gpu_train_steps.py --steps 3 --resolution 512 --set 'model.compile="none"' \
               --out "$R" "${J[@]}" ;;
    train-compiled) stage train-compiled 300 "$PY" bench/gpu_train_steps.py --steps 3 --resolution 512 --out "$R" \
               "${J[@]}" ;;
    memory-1024) stage memory-1024 300 "$PY" bench/memory.py --model flux-dev \
               --methods leapalign leapalign:reward_first=false --steps 25 --resolutions 1024 --repeats 1 \
               --set 'model.compile="none"' --out "$R/m1024" "${J[@]}" ;;
  esac
done
"$PY" bench/gpu_summary.py summarize "$OUT" $( (( CHECK )) && echo --dry-run ) 2>&1 | tee -a "$LOG"
log "gpu_run: done, $FAILED stage(s) failed; wrote $JSONL, $OUT/summary.md, $OUT/gpu_results.json, $LOG"
exit $FAILED
