#!/usr/bin/env bash
# The GPU work that the CPU suite cannot do, as device calls of at most 10 minutes: PART picks one.
#   tests     the GPU test files (Triton kernels, compiled training, the static cache's CUDA graphs and host syncs)
#   decode    benchmarks/bench_decode.py: the three-launch decode kernel beside the composed step (then wire it in)
#   generate  benchmarks/bench_generate.py: NSA default and static against Llama default and static
#   training  eager and compiled training at 2k (the 300k tokens/s target; compiled plain and under CUDA graphs) with
#             a kernel profile, then the host profile of one compiled step (profile_host.py: where queueing goes)
#   decode-host  benchmarks/profile_decode_host.py: the default generate() path's host work per token, NSA and Llama
#   quality   benchmarks/quality_retrieval.py, then quality_lm.py
#   convert   benchmarks/quality_retrieval.py --conversion
#   retrieval-check  a small passkey run (w = 64, 512-token rows) on the reference backend in fp32, then on Triton in
#             fp32 and bf16, then the full-size run with branch_kv="shared": does the Triton training path learn what
#             the reference learns (it does on CPU at this size), and does sharing K/V help NSA from scratch?
#   merge-compare  this tree's fused decode against benchmarks/.probe_decode_ref.py (write it first:
#             git show main:src/nsa_hf/ops/triton/decode.py > benchmarks/.probe_decode_ref.py, and carry it), then
#             the decode tests
# Results go under $OUT (the device tool's output folder) or benchmarks/results/gpu_session.
# pytest-xdist, where carried as wheels in .whl/, runs the tests on 12 workers.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-}
COMMIT=${COMMIT:-$(cat .commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
case "${PART:-tests}" in
  tests)
    workers=""
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
      workers="-n 12 -p xdist"  # the static cache's compile tests take 80-90 s each
    fi
    timeout 560 python3 -m pytest $workers tests/test_triton.py tests/test_compile.py tests/test_static_cache.py tests/test_decode_graphs.py -q \
      -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt" ;;
  decode)
    timeout 300 python3 benchmarks/bench_decode.py --shapes paper seed --contexts 32768 131072 --batches 1 32 \
      --out "$OUT" --commit "$COMMIT" 2>&1 | grep -v Warning | tee "$OUT/decode.txt" ;;
  generate)
    timeout 560 python3 benchmarks/bench_generate.py --llama --out "$OUT" --commit "$COMMIT" ${GENERATE_ARGS:-} 2>&1 \
      | grep -v Warning | tee "$OUT/generate.txt" ;;
  training)
    timeout 400 python3 benchmarks/bench_training.py --lengths 2048 --compile --compile-modes reduce-overhead default \
      --profile --steps 6 --warmup 5 --commit "$COMMIT" --out "$OUT" 2>&1 | grep -v Warning | tail -8
    (cd benchmarks && timeout 150 python3 profile_host.py > "$OUT/host_profile.txt" 2>&1; head -3 "$OUT/host_profile.txt") ;;
  decode-host)
    (cd benchmarks && timeout 300 python3 profile_decode_host.py > "$OUT/decode_host.txt" 2>&1; grep "^##" "$OUT/decode_host.txt") ;;
  quality)
    timeout 330 python3 benchmarks/quality_retrieval.py --out "$OUT" --commit "$COMMIT" ${RETRIEVAL_ARGS:-} 2>&1 | tail -8
    timeout 230 python3 benchmarks/quality_lm.py --out "$OUT" --commit "$COMMIT" ${LM_ARGS:-} 2>&1 | tail -4 ;;
  convert)
    timeout 560 python3 benchmarks/quality_retrieval.py --conversion --out "$OUT" --commit "$COMMIT" ${RETRIEVAL_ARGS:-} \
      2>&1 | tail -8 ;;
  retrieval-check)
    small="--lengths 256 512 --train-lengths 64 128 256 512 --short-lengths 32 64 --short-steps 200 --steps 700
      --window 64 --block 8 --selected 6 --hidden 64 --layers 2 --heads 4 --kv-heads 2 --vocab 64 --tokens-per-step 4096
      --lr 3e-3"
    for run in "reference --fp32" "triton --fp32" "triton"; do
      name=$(echo "$run" | tr -d ' -')
      timeout 120 python3 benchmarks/quality_retrieval.py $small --nsa-backend $run --out "$OUT/check_$name" \
        --commit "$COMMIT" 2>&1 | tail -3
    done
    timeout 300 python3 benchmarks/quality_retrieval.py --branch-kv shared --out "$OUT/shared" --commit "$COMMIT" 2>&1 \
      | tail -3 ;;
  merge-compare)
    timeout 200 python3 benchmarks/compare_decode_merge.py --ref-file benchmarks/.probe_decode_ref.py \
      --out "$OUT/compare_decode_merge.jsonl" 2>&1 | grep -v Warning
    timeout 200 python3 -m pytest tests/test_triton.py -k decode -q -p no:cacheprovider 2>&1 | tail -3 ;;
  *) echo "unknown PART=${PART}"; exit 2 ;;
esac
