#!/usr/bin/env bash
# Run every timing-dependent test (pytest -m timing) N times in a row and tally the results
# per test: the standard is 10 of 10 on a 2-core machine under load.
#
#   bash .ci/repeat_timing.sh 10 [extra pytest args, e.g. -k horovod]
#
# Needs what CI has (Horovod built, the localhost Slurm up). Logs: runs/repeat-timing/.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
runs=${1:-10}
shift || true
logs=runs/repeat-timing
mkdir -p "$logs"
for i in $(seq 1 "$runs"); do
    .venv/bin/python -m pytest -q -m timing -rA -p no:cacheprovider "$@" >"$logs/run$i.log" 2>&1
    echo "run $i of $runs: $(tail -n 1 "$logs/run$i.log")"
done
echo
echo "per test (passed / failed / skipped over $runs runs):"
grep -h -E '^(PASSED|FAILED|ERROR|SKIPPED)' "$logs"/run*.log | sed -E 's/ - .*//' | sort | uniq -c |
    awk '{count[$3] = count[$3] " " $2 "=" $1} END {for (t in count) print t ":" count[t]}' | sort
