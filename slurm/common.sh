# shellcheck shell=bash
# Sourced by the job scripts in slurm/ (never submitted itself). It sets up the environment
# and defines
#
#   dd_train ARGS...   srun one dd-train rank per task (one per GPU), exit with its code
#
# Stopping and requeueing (dd-train exits 0 ok, 1 failure, 2 usage error, 75 preempted):
# USR1 or TERM to the batch shell -- --signal=B:USR1@120 before the time limit, or
# `scancel --signal=USR1 --batch JOBID` -- is passed to every rank as USR1 through srun
# (srun forwards USR1 to its tasks; a TERM to srun would kill them before they checkpoint).
# The ranks checkpoint and exit 75, and the job requeues itself: same job id, same log,
# SLURM_RESTART_COUNT=1, and dd-train resumes from its checkpoints. After a TERM it does so
# only for a time limit or a preemption: a plain `scancel` checkpoints and stays cancelled. Slurm holds a requeued
# job for about two minutes before it starts again. Details: slurm/NOTES.md.

# ---- SITE SETUP: edit for your cluster ------------------------------------------------
# DD_SRUN_MPI: srun's --mpi plugin (default pmi2, what pip's MPICH speaks; pmix for an MPI
# built against PMIx; none: no MPI at all, torch.distributed meets at MASTER_ADDR alone)
# module load python/3.11 cuda/12.4
# source "$HOME/venvs/dd_mpi/bin/activate"
# export NCCL_SOCKET_IFNAME=ib0
# Default: sbatch passes the submitting shell's environment on, so an activated venv
# carries over; otherwise the repository's own .venv.
DD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! command -v dd-train >/dev/null && [[ -f $DD_ROOT/.venv/bin/activate ]]; then
    # shellcheck source=/dev/null
    source "$DD_ROOT/.venv/bin/activate"
fi
# ----------------------------------------------------------------------------------------
if ! command -v dd-train >/dev/null; then  # (else srun's "execve(): dd-train: No such file", once a task)
    echo "dd_mpi: error: dd-train is not on PATH in the job (sbatch --export=NONE, or a site's default, drops" \
         "the environment you activated): activate dd_mpi's environment in the SITE SETUP of" \
         "$DD_ROOT/slurm/common.sh, or install it in $DD_ROOT/.venv" >&2
    exit 2
fi

# torch.distributed rendezvous: rank 0 listens on the job's first node, on a port derived
# from the job id so that jobs sharing a node do not collide.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))  # 15000-29999: below the kernel's ephemeral ports (32768+)
export MASTER_ADDR MASTER_PORT
# This job for scontrol: an array task's SLURM_JOB_ID is its own, but the last task's equals
# the array's, and `scontrol requeue ARRAYID` requeues every task: ARRAYID_TASK is this one.
DD_JOB=$SLURM_JOB_ID
if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    DD_JOB=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
fi

dd_train() {
    local rc
    if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then
        set -- "$@" --resume
        # A requeued job numbers its steps from 0 again, and MPICH names its shared memory
        # after job.step: ranks killed at the requeue leave a segment that a new step 0
        # attaches to and fails in MPI_Init. An empty step 0 moves dd-train to step 1.
        srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 true || true
    fi
    echo "dd_mpi: job $DD_JOB restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS ranks on" \
         "$SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"
    echo "dd_mpi: dd-train $*"
    # The job log (this shell's stderr), and where this run's part of it begins
    local log offset=0 first
    log=$(readlink -f "/proc/$$/fd/2") || log=""
    if [[ -f $log ]]; then offset=$(stat -c %s "$log"); fi
    _dd_stop="" _dd_srun=""
    trap '_dd_forward USR1' USR1
    trap '_dd_forward TERM' TERM
    # --kill-on-bad-exit: one failed rank ends the step instead of leaving the rest hanging.
    # --cpus-per-task explicit: some Slurm releases do not pass the job's value on to srun.
    srun --kill-on-bad-exit=1 --mpi="${DD_SRUN_MPI:-pmi2}" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
        dd-train "$@" &
    _dd_srun=$!
    # A trapped signal makes `wait` return early (status > 128): wait again until srun has
    # exited (bash keeps a finished child's status, so a second wait cannot miss it).
    while :; do
        _dd_interrupted=0 rc=0
        wait "$_dd_srun" || rc=$?
        (( _dd_interrupted )) || break
    done
    trap - USR1 TERM
    # --kill-on-bad-exit ends the other ranks with SIGTERM when the first exits non-zero, and
    # srun then exits 143: take the first rank's code from srun's report in the log instead.
    if (( rc > 128 )) && [[ -f $log ]]; then
        first=$(tail -c +"$((offset + 1))" "$log" \
                | sed -n 's/^srun: error: .*: Exited with exit code \([0-9]*\)$/\1/p' | head -n1)
        rc=${first:-$rc}
    fi
    # 75: checkpointed and stopped. Over 128 after a stop request: ranks ended by a signal
    # (Slurm's own TERM, say) while stopping; checkpoints are atomic, the last one is intact.
    if (( rc == 75 )) || { [[ -n $_dd_stop ]] && (( rc > 128 )); }; then
        # TERM comes from a time limit and a preemption, but also from a plain `scancel`:
        # only Slurm's reason tells them apart, and a cancelled job must stay cancelled.
        local job reason restarts
        job=$(scontrol -o show job "$DD_JOB" 2>/dev/null | head -n1) || true
        reason=$(grep -o 'Reason=[^ ]*' <<< "$job" | cut -d= -f2) || true
        restarts=$(grep -o 'Restarts=[0-9]*' <<< "$job" | cut -d= -f2) || true
        # `scontrol requeue` (an admin's, or a preemption's in requeue mode) sends the same
        # TERM, Reason None as a scancel, but has counted the restart already
        if (( ${restarts:-0} > ${SLURM_RESTART_COUNT:-0} )); then
            echo "dd_mpi: stopped (exit $rc${_dd_stop:+ after SIG$_dd_stop}): Slurm requeued job $DD_JOB" \
                 "itself; it resumes from the checkpoints in --out"
            exit 75
        fi
        if [[ $_dd_stop == TERM && $reason != TimeLimit && $reason != *Preempt* ]]; then
            echo "dd_mpi: stopped (exit $rc after SIGTERM, reason ${reason:-unknown}: cancelled):" \
                 "not requeueing; the checkpoints in --out resume with --resume"
            exit 75
        fi
        echo "dd_mpi: stopped (exit $rc${_dd_stop:+ after SIG$_dd_stop}${reason:+, reason $reason}):" \
             "requeueing job $DD_JOB"
        scontrol requeue "$DD_JOB" \
            || echo "dd_mpi: requeue refused (--no-requeue?): resubmit with --resume" >&2
        exit 75
    fi
    exit "$rc"
}

_dd_forward() {
    _dd_interrupted=1
    [[ -z $_dd_stop && -n $_dd_srun ]] || return 0  # once is enough
    _dd_stop=$1
    echo "dd_mpi: SIG$1: asking the ranks to checkpoint and stop" >&2
    kill -USR1 "$_dd_srun" 2>/dev/null || true
}
