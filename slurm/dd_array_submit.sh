#!/usr/bin/env bash
# Submit a domain-decomposition run as N+1 jobs: phase 1 as a job array of slurm/dd_array.sh
# (task k trains sub-network k), then compose + fine-tune in one job that starts once every
# task has succeeded (afterok), and is cancelled if one fails.
#
#   bash slurm/dd_array_submit.sh [SBATCH_OPTION...] [-- DD_TRAIN_ARG...]
#
#   bash slurm/dd_array_submit.sh                            # CIFAR-10 ResNet32, 4 sub-nets
#   bash slurm/dd_array_submit.sh -p gpu -- --preset cifar100-resnet56 --subnets 8
#   bash slurm/dd_array_submit.sh --wait --gpus-per-node=0 --cpus-per-task=1 -- --device cpu
#   bash slurm/dd_array_submit.sh --array=2 -- --out runs/x      # task 2 failed: it alone again
#
# --array=LIST (or --array LIST, -a LIST) resubmits only those sub-networks on an existing --out (the others' checkpoints
# are kept and loaded), then the final job, which composes and fine-tunes as before.
# N is dd-train's (a preset's, --config's or --subnets'): it is asked with --print-config.
# The sbatch options go to both submissions; the final job also gets --nodes=N (each
# sub-network had a node, fine-tuning uses them all) unless the options set --nodes.
# --wait waits for the final job and exits 1 unless it completed. The last line printed is
# `array=ID final=ID out=DIR`.
set -euo pipefail

sbatch_opts=()
while (( $# )) && [[ $1 != -- ]]; do sbatch_opts+=("$1"); shift; done
(( $# )) && shift  # the --
dd_args=("$@")

here=$(cd "$(dirname "$0")" && pwd)  # absolute: sbatch may be told --chdir
# shellcheck source-path=SCRIPTDIR source=flags.sh
source "$here/flags.sh"
# N as dd-train will see it (a preset, --config or --subnets set it): one array task each.
# The job's environment is this shell's (sbatch --export=ALL), so is its dd-train.
dd_train=$(command -v dd-train || echo "$here/../.venv/bin/dd-train")
if [[ ! -x $dd_train ]]; then
    echo "dd_array_submit.sh: dd-train not found: activate dd_mpi's environment (or install it in $here/../.venv)" >&2
    exit 2
fi
config=$("$dd_train" --preset cifar10-resnet32 --strategy dd ${dd_args[@]+"${dd_args[@]}"} --print-config) || exit 2  # dd_array.sh's flags
subnets=$(sed -n 's/^subnets: *\([0-9]*\)$/\1/p' <<< "$config")
out=$(last_value --out "runs/dd_array-$(date +%Y%m%d-%H%M%S)" ${dd_args[@]+"${dd_args[@]}"})
dd_args+=(--out "$out")  # on the command line: a site's --export=NONE would drop an environment variable

wait=0 opts=() tasks="0-$((subnets - 1))"
for ((i = 0; i < ${#sbatch_opts[@]}; i++)); do  # only the final job is waited for; --array is the array's
    opt=${sbatch_opts[i]}
    case $opt in
        --wait | -W) wait=1 ;;
        --array | -a) tasks=${sbatch_opts[i + 1]:?"$opt needs a list of tasks"}; i=$((i + 1)) ;;
        --array=*) tasks=${opt#--array=} ;;
        -a?*) tasks=${opt#-a} ;;
        *) opts+=("$opt") ;;
    esac
done
array=$(sbatch --parsable --array="$tasks" ${opts[@]+"${opts[@]}"} \
        "$here/dd_array.sh" ${dd_args[@]+"${dd_args[@]}"})
array=${array%%;*}  # --parsable prints id[;cluster]
echo "phase 1: job array $array, tasks $tasks of $subnets sub-networks, run directory $out"

final_opts=(--parsable --nodes="$subnets" --output=%x-%j.out ${opts[@]+"${opts[@]}"}  # the user's --output wins
            --dependency="afterok:$array" --kill-on-invalid-dep=yes)
refused() {  # the array would train its sub-networks with nothing to compose them: take it back
    scancel "$array" || true
    echo "dd_array_submit.sh: sbatch refused the final job (above; it asks --nodes=$subnets, a node per" \
         "sub-network, unless the options give --nodes): cancelled the array $array" >&2
    exit 1
}
if (( ! wait )); then
    final=$(sbatch "${final_opts[@]}" "$here/dd_array.sh" ${dd_args[@]+"${dd_args[@]}"}) || refused
    echo "array=$array final=${final%%;*} out=$out"
    exit 0
fi
rc=0
final=$(sbatch --wait "${final_opts[@]}" "$here/dd_array.sh" ${dd_args[@]+"${dd_args[@]}"}) || rc=$?
final=${final%%;*}
[[ -n $final ]] || refused  # (--wait prints the id once submitted)
# sbatch --wait exits 0 for a job cancelled before it started (here: a failed array task)
state=$(scontrol show job "$final" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p') || true
echo "phase 2+3: job $final ${state:-finished}, exit $rc"
echo "array=$array final=$final out=$out"
if (( rc == 0 )) && [[ ${state:-COMPLETED} != COMPLETED ]]; then rc=1; fi
exit "$rc"
