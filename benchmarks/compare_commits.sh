#!/usr/bin/env bash
# An older commit and this tree side by side in one device call: the model-level GPU tests of this tree, then
# training throughput and generate() decoding of both trees, interleaved (old, new, old, new) so that both see the
# same machine. The older tree is an export in .old/ (ignored by git; carried to the device):
#   echo /.old/ >> .git/info/exclude; rm -rf .old && mkdir .old && git archive OLD_COMMIT | tar -x -C .old
#   then on the device: OLD=OLD_COMMIT NEW=$(git rev-parse --short HEAD) bash benchmarks/compare_commits.sh
# Results (logs and JSON) go under $OUT or benchmarks/results/compare.
set -uo pipefail
OUT=${OUT:-benchmarks/results/compare}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
PYTHONPATH=$PWD/src timeout "${TEST_TIMEOUT:-200}" python3 -m pytest tests/test_triton.py -q -p no:cacheprovider \
  -k "model_with_triton or never_waits" 2>&1 | tail -3 | tee "$OUT/tests.txt"
for round in ${ROUNDS:-1 2}; do
  for tree in old new; do
    src=$([ "$tree" = old ] && echo "$PWD/.old/src" || echo "$PWD/src")
    commit=$([ "$tree" = old ] && echo "${OLD:-old}" || echo "${NEW:-new}")
    echo "== round $round, $tree ($commit)" | tee -a "$OUT/training.txt" "$OUT/generate.txt"
    mkdir -p "/tmp/train_$tree$round"
    (cd "$([ "$tree" = old ] && echo .old || echo .)" && PYTHONPATH=$src timeout "${TRAIN_TIMEOUT:-150}" python3 benchmarks/bench_training.py \
      --lengths ${LENGTHS:-2048 32768} --steps 6 --warmup 4 --commit "$commit" --out "/tmp/train_$tree$round" 2>&1 \
      | grep -v Warning | tail -6 | tee -a "$OUT/training.txt")
    PYTHONPATH=$src timeout "${GENERATE_TIMEOUT:-150}" python3 benchmarks/bench_generate.py --shapes seed \
      --contexts ${CONTEXTS:-4096 32768} --label "$tree$round" --commit "$commit" --out "$OUT" 2>&1 \
      | grep -v Warning | tee -a "$OUT/generate.txt"
  done
done
