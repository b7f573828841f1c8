#!/usr/bin/env bash
# Start a two-node Slurm cluster on this machine (Debian 12, as root, no systemd), so the
# sbatch tests (tests/test_slurm.py) submit the real slurm/*.sh scripts to a real controller.
#
#   bash .ci/slurm_up.sh      # install if missing, configure, start, wait until idle
#   bash .ci/slurm_down.sh    # stop the daemons
#
# Idempotent: daemons already running under the same slurm.conf are left alone. What this
# cluster does (requeue, signals, GPU requests): slurm/NOTES.md.
set -euo pipefail

say() { printf '[slurm_up] %s\n' "$*"; }
die() { say "ERROR: $*" >&2; exit 1; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
start=$SECONDS

[[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts daemons)"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v srun >/dev/null; then
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: the shared key authenticates every Slurm RPC.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# slurm.conf: two nodes on this one host, so that jobs can span "nodes": dd-n1 and dd-n2, one
# slurmd each (its own port, pid file, spool and log: a slurmd started with -N runs as that
# node; Debian's build has no --enable-multiple-slurmd, so each gets a copy of slurm.conf
# that differs in those paths), both NodeHostname=this host, and the names in /etc/hosts (job
# scripts take MASTER_ADDR from the node list). RealMemory no more than slurmd measures (more
# puts a node in state "inval"). Each claims at least 8 CPUs (SlurmdParameters=
# config_overrides): Slurm rejects --ntasks-per-node=4 on a 2-CPU node even with
# --overcommit, and the job scripts ask for 4 ranks per node (one per GPU).
host=$(hostname -s)
nodes=(dd-n1 dd-n2)
grep -q " dd-n1 dd-n2\b" /etc/hosts || echo "127.0.0.1 ${nodes[*]}" >>/etc/hosts
memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
cpus=$(( $(nproc) > 8 ? $(nproc) : 8 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
conf=$(cat <<CONF
ClusterName=ddlocal
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# pmi2 is chosen per step by the job scripts (srun --mpi=pmi2); plain srun stays MPI-free
MpiDefault=none
ReturnToService=2
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdPort=17100
JobAcctGatherType=jobacct_gather/none
# finished jobs leave the controller after 5 s, so sbatch --wait returns in seconds, not minutes
MinJobAge=5
# impossible requests fail at submission instead of pending forever
EnforcePartLimits=ALL
# Slurm's default (clusters keep it): time for the ranks to checkpoint after a time limit's TERM, on
# 2 loaded cores too (at 5 s the batch shell was once killed before it could requeue the job)
KillWait=30
SlurmdParameters=config_overrides
NodeName=dd-n1 NodeHostname=$host Port=17101 CPUs=$cpus RealMemory=${memory:-1000} State=UNKNOWN
NodeName=dd-n2 NodeHostname=$host Port=17102 CPUs=$cpus RealMemory=${memory:-1000} State=UNKNOWN
# FORCE:4: jobs may share CPUs, so several small test jobs (array tasks, sweeps) run at once
PartitionName=debug Nodes=dd-n1,dd-n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
)
changed=0
if [[ ! -f /etc/slurm/slurm.conf ]] || [[ $(cat /etc/slurm/slurm.conf) != "$conf" ]]; then
    printf '%s\n' "$conf" >/etc/slurm/slurm.conf
    changed=1
fi

node_conf() {  # node_conf NODE: slurm.conf with that node's own slurmd paths
    sed -e "s|^SlurmdPidFile=.*|SlurmdPidFile=/run/slurmd-$1.pid|" \
        -e "s|^SlurmdSpoolDir=.*|SlurmdSpoolDir=/var/spool/slurmd-$1|" \
        -e "s|^SlurmdLogFile=.*|SlurmdLogFile=/var/log/slurm/slurmd-$1.log|" /etc/slurm/slurm.conf
}
if (( changed )); then
    # a new configuration: restart whatever runs under the old one
    for pid in /run/slurmd.pid /run/slurmd-dd-n1.pid /run/slurmd-dd-n2.pid /run/slurmctld.pid; do
        if alive "$pid"; then kill "$(cat "$pid")"; fi
    done
    for _ in $(seq 50); do
        alive /run/slurmd-dd-n1.pid || alive /run/slurmd-dd-n2.pid || alive /run/slurmctld.pid || break
        sleep 0.1
    done
fi
# -i: ignore stale state from an earlier run of this script (old jobs, old node state)
alive /run/slurmctld.pid || slurmctld -i
for node in "${nodes[@]}"; do
    mkdir -p "/var/spool/slurmd-$node"
    node_conf "$node" >"/etc/slurm/slurmd-$node.conf"
    alive "/run/slurmd-$node.pid" || slurmd -f "/etc/slurm/slurmd-$node.conf" -N "$node"
done

say "waiting for nodes ${nodes[*]} to be idle"
state=""
for _ in $(seq 60); do
    state=$(sinfo -h -o %t 2>/dev/null | sort -u | tr '\n' ' ' | sed 's/ $//') || true
    [[ $state == idle || $state == mix || $state == alloc ]] && break
    sleep 1
done
if [[ $state != idle && $state != mix && $state != alloc ]]; then
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-*.log >&2 || true
    die "node state is '${state:-no answer}' after 60 s (logs above)"
fi
say "Slurm $(sinfo -V | cut -d' ' -f2) up: nodes ${nodes[*]} on $host ($cpus CPUs declared each, $(nproc) real, ${memory:-1000} MB, state $state) in $((SECONDS - start)) s"
