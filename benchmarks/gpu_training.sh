#!/usr/bin/env bash
# Training on the GPU machine: the throughput benchmark (one GPU) and/or the distributed check (DDP and
# FSDP2 vs one GPU at the same global batch; needs 2 GPUs). Results go under $OUT or benchmarks/results.
# Usage: COMMIT=$(git rev-parse --short HEAD) PARTS="throughput distributed" bash benchmarks/gpu_training.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
for part in ${PARTS:-throughput distributed}; do
  case $part in
    throughput)
      CUDA_VISIBLE_DEVICES=0 timeout "${TRAIN_TIMEOUT:-500}" python3 benchmarks/bench_training.py --out "$OUT" \
        --commit "${COMMIT:-unknown}" ${TRAIN_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/training.txt" ;;
    distributed)
      # The seed model's shape at 2k tokens, global batch DIST_BATCH (8 by default).
      batch=${DIST_BATCH:-8}
      args="--max-steps ${DIST_STEPS:-40} --seq-len 2048 --hidden-size 768 --intermediate-size 2048 --num-layers 12 --num-heads 12
            --num-kv-heads 2 --window-size 512 --num-selected-blocks 16 --vocab-size 8192"
      launch="python3 -m accelerate.commands.launch"
      # One process would see both GPUs and Trainer would wrap the model in DataParallel: show it one.
      CUDA_VISIBLE_DEVICES=0 $launch --num_processes 1 examples/distributed_pretrain.py $args --batch-size "$batch" --output-dir /tmp/runs/single 2>&1 | tail -3
      $launch --config_file examples/accelerate/ddp.yaml examples/distributed_pretrain.py $args --batch-size $((batch / 2)) --output-dir /tmp/runs/ddp 2>&1 | tail -3
      $launch --config_file examples/accelerate/fsdp2.yaml examples/distributed_pretrain.py $args --batch-size $((batch / 2)) --output-dir /tmp/runs/fsdp2 2>&1 | tail -3
      python3 examples/distributed_pretrain.py --compare /tmp/runs/single /tmp/runs/ddp /tmp/runs/fsdp2 > "$OUT/distributed_batch$batch.json"
      cat "$OUT/distributed_batch$batch.json" ;;
  esac
done
