#!/usr/bin/env bash
# Scaling study: one run of a job script per (nodes, sub-networks N) pair, then a report
# job that summarises them all. Run on a login node:
#
#   bash slurm/scaling_study.sh [SBATCH_OPTION...] [-- DD_TRAIN_ARG...]
#
#   bash slurm/scaling_study.sh -- --strategy both          # DD and the baseline, each pair
#   NODES="1 2" SUBNETS="2 4" bash slurm/scaling_study.sh -p gpu
#
# Environment (defaults in brackets):
#   NODES ["1 2 4"]        node counts;  SUBNETS ["2 4 8"]  values of N
#   TASKS_PER_NODE [4]     ranks per node (any N runs on any rank count)
#   GPUS_PER_NODE [TASKS_PER_NODE]  GPUs per node, one per rank: the job script's own
#                          --gpus-per-node would otherwise put two ranks on a GPU at 8 per node
#                          (CPU nodes: pass --gpus-per-node=0 among the sbatch options)
#   SCRIPT [slurm/resnet32.sh]   the job script of one run
#   STUDY [runs/scaling-DATE]    runs go to STUDY/nodes<n>-N<N>/
# The sbatch options go to every submission; --wait waits for the report job and exits 1
# unless it completed. The last line printed is `runs=ID,... report=ID study=DIR`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)  # absolute: the report job sources common.sh from any --chdir
NODES=${NODES:-1 2 4}
SUBNETS=${SUBNETS:-2 4 8}
TASKS_PER_NODE=${TASKS_PER_NODE:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-$TASKS_PER_NODE}
SCRIPT=${SCRIPT:-$here/resnet32.sh}
STUDY=${STUDY:-runs/scaling-$(date +%Y%m%d-%H%M%S)}
# What the report job runs after `dd-report RUN_DIR` for each run: the sweep's CSV and plot
COLLECT_CMD=(dd-scaling --collect "$STUDY")

sbatch_opts=()
while (( $# )) && [[ $1 != -- ]]; do sbatch_opts+=("$1"); shift; done
(( $# )) && shift  # the --
dd_args=("$@")
wait=0 opts=()
for opt in ${sbatch_opts[@]+"${sbatch_opts[@]}"}; do  # only the report job is waited for
    if [[ $opt == --wait || $opt == -W ]]; then wait=1; else opts+=("$opt"); fi
done

ids=() dirs=()
for nodes in $NODES; do
    for n in $SUBNETS; do
        dir=$STUDY/nodes$nodes-N$n
        dirs+=("$dir")
        # A study run again (to add points, or after a failure) keeps what finished and
        # resumes what did not, as dd-scaling --local does: its dd-train refused the --out
        if [[ -f $dir/report.json ]]; then echo "run: $dir finished earlier, kept"; continue; fi
        resume=()
        if [[ -f $dir/config.json ]]; then resume=(--resume); fi
        id=$(sbatch --parsable --nodes="$nodes" --ntasks-per-node="$TASKS_PER_NODE" \
             --gpus-per-node="$GPUS_PER_NODE" --job-name="scaling-nodes$nodes-N$n" ${opts[@]+"${opts[@]}"} \
             "$SCRIPT" ${dd_args[@]+"${dd_args[@]}"} --subnets "$n" --out "$dir" ${resume[@]+"${resume[@]}"}) || {
            # a half-submitted sweep would run without its report job: take it back
            (( ${#ids[@]} )) && scancel ${ids[@]+"${ids[@]}"}
            echo "sbatch refused the run nodes=$nodes N=$n: cancelled the ${#ids[@]} submitted before it" >&2
            exit 1
        }
        ids+=("${id%%;*}")
        echo "run: job ${id%%;*}, $nodes node(s), N=$n, $dir${resume[*]:+ (resumed)}"
    done
done
(( ${#dirs[@]} )) || { echo "no (nodes, N) pair: NODES and SUBNETS are empty" >&2; exit 2; }

# The report job runs after all runs, failed ones included (afterany): it summarises what
# finished and fails if a run left no report.json.
report_opts=(--parsable ${opts[@]+"${opts[@]}"} --job-name=scaling-report --nodes=1 --ntasks=1 --output=%x-%j.out)
if (( ${#ids[@]} )); then report_opts+=(--dependency="afterany:$(IFS=:; echo "${ids[*]}")"); fi
script=$(cat <<EOS
#!/bin/bash
set -eu
# shellcheck source=/dev/null
source $(printf %q "$here/common.sh")  # the SITE SETUP (modules, venv)
missing=0
for dir in $(printf '%q ' ${dirs[@]+"${dirs[@]}"}); do
    if [[ -f \$dir/report.json ]]; then dd-report "\$dir"; else echo "no report: \$dir"; missing=1; fi
done
$(printf '%q ' "${COLLECT_CMD[@]}")
exit \$missing
EOS
)
if (( ! wait )); then
    report=$(sbatch "${report_opts[@]}" <<<"$script")
    echo "runs=$(IFS=,; echo "${ids[*]+${ids[*]}}") report=${report%%;*} study=$STUDY"  # (+: none, bash 4.3's set -u)
    exit 0
fi
rc=0
report=$(sbatch --wait "${report_opts[@]}" <<<"$script") || rc=$?
report=${report%%;*}
# sbatch --wait exits 0 for a job cancelled before it started
state=$(scontrol show job "$report" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p') || true
echo "report: job $report ${state:-finished}, exit $rc"
echo "runs=$(IFS=,; echo "${ids[*]+${ids[*]}}") report=$report study=$STUDY"
if (( rc == 0 )) && [[ ${state:-COMPLETED} != COMPLETED ]]; then rc=1; fi
exit "$rc"
