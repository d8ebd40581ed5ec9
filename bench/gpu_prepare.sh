#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a GPU session: downloads the wheels the GPU machine lacks into .whl/
# (git-ignored). The GPU machine has torch, triton, transformers, peft, accelerate, safetensors, pytest,
# pytest-xdist, pytest-timeout, ... but no diffusers, no tomli-w and no package index. The project itself is
# not packaged: the checkout travels with every call and bench/gpu_run.sh imports it first (a wheel installed
# by an earlier call would otherwise run the old code after a fix).
#     bench/gpu_prepare.sh              # then: bench/gpu_run.sh on the GPU machine, with .whl carried along
#     bench/gpu_prepare.sh --dry-run    # print the commands, download nothing
# The versions are the ones installed here (tested together). A copy to the GPU machine may carry at most
# 64 MiB: the wheels are split into .whl/, .whl-2/, ... of at most WHEEL_MIB each (one copy per folder;
# gpu_run.sh installs every .whl*/ folder it finds, and keeps what an earlier copy installed in $GPU_SITE).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0; [[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-$(command -v python || command -v python3)}
WHEEL_MIB=${WHEEL_MIB:-48}   # leaves room for the working tree in one 64 MiB copy
# diffusers and its one dependency missing there (importlib_metadata pulls lazy-importer); tomli-w (ours).
PKGS=(diffusers importlib_metadata lazy-importer tomli_w)
pins=()
for p in "${PKGS[@]}"; do
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null) \
    || { echo "gpu_prepare: $p is not installed here; install the project first (pip install -e .)" >&2; exit 2; }
  pins+=("$p==$v")
done
run() { echo "+ $*"; if (( ! DRY )); then "$@"; fi; }
run rm -rf .whl .whl-[0-9]*
run mkdir -p .whl
run "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "${pins[@]}"
(( DRY )) && exit 0
# Split into folders of at most WHEEL_MIB.
part=1; size=0
for f in $(ls -S .whl/*.whl); do
  mib=$(( ($(stat -c %s "$f") + 1048575) / 1048576 ))
  if (( mib > WHEEL_MIB )); then echo "gpu_prepare: $f alone is $mib MiB > $WHEEL_MIB MiB" >&2; exit 3; fi
  if (( size + mib > WHEEL_MIB )); then part=$((part + 1)); size=0; fi
  if (( part > 1 )); then mkdir -p ".whl-$part"; mv "$f" ".whl-$part/"; fi
  size=$((size + mib))
done
du -sh .whl*/ && ls .whl*/
for w in .whl*/; do  # each copy: the checkout as it travels plus one wheel folder, within the 64 MiB limit
  "$PY" bench/gpu_summary.py carry . 64 "$w" || { echo "gpu_prepare: the checkout with $w is over 64 MiB" >&2; exit 4; }
done
echo "gpu_prepare: carry .whl (and each .whl-N in its own call) to the GPU machine; run bench/gpu_run.sh there"
