#!/usr/bin/env bash
# GPU acceptance in one command (about 8 minutes on one GPU): the pipeline on the GPU (NCCL
# when there are 2 or more GPUs), bf16 and fp16, --compile, benchmarks/gpu_throughput.py
# (fused vs separate sub-nets, sub-net vs global), benchmarks/overhead.py --device cuda and
# benchmarks/decode_speed.py (JPEG decoding and the --cache-dir cache against the GPU's rate);
# one Markdown summary.
#
#   bash benchmarks/gpu_check.sh [SUMMARY.md]        # default: runs/gpu-check-<time>/summary.md
#
# Every step runs under `timeout`, so a hung step is a failed line, not a hung check. Put the
# summary's figures into BENCHMARKS.md with the date and the GPU model.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
dir=runs/gpu-check-$(date +%Y%m%d-%H%M%S)
summary=${1:-$dir/summary.md}
mkdir -p "$dir" "$(dirname "$summary")"
gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if (( gpus < 1 )); then
    echo "gpu_check: no GPU visible" >&2
    exit 2
fi
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
    local start=$SECONDS log="$dir/$name.log" rc
    timeout "$limit" "$@" >"$log" 2>&1
    rc=$?
    local last
    last=$(grep -v '^\s*$' "$log" | tail -n 1 | tr '|' '/' | cut -c1-160)
    echo "| $name | \`$*\` | $( ((rc == 0)) && echo "ok: $last" || echo "FAILED (exit $rc): $last") | $((SECONDS - start)) |" >>"$summary"
    echo "gpu_check: $name exit $rc ($((SECONDS - start)) s)"
}

# the pipeline: NCCL between GPUs when there are several, fused sub-nets when N > P
step "pipeline-bf16" 150 "$python" -m dd_mpi --nproc "$nproc" "${tiny[@]}" --precision bf16 --out "$dir/bf16"
step "pipeline-fp16" 150 "$python" -m dd_mpi --nproc "$nproc" "${tiny[@]}" --precision fp16 --out "$dir/fp16"
step "pipeline-compile" 240 "$python" -m dd_mpi --nproc "$nproc" "${tiny[@]}" --compile --out "$dir/compile"
step "gpu-throughput" 150 "$python" benchmarks/gpu_throughput.py --quick --preset cifar10-resnet32
step "gpu-throughput-graphs" 180 "$python" benchmarks/gpu_throughput.py --quick --preset cifar10-resnet32 \
    --compile reduce-overhead
step "overhead" 120 "$python" benchmarks/overhead.py --quick --device cuda --nproc "$nproc"
step "decode-vs-cache" 120 "$python" benchmarks/decode_speed.py --quick  # the Food-101 sub-net's rate on this GPU

{
    echo
    for run in bf16 fp16 compile; do
        [[ -f $dir/$run/report.md ]] || continue
        echo "## $run"
        echo
        tail -n +3 "$dir/$run/report.md"
        echo
    done
    echo "## gpu_throughput.py"
    echo
    sed 's/^/    /' "$dir/gpu-throughput.log" "$dir/gpu-throughput-graphs.log" "$dir/decode-vs-cache.log" 2>/dev/null
} >>"$summary"
echo "gpu_check: summary in $summary"
