#!/usr/bin/env bash
# Stop the daemons that .ci/slurm_up.sh started, by their PID files. Jobs still running
# are cancelled first so no dd-train outlives the cluster.
set -uo pipefail

stop() {  # stop PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local pidfile=$1 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

command -v scancel >/dev/null && timeout 10 scancel --full --user "$(id -un)" 2>/dev/null
sleep 1
for pidfile in /run/slurmd-*.pid /run/slurmd.pid; do stop "$pidfile"; done
stop /run/slurmctld.pid
stop /run/munge/munged.pid
echo "[slurm_down] stopped"
