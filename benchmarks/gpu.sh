#!/usr/bin/env bash
# One prepared GPU check: train configs/gpu_h100.yaml for a few epochs on the synthetic set at
# 512x512 (sampling GPU utilisation meanwhile), export fp32/fp16/int8 ONNX models, benchmark every
# backend, and collect the reports. Sized for one H100 within 8 minutes (synthetic set: 600 images
# at 576x720, written in parallel).
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]             # default: benchmarks/results
#   bash benchmarks/gpu.sh --dry-run [RESULTS_DIR]   # default: a new temporary folder
#
# --dry-run makes every step of the real run on the CPU at tiny sizes (12 synthetic images at 64 px,
# a base-8 U-Net, one epoch, two timed benchmark calls), with the same launcher file, config and
# backend list; the CUDA backends are then skipped in one line each. Its run folder and synthetic
# data go to RESULTS_DIR/work, never into the repository. Run it before spending GPU time.
#
# TensorRT builds an engine per input shape (minutes each); it is left out unless asked for:
#   BACKENDS=torch-fp32,torch-fast,ort-fp32,ort-int8,ort-cuda-fp32,ort-cuda-fp16,ort-tensorrt bash benchmarks/gpu.sh
#
# Needs kvseg's dependencies importable by `python` (pip install -e ., or offline: benchmarks/gpu_wheels.py).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
usage="usage: bash benchmarks/gpu.sh [--dry-run] [RESULTS_DIR]"

dry_run=0
results=""
while (($#)); do
    case $1 in
        --dry-run) dry_run=1 ;;
        -h | --help) echo "$usage"; exit 0 ;;
        -*) echo "error: unknown option $1 ($usage)" >&2; exit 2 ;;
        *)
            if [[ -n $results ]]; then echo "error: more than one RESULTS_DIR given ($usage)" >&2; exit 2; fi
            results=$1 ;;
    esac
    shift
done

backends=${BACKENDS:-torch-fp32,torch-fast,ort-fp32,ort-int8,ort-cuda-fp32,ort-cuda-fp16}
if ((dry_run)); then
    results=${results:-$(mktemp -d "${TMPDIR:-/tmp}/kvseg-gpu-dry-run.XXXXXX")}
    mkdir -p "$results"
    results=$(cd "$results" && pwd)
    work=$results/work  # run folder and synthetic data
    train_args=(--epochs "${EPOCHS:-1}" --image-size 64 --batch-size 2 --num-workers 1
                --set model.base_channels=8 --set data.synthetic_images=12 --set data.synthetic_size=64)
    bench_args=(--batch-sizes 1,2 --iters 2 --warmup 1 --train-steps 2)
else
    # A real run on a machine without a GPU would train at 512 px on the CPU for hours.
    if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: torch sees no CUDA GPU here; use bash benchmarks/gpu.sh --dry-run to check the script on a CPU" >&2
        exit 2
    fi
    results=${results:-$repo/benchmarks/results}
    mkdir -p "$results"
    results=$(cd "$results" && pwd)
    work=$repo
    train_args=(--epochs "${EPOCHS:-4}")
    bench_args=(--batch-sizes 1,8,32 --iters 30 --warmup 10 --train-steps 30)
fi
run=$work/runs/gpu-h100
mkdir -p "$work"
cd "$work"  # train_ddp.py writes the synthetic stand-in under the working directory
export PYTHONUNBUFFERED=1
export COLUMNS=${COLUMNS:-160}  # rich draws the benchmark tables this wide in the log, not 80 columns

{
    sampler=""
    stop_sampler() {
        if [[ -n $sampler ]]; then
            kill "$sampler" 2>/dev/null || true
            wait "$sampler" 2>/dev/null || true
            sampler=""
        fi
    }
    trap stop_sampler EXIT  # a failed step must not leave nvidia-smi sampling

    echo "== machine"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi failed"
    else
        echo "nvidia-smi: not found"
    fi
    python -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('onnxruntime', ort.__version__, ort.get_available_providers())"

    echo "== train (${train_args[*]})"
    rm -rf "$run"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=utilization.gpu --format=csv -lms 200 >"$results/gpu_utilisation.csv" 2>&1 &
        sampler=$!
    else
        echo "gpu utilisation: skipped (no nvidia-smi)"
    fi
    start=$(date +%s)
    # python -m: the launcher of the same interpreter as the other steps, on PATH or not.
    python -m accelerate.commands.launch --config_file "$repo/configs/accelerate/gpu_1.yaml" "$repo/train_ddp.py" \
        --config "$repo/configs/gpu_h100.yaml" --output-dir "$work/runs" --run-name gpu-h100 \
        "${train_args[@]}"
    echo "train wall time: $(($(date +%s) - start)) s"
    if [[ -n $sampler ]]; then
        stop_sampler
        awk '/^[0-9]+ %$/ { n++; sum += $1; if ($1 > max) max = $1 }
             END { if (n) printf "gpu utilisation during training: mean %.0f %%, max %d %%, %d samples every 200 ms\n", sum / n, max, n
                   else print "gpu utilisation during training: no samples" }' "$results/gpu_utilisation.csv"
    fi

    echo "== export"
    start=$(date +%s)
    python "$repo/export.py" --run "$run" --fp16 --int8
    echo "export wall time: $(($(date +%s) - start)) s"

    echo "== benchmark"
    python "$repo/benchmark.py" --run "$run" --backends "$backends" "${bench_args[@]}"
} 2>&1 | tee "$results/gpu_log.txt"

cp "$run/benchmark.md" "$results/gpu_benchmark.md"
cp "$run/benchmark.json" "$results/gpu_benchmark.json"
cp "$run/metrics.json" "$results/gpu_metrics.json"
cp "$run/history.json" "$results/gpu_history.json"
cp "$run/export.json" "$results/gpu_export.json"
echo "reports in $results"
