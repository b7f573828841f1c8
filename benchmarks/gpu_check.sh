#!/usr/bin/env bash
# GPU acceptance in one command (about 10 minutes on one GPU; 456 s on an H200 with
# GPU_CHECK_BUDGET=470, which cut the last step short), the figures first:
# benchmarks/gpu_throughput.py (fused vs separate sub-nets, sub-net vs global, at two batch
# sizes), benchmarks/phase_speed.py in the paper's split (phase-1 epoch vs global epoch on the
# GPUs), the pipeline on the GPU (NCCL when there are 2 or more GPUs; N > P fused on one GPU)
# in bf16, --compile and fp16, benchmarks/overhead.py --device cuda, benchmarks/decode_speed.py
# (JPEG decoding and the --cache-dir cache against the GPU's rate), CUDA graphs (in the step
# benchmark and in the pipeline: phase_speed.py with --compile-mode reduce-overhead), and the
# test suite's GPU-only tests (where pytest is importable); one Markdown summary, written a row
# at a time.
#
#   bash benchmarks/gpu_check.sh [SUMMARY.md]        # default: runs/gpu-check-<time>/summary.md
#   GPU_CHECK_BUDGET=480 bash benchmarks/gpu_check.sh  # stop starting steps after 480 s
#   GPU_CHECK_STEPS="phase-speed gpu-tests" bash benchmarks/gpu_check.sh  # only these steps
#
# Every step runs under `timeout`, cut to what is left of GPU_CHECK_BUDGET (seconds, default
# none), so a hung step is a failed line and a lease's limit is kept: steps that no longer fit
# are listed as skipped. GPU_CHECK_DIR sets the run directory. Put the summary's figures into
# BENCHMARKS.md with the date and the GPU model.
set -uo pipefail
case ${1:-} in  # (--help was taken for the summary's path, and made folders of dirname's usage)
    -h | --help) sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1: usage: bash benchmarks/gpu_check.sh [SUMMARY.md]" >&2; exit 2 ;;
esac
summary=${1:+$(realpath -m -- "$1")}  # where it was named, before the cd
[[ -n ${GPU_CHECK_DIR:-} ]] && GPU_CHECK_DIR=$(realpath -m -- "$GPU_CHECK_DIR")
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if (( gpus < 1 )); then  # (before anything is written)
    echo "gpu_check: no GPU visible" >&2
    exit 2
fi
dir=${GPU_CHECK_DIR:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
budget=${GPU_CHECK_BUDGET:-0}  # seconds; 0: no limit
summary=${summary:-$dir/summary.md}
mkdir -p "$dir" "$(dirname "$summary")"
tiny=(--dataset synthetic --arch resnet32 --width 1 --shortcut B --subnets 4 --subnet-data shard
      --train-samples 4096 --test-samples 1024 --subnet-epochs 2 --finetune-epochs 1 --baseline-epochs 2
      --batch-size 128 --strategy both --device cuda)
nproc=$(( gpus >= 4 ? 4 : (gpus >= 2 ? 2 : 1) ))

{
    echo "# GPU check, $(date -u +%Y-%m-%d)"
    echo
    echo "\`$("$python" -c 'import torch; print(torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')\`"
    echo
    echo "| step | command | result | seconds |"
    echo "|---|---|---|---:|"
} >"$summary"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, log it, one summary row
    local name=$1 limit=$2
    shift 2
    [[ -z ${GPU_CHECK_STEPS:-} || " $GPU_CHECK_STEPS " == *" $name "* ]] || return 0
    if ((budget > 0)); then
        local left=$((budget - SECONDS - 15))  # 15 s for the summary's tail
        if ((left < 30)); then
            echo "| $name | \`$*\` | skipped: GPU_CHECK_BUDGET=$budget s spent | 0 |" >>"$summary"
            echo "gpu_check: $name skipped (budget spent)"
            return
        fi
        ((limit > left)) && limit=$left
    fi
    local start=$SECONDS log="$dir/$name.log" rc
    timeout "$limit" "$@" >"$log" 2>&1
    rc=$?
    local last
    last=$(grep -v '^\s*$' "$log" | tail -n 1 | tr '|' '/' | cut -c1-160)
    echo "| $name | \`$*\` | $( ((rc == 0)) && echo "ok: $last" || echo "FAILED (exit $rc): $last") | $((SECONDS - start)) |" >>"$summary"
    echo "gpu_check: $name exit $rc ($((SECONDS - start)) s)"
}

# the figures: fused vs separate sub-nets and sub-net vs global per GPU, then phase 1 vs the
# global net in the real pipeline (the paper's split; N > P runs the sub-nets fused)
step "gpu-throughput" 120 "$python" benchmarks/gpu_throughput.py --quick --preset cifar10-resnet32
step "gpu-throughput-b1024" 120 "$python" benchmarks/gpu_throughput.py --quick --preset cifar10-resnet32 \
    --batch-size 1024
step "phase-speed" 180 "$python" benchmarks/phase_speed.py --nproc "$nproc" --out "$dir/phase-speed" \
    --arch resnet32 --width 1 --subnets 4 --shortcut B --dataset synthetic --train-samples 32768 \
    --test-samples 1024 --batch-size 128 --epochs 4 --device cuda --precision bf16
step "phase-speed-graphs" 300 "$python" benchmarks/phase_speed.py --nproc "$nproc" --out "$dir/phase-speed-graphs" \
    --arch resnet32 --width 1 --subnets 4 --shortcut B --dataset synthetic --train-samples 32768 \
    --test-samples 1024 --batch-size 128 --epochs 4 --device cuda --precision bf16 --compile --compile-mode reduce-overhead
if "$python" -c 'import pytest' 2>/dev/null; then  # the suite's GPU-only tests (they skip on CPU-only CI)
    step "gpu-tests" 300 "$python" -m pytest -q -p no:cacheprovider tests/test_fused_run.py tests/test_benchmarks.py \
        -k "cuda_graphs or gpu_throughput_headline"
fi
# the pipeline: NCCL between GPUs when there are several, fused sub-nets when N > P
step "pipeline-bf16" 150 "$python" -m dd_mpi --nproc "$nproc" "${tiny[@]}" --precision bf16 --out "$dir/bf16"
step "overhead" 120 "$python" benchmarks/overhead.py --quick --device cuda --nproc "$nproc"
step "decode-vs-cache" 120 "$python" benchmarks/decode_speed.py --quick  # the Food-101 sub-net's rate on this GPU
step "pipeline-compile" 240 "$python" -m dd_mpi --nproc "$nproc" "${tiny[@]}" --compile --out "$dir/compile"
step "pipeline-fp16" 150 "$python" -m dd_mpi --nproc "$nproc" "${tiny[@]}" --precision fp16 --out "$dir/fp16"
step "gpu-throughput-graphs" 180 "$python" benchmarks/gpu_throughput.py --quick --preset cifar10-resnet32 \
    --compile reduce-overhead
{
    echo
    for run in bf16 fp16 compile; do
        [[ -f $dir/$run/report.md ]] || continue
        echo "## $run"
        echo
        tail -n +3 "$dir/$run/report.md"
        echo
    done
    echo "## the benchmarks' output"
    echo
    for log in gpu-throughput gpu-throughput-b1024 gpu-throughput-graphs phase-speed phase-speed-graphs overhead \
        decode-vs-cache gpu-tests; do
        [[ -f $dir/$log.log ]] && sed 's/^/    /' "$dir/$log.log"
    done
} >>"$summary"
echo "gpu_check: summary in $summary"
