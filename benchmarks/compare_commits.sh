#!/usr/bin/env bash
# An older commit and this tree side by side in one device call: the model-level GPU tests of this tree, then
# training throughput and generate() decoding of both trees, interleaved (old, new, old, new) so that both see the
# same machine. The older tree is an export in .old/ (ignored by git; carried to the device):
#   echo /.old/ >> .git/info/exclude; rm -rf .old && mkdir .old && git archive OLD_COMMIT | tar -x -C .old
#   then on the device: OLD=OLD_COMMIT NEW=$(git rev-parse --short HEAD) bash benchmarks/compare_commits.sh
# PARTS picks what each tree runs: training, generate (default both), attention (bench_attention.py at ATTENTION_LENGTHS,
# seed shape) and decode (bench_decode.py at DECODE_CONTEXTS). TEST_TIMEOUT=0 skips the tests.
# Results (logs and JSON) go under $OUT or benchmarks/results/compare.
set -uo pipefail
OUT=${OUT:-benchmarks/results/compare}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
[ "${TEST_TIMEOUT:-200}" = 0 ] || PYTHONPATH=$PWD/src timeout "${TEST_TIMEOUT:-200}" python3 -m pytest tests/test_triton.py -q \
  -p no:cacheprovider -k "model_with_triton or never_waits" 2>&1 | tail -3 | tee "$OUT/tests.txt"
PARTS=${PARTS:-training generate}
for round in ${ROUNDS:-1 2}; do
  for tree in old new; do
    src=$([ "$tree" = old ] && echo "$PWD/.old/src" || echo "$PWD/src")
    commit=$([ "$tree" = old ] && echo "${OLD:-old}" || echo "${NEW:-new}")
    echo "== round $round, $tree ($commit)" | tee -a "$OUT/training.txt" "$OUT/generate.txt"
    dir=$([ "$tree" = old ] && echo .old || echo .)
    if [[ " $PARTS " == *" training "* ]]; then
      mkdir -p "/tmp/train_$tree$round"
      (cd "$dir" && PYTHONPATH=$src timeout "${TRAIN_TIMEOUT:-150}" python3 benchmarks/bench_training.py \
        --lengths ${LENGTHS:-2048 32768} --steps 6 --warmup 4 --commit "$commit" --out "/tmp/train_$tree$round" 2>&1 \
        | grep -v Warning | tail -6 | tee -a "$OUT/training.txt")
    fi
    if [[ " $PARTS " == *" generate "* ]]; then
      PYTHONPATH=$src timeout "${GENERATE_TIMEOUT:-150}" python3 benchmarks/bench_generate.py --shapes seed \
        --contexts ${CONTEXTS:-4096 32768} --label "$tree$round" --commit "$commit" --out "$OUT" 2>&1 \
        | grep -v Warning | tee -a "$OUT/generate.txt"
    fi
    if [[ " $PARTS " == *" attention "* ]]; then
      mkdir -p "/tmp/attention_$tree$round"
      echo "== round $round, $tree ($commit)" >> "$OUT/attention.txt"
      (cd "$dir" && PYTHONPATH=$src timeout "${ATTENTION_TIMEOUT:-120}" python3 benchmarks/bench_attention.py --shapes seed \
        --lengths ${ATTENTION_LENGTHS:-8192 32768} --commit "$commit" --out "/tmp/attention_$tree$round" 2>&1 \
        | grep -v Warning | tail -8 | tee -a "$OUT/attention.txt")
    fi
    if [[ " $PARTS " == *" decode "* ]]; then
      mkdir -p "/tmp/decode_$tree$round"
      echo "== round $round, $tree ($commit)" >> "$OUT/decode.txt"
      (cd "$dir" && PYTHONPATH=$src timeout "${DECODE_TIMEOUT:-120}" python3 benchmarks/bench_decode.py \
        --contexts ${DECODE_CONTEXTS:-32768 131072} --commit "$commit" --out "/tmp/decode_$tree$round" 2>&1 \
        | grep -v Warning | tail -8 | tee -a "$OUT/decode.txt")
    fi
  done
done
