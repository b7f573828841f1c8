#!/bin/bash
# Phase 1 as a job array, one task per sub-network, then compose + fine-tune in a job that
# waits for them. Small jobs start as resources free up instead of waiting
# for all GPUs at once. Submit both with slurm/dd_array_submit.sh, or by hand:
#
#   sbatch --array=0-3 slurm/dd_array.sh --out runs/x               # phase 1, task k: group k
#   sbatch --dependency=afterok:ARRAYID slurm/dd_array.sh --out runs/x   # then phase 2 + 3
#
# As an array task: `dd-train ... --only-group $SLURM_ARRAY_TASK_ID` trains that sub-network.
# As a plain job: `dd-train ... --resume` composes the sub-networks found in the run
# directory and fine-tunes (none there: it says so and exits 2). The run directory is --out,
# else $DD_OUT, else runs/dd_array-ARRAYJOBID. Arguments after the script name go to
# dd-train, later flags win. No conventional baseline is trained (--strategy dd, over the
# preset's both: it would double the final job); --strategy both adds it to the final job.
# Give it to the array and the final job alike (dd_array_submit.sh does), and to a run begun
# by an older dd_array.sh, which trained with both: its config.json would refuse dd.
#SBATCH --job-name=dd_array
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4      # one rank per GPU: each sub-network on one node
#SBATCH --gpus-per-node=4        # all the node's GPUs visible to every rank (NCCL peer-to-peer);
#                                  a rank takes its local rank's. No GPUs: sbatch --gpus-per-node=0
#SBATCH --cpus-per-task=8        # data-loader workers and host threads per rank
#SBATCH --time=24:00:00
#SBATCH --output=%x-%A_%a.out    # array job id _ task (dd_array_submit.sh names the final log %x-%j)
#SBATCH --open-mode=append       # a requeued run appends to its log instead of erasing it
#SBATCH --requeue
#SBATCH --signal=B:USR1@120      # B: to the batch shell only, which forwards it to srun's
#                                  ranks and requeues the job when they exit 75 (common.sh)
set -eu
# sbatch runs a spooled copy of this file: find common.sh beside the submitted script
submitted=$(scontrol show job "$SLURM_JOB_ID" | awk 'sub(/^ *Command=/, "") {print; exit}')  # script, args
while [[ $submitted == *" "* && ! -f $submitted ]]; do submitted=${submitted% *}; done  # its path may hold spaces
for dir in "$(dirname "$submitted")" "$(dirname "$0")" "${SLURM_SUBMIT_DIR:-.}/slurm"; do
    [[ -f $dir/common.sh ]] && break
done
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$dir/common.sh"

out=${DD_OUT:-runs/$SLURM_JOB_NAME-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    dd_train --preset cifar10-resnet32 --strategy dd --out "$out" "$@" --only-group "$SLURM_ARRAY_TASK_ID"
else
    # The run directory as dd-train reads it (a later --out wins; its YAML in --print-config may
    # quote or wrap it). Without the array's, this job would train every sub-network itself, in
    # one job, before composing.
    dd-train --preset cifar10-resnet32 --strategy dd --out "$out" "$@" --print-config >/dev/null || exit 2  # it said why
    # shellcheck source-path=SCRIPTDIR source=flags.sh
    source "$dir/flags.sh"
    run_dir=$(last_value --out "$out" "$@")
    run_dir=${run_dir/#\~/$HOME}  # (dd-train expands a leading ~, which bash leaves in --out=~/x)
    if ! compgen -G "$run_dir/checkpoints/subnet*.pt" >/dev/null; then
        echo "dd_array.sh: error: $run_dir holds no sub-network checkpoint of the array: give this job" \
             "the array's --out (slurm/dd_array_submit.sh passes it to both)" >&2
        exit 2
    fi
    dd_train --preset cifar10-resnet32 --strategy dd --out "$out" "$@" --resume
fi
