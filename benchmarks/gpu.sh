#!/usr/bin/env bash
# One prepared GPU check: train configs/gpu_h100.yaml for a few epochs on the synthetic set at
# 512x512, export fp32/fp16/int8 ONNX models, benchmark every backend, and collect the reports.
# Sized for one H100 within 8 minutes (synthetic set: 600 images at 576x720, written in parallel).
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]      # default: benchmarks/results
#
# TensorRT builds an engine per input shape (minutes each); it is left out unless asked for:
#   BACKENDS=torch-fp32,torch-fast,ort-fp32,ort-int8,ort-cuda-fp32,ort-cuda-fp16,ort-tensorrt bash benchmarks/gpu.sh
#
# Needs kvseg's dependencies importable (pip install -e . or PYTHONPATH with the wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results}
epochs=${EPOCHS:-4}
backends=${BACKENDS:-torch-fp32,torch-fast,ort-fp32,ort-int8,ort-cuda-fp32,ort-cuda-fp16}
run=runs/gpu-h100
mkdir -p "$results"
export PYTHONUNBUFFERED=1

{
    echo "== machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    python -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('onnxruntime', ort.__version__, ort.get_available_providers())"

    echo "== train ($epochs epochs)"
    rm -rf "$run"
    start=$(date +%s)
    accelerate launch --config_file configs/accelerate/gpu_1.yaml train_ddp.py --config configs/gpu_h100.yaml \
        --epochs "$epochs" --output-dir runs --run-name gpu-h100 --set train.eval_every=0
    echo "train wall time: $(( $(date +%s) - start )) s"

    echo "== export"
    start=$(date +%s)
    python export.py --run "$run" --fp16 --int8
    echo "export wall time: $(( $(date +%s) - start )) s"

    echo "== benchmark"
    python benchmark.py --run "$run" --backends "$backends" --batch-sizes 1,8,32 --iters 30 --warmup 10 --train-steps 30
} 2>&1 | tee "$results/gpu_log.txt"

cp "$run/benchmark.md" "$results/gpu_benchmark.md"
cp "$run/benchmark.json" "$results/gpu_benchmark.json"
cp "$run/metrics.json" "$results/gpu_metrics.json"
cp "$run/history.json" "$results/gpu_history.json"
cp "$run/export.json" "$results/gpu_export.json"
echo "reports in $results"
