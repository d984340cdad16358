#!/usr/bin/env bash
# Compile check of the optional CUDA extension (csrc/), for machines without a GPU.
#
#   tools/check_cuda_build.sh          nvcc -c of each csrc/*.cu for sm_90 with the extension's
#                                      flags; fails on a compile error or a register spill and
#                                      prints registers / static shared memory / spills per kernel
#   tools/check_cuda_build.sh --full   also builds fedhpc._cuda (FEDHPC_BUILD_CUDA=1 setup.py
#                                      build_ext) into a temp dir and imports it (minutes)
#
# Env: NVCC (default: nvcc), PYTHON (default: python3, used by --full), CUDA_ARCH (default: 90).
# Nothing is written to the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

full=0
case "${1:-}" in
  "") ;;
  --full) full=1 ;;
  *) echo "usage: $0 [--full]" >&2; exit 2 ;;
esac
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-python3}
ARCH=${CUDA_ARCH:-90}
command -v "$NVCC" >/dev/null || { echo "check_cuda_build: $NVCC not found" >&2; exit 1; }
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t_all=$(date +%s)
status=0

echo "== nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_$ARCH, compile only"
for cu in csrc/*.cu; do
  t0=$(date +%s)
  log="$work/$(basename "$cu").log"
  # Same nvcc flags as setup.py's extension, minus the torch include paths the .cu files never use.
  if ! "$NVCC" -c -std=c++17 -O3 --use_fast_math -lineinfo \
      -gencode "arch=compute_$ARCH,code=sm_$ARCH" -Xptxas -v \
      "$cu" -o "$work/$(basename "$cu").o" >"$log" 2>&1; then
    cat "$log"
    echo "FAIL $cu: compile error"
    status=1
    continue
  fi
  echo "-- $cu ($(( $(date +%s) - t0 ))s)"
  # ptxas prints, per kernel: "Compiling entry function 'NAME'", then "... N bytes spill stores,
  # M bytes spill loads", then "Used R registers, ... S bytes smem" (static shared memory only).
  demangle <"$log" | awk '
    /Compiling entry function/ { name = $0; sub(/^[^\047]*\047/, "", name); sub(/\047.*$/, "", name); next }
    /bytes spill stores/ { stores = $5; loads = $9; next }
    /Used [0-9]+ registers/ {
      regs = $5; smem = 0
      if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
      printf "   %4d regs  %6d B static smem  %4d B spill stores  %4d B spill loads  %s\n", regs, smem, stores, loads, name
      if (stores + loads > 0) spilled = 1
    }
    END { exit spilled }' || { echo "FAIL $cu: register spills (see above)"; status=1; }
  grep -i "warning" "$log" && { echo "FAIL $cu: compiler warnings"; status=1; }
done

if [ "$full" = 1 ] && [ "$status" = 0 ]; then
  echo "== full extension build (FEDHPC_BUILD_CUDA=1), into $work"
  t0=$(date +%s)
  if ! FEDHPC_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --build-temp "$work/tmp" --build-lib "$work/lib" \
      >"$work/build.log" 2>&1; then
    tail -n 60 "$work/build.log"
    echo "FAIL extension build"
    status=1
  else
    echo "-- built in $(( $(date +%s) - t0 ))s"
    so=$(ls "$work"/lib/fedhpc/_cuda*.so)
    # Load the built file as fedhpc._cuda without installing it; the binding checks run on CPU.
    "$PYTHON" - "$so" <<'EOF' || { echo "FAIL import"; status=1; }
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location("fedhpc._cuda", sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
for fn in ("cholqr2", "subspace_similarity"):
    assert callable(getattr(ext, fn)), fn
for call in (lambda: ext.cholqr2(torch.zeros(2, 8, 4)),
             lambda: ext.subspace_similarity(torch.zeros(2, 8, 4), torch.zeros(2, 8, 4))):
    try:
        call()
        raise AssertionError("a CPU tensor was accepted")
    except RuntimeError as err:
        assert "must be a CUDA tensor" in str(err), err
print(f"-- import fedhpc._cuda OK ({sys.argv[1].rsplit('/', 1)[-1]}; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}); argument checks raise on CPU tensors")
EOF
  fi
fi

echo "== $( [ "$status" = 0 ] && echo OK || echo FAILED ) in $(( $(date +%s) - t_all ))s"
exit "$status"
