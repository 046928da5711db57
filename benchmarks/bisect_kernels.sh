#!/usr/bin/env bash
# Kernel time and wall time of bench_attention.py's parts for several trees, one device call (kernel_profile.py).
# Trees are exports under .trees/COMMIT (ignored by git, carried): for c in A B; do mkdir -p .trees/$c &&
# git archive $c src benchmarks | tar -x -C .trees/$c; done. This tree runs too, labelled "$NEW". BACKWARD=0 times the forward only.
set -uo pipefail
OUT=${OUT:-benchmarks/results/compare}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for tree in .trees/* .; do
  label=$([ "$tree" = . ] && echo "${NEW:-head}" || basename "$tree")
  for pass in fwd $([ "${BACKWARD:-1}" = 0 ] || echo --backward); do
    PYTHONPATH=$tree/src timeout "${PROFILE_TIMEOUT:-90}" python3 benchmarks/kernel_profile.py --tree "$tree" \
      --lengths ${LENGTHS:-32768} --label "$label" $([ "$pass" = fwd ] || echo "$pass") 2>&1 | grep -v Warning | tee -a "$OUT/kernels.jsonl"
  done
done
