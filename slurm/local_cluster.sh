#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, to try the sbatch templates and to test them.
#
#   slurm/local_cluster.sh up       install slurm-wlm + munge if missing (root), start munged,
#                                   slurmctld and slurmd, wait until the node is idle
#   slurm/local_cluster.sh status   daemons, node state, jobs, and the SLURM_CONF to use
#   slurm/local_cluster.sh down     cancel jobs, stop what `up` started, delete its state
#
# Every command is idempotent. Daemons run as root with process tracking through /proc
# (proctrack/linuxproc, task/none), so no cgroups or systemd are needed: it works in containers.
# Config, state and logs live in $FEDHPC_SLURM_DIR (default /var/tmp/fedhpc-slurm); when the
# machine has no /etc/slurm/slurm.conf, one is linked there so plain `sbatch`/`srun` find it.
set -euo pipefail

DIR=${FEDHPC_SLURM_DIR:-/var/tmp/fedhpc-slurm}
CONF=$DIR/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
export SLURM_CONF=$CONF

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the daemon recorded there is running (also as a user who cannot signal it)
    [[ -s $1 && -d /proc/$(cat "$1") ]]
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return
    [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed; as root run: apt-get install slurm-wlm munge"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and this is not a Debian-like system"
    say "installing slurm-wlm and munge"
    local log
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
               slurm-wlm munge; } >"$log" 2>&1; then
        cat "$log" >&2
        die "apt-get install slurm-wlm munge failed"
    fi
    rm -f "$log"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- munged
    touch "$DIR/munged.ours"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

write_config() {
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
# Written by fedhpc slurm/local_cluster.sh: one node, daemons as root, no cgroups.
ClusterName=fedhpc-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Read by slurmd even with proctrack/linuxproc; autodetection fails on hybrid cgroup mounts.
    printf 'CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n' >"$DIR/cgroup.conf"
}

wait_idle() {
    local state
    for _ in $(seq 100); do
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
        case $state in
            idle*|mixed*|allocated*|completing*) return ;;
            down*|drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    die "node $NODE is '${state:-unknown}' after 20 s (see $DIR/log/)"
}

up() {
    install_packages
    if ! alive "$DIR/slurmctld.pid" || ! alive "$DIR/slurmd.pid"; then
        [[ $(id -u) == 0 ]] || die "the cluster is not running, and starting it needs root"
        mkdir -p "$DIR"
        start_munge
        alive "$DIR/slurmctld.pid" || write_config
        alive "$DIR/slurmctld.pid" || slurmctld
        for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
        alive "$DIR/slurmd.pid" || slurmd
    fi
    if [[ ! -e $SYSTEM_CONF && $(id -u) == 0 ]]; then
        mkdir -p "$(dirname "$SYSTEM_CONF")" && ln -s "$CONF" "$SYSTEM_CONF"
    fi
    wait_idle
    say "up: node $NODE idle, $(nproc) CPUs, partition debug; SLURM_CONF=$CONF"
}

status() {
    local d
    for d in slurmctld slurmd; do
        if alive "$DIR/$d.pid"; then say "$d running (pid $(cat "$DIR/$d.pid"))"; else say "$d not running"; fi
    done
    alive "$DIR/slurmctld.pid" || return 1
    sinfo
    squeue
    say "export SLURM_CONF=$CONF"
}

stop() {  # stop PIDFILE
    alive "$1" || return 0
    local pid
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

down() {
    if alive "$DIR/slurmctld.pid"; then
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
        for _ in $(seq 100); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.2; done
    fi
    stop "$DIR/slurmd.pid"
    stop "$DIR/slurmctld.pid"
    if [[ -e $DIR/munged.ours ]]; then stop /run/munge/munged.pid; fi
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then rm -f "$SYSTEM_CONF"; fi
    rm -rf "$DIR"
    say "down"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
