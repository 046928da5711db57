#!/usr/bin/env bash
# One device call: GPU tests of the Triton backend, then the attention and decode benchmarks.
# Results (JSON, PNG, logs) go under $OUT (the device tool's output folder) or benchmarks/results.
# Usage: COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
# A *_TIMEOUT of 0 skips that part (the tests take about 390 s with a cold Triton cache); DECODE_ARGS adds arguments to bench_decode.py (e.g. --profile).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then  # wheels carried to the GPU machine (fla-core, the peer)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
[ "${TEST_TIMEOUT:-450}" = 0 ] || timeout "${TEST_TIMEOUT:-450}" python3 -m pytest tests/test_triton.py -q -x 2>&1 | tail -25 | tee "$OUT/tests.txt"
[ "${BENCH_TIMEOUT:-300}" = 0 ] || timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_attention.py --out "$OUT" --commit "${COMMIT:-unknown}" 2>&1 | tee "$OUT/bench.txt"
[ "${DECODE_TIMEOUT:-120}" = 0 ] || timeout "${DECODE_TIMEOUT:-120}" python3 benchmarks/bench_decode.py --out "$OUT" --commit "${COMMIT:-unknown}" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.txt"
