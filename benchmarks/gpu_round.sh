#!/bin/bash
# Kernel candidates against main in one GPU-machine call: builds made here beforehand, everything timed there in turn.
#
# Here (nvcc, no GPU), with each candidate a revision with patches (standalone_builds.py's NAME=REV+PATCH...):
#   python benchmarks/standalone_builds.py --build .carry/sb main=main pf=main+benchmarks/results/x.patch
#   python benchmarks/standalone_builds.py --build .carry/sbt main=main pf=main+... --define DELTACOMP_SHRINK_TRACE
#   python benchmarks/standalone_builds.py --sources .carry/trees pf=main+benchmarks/results/x.patch
# (.carry is git-ignored and named in the call's carry.) Then on the GPU machine, from the repository root:
#   bash benchmarks/gpu_round.sh .carry pf [more candidates] > $OUT/round.log 2>&1
#
# Main is the working tree itself. In order, each step's output marked with the seconds since the start:
# 1. every tree's extension (main's, the candidates', ROUND_SANITIZE's) built just in time, in parallel (each its own
#    TORCH_EXTENSIONS_DIR);
# 2. each candidate's full correctness sweep (check_standalone, no arguments);
# 3. with DIR/sbt, each timing build's `--stages 16 16 1 P` (the multi-tenant plan's stage-1 trace) on the q|k|v bank
#    (P = 3) and on q alone (P = 1);
# 4. `standalone_builds.py --run DIR/sb main CANDIDATES --no-calls --tenants 16 --projections 1 --repeats 2` (each
#    build's fused cases, then the multi-tenant call on the q bank, a bank a projection as kernel_speed lays it out);
# 5. unless ROUND_GOALS=0, main's goal figures (`kernel_speed.py --rows 1 --parts calls,tenants,widths --repeats 3`,
#    JSON to $OUT/goals-main.json; about 20 s);
# 6. `kernel_speed.py --rows "" --parts tenants --repeats 3` on each tree in turn, ROUND_TENANT_ROUNDS times (default 2);
# 7. for each tree named in ROUND_SANITIZE (space-separated; built in step 1, timed nowhere), its tenants table of
#    one layer under compute-sanitizer;
# 8. unless ROUND_MAIN_TESTS=0, main's CUDA tests; with ROUND_CANDIDATE_TESTS=1 each candidate's multi-tenant ones,
#    with ROUND_CANDIDATE_TESTS=all all of each candidate's.
# Steps 2 and 3 (about 45 s a candidate) run beside the builds (about 100 s); then per build about 40 s (step 4),
# 12 s a tree a round (step 6), and 80 s for main's tests: main and four candidates took 640 s on an H100, past one
# call's 600; with ROUND_TENANT_ROUNDS=1, or three candidates, a round fits.
set -u
DIR=$1
shift
export PYTHONUNBUFFERED=1
T0=$(date +%s)
mark() { echo "[t=$(($(date +%s) - T0))s] $*"; }
tree() { if [ "$1" = main ]; then pwd; else echo "$DIR/trees/$1"; fi; }
jit() { (cd "$(tree "$1")" && TORCH_EXTENSIONS_DIR=/tmp/ext_$1 DELTACOMP_CUDA_JIT=1 PYTHONPATH=. "${@:2}"); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for t in main "$@" ${ROUND_SANITIZE:-}; do
  jit "$t" python -c "from deltacomp import native; s = native.status(); print('$t:', s.path, s.error or '')" \
    > "/tmp/jit_$t.log" 2>&1 &
done
for t in "$@"; do
  mark "sweep $t"
  "$DIR/sb/$t" > "/tmp/sweep_$t.log" 2>&1
  echo "exit $?: $(grep -c 'FAIL' "/tmp/sweep_$t.log") failing line(s); $(tail -n 1 "/tmp/sweep_$t.log")"
done
if [ -d "$DIR/sbt" ]; then
  for b in "$DIR"/sbt/*; do
    for banks in 3 1; do
      mark "trace $(basename "$b") --stages 16 16 1 $banks"
      "$b" --stages 16 16 1 "$banks"
    done
  done
fi
wait
for t in main "$@" ${ROUND_SANITIZE:-}; do cat "/tmp/jit_$t.log"; done
mark "stages"
PYTHONPATH=. python benchmarks/standalone_builds.py --run "$DIR/sb" main "$@" --no-calls --tenants 16 \
  --projections 1 --repeats 2
if [ "${ROUND_GOALS:-1}" = 1 ]; then
  mark "goals, main"
  jit main python benchmarks/kernel_speed.py --rows 1 --parts calls,tenants,widths --repeats 3 \
    --json "${OUT:-/tmp}/goals-main.json" 2>&1 | tail -n 40
fi
for round in $(seq "${ROUND_TENANT_ROUNDS:-2}"); do
  for t in main "$@"; do
    mark "tenants $t (round $round)"
    jit "$t" python benchmarks/kernel_speed.py --rows "" --parts tenants --repeats 3 2>&1 | tail -n 14
  done
done
for t in ${ROUND_SANITIZE:-}; do  # a tree whose torch call fails: where, by compute-sanitizer (one layer)
  mark "compute-sanitizer, $t"
  jit "$t" compute-sanitizer --tool memcheck --print-limit 3 python benchmarks/kernel_speed.py --rows "" \
    --parts tenants --layers 1 --repeats 1 2>&1 | tail -n 40
done
if [ "${ROUND_MAIN_TESTS:-1}" = 1 ]; then
  mark "CUDA tests, main"
  jit main python -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_gptq_cuda.py 2>&1 | tail -n 3
fi
if [ "${ROUND_CANDIDATE_TESTS:-0}" != 0 ]; then
  for t in "$@"; do
    mark "CUDA tests, $t ($ROUND_CANDIDATE_TESTS)"
    if [ "$ROUND_CANDIDATE_TESTS" = all ]; then
      jit "$t" python -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_gptq_cuda.py 2>&1 | tail -n 3
    else
      jit "$t" python -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py -k tenant 2>&1 | tail -n 3
    fi
  done
fi
mark done
