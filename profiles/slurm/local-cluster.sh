#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try profiles/slurm without a real cluster.
#
#   profiles/slurm/local-cluster.sh start  [DIR]   # start munged, slurmctld, slurmd; wait for the node
#   profiles/slurm/local-cluster.sh status [DIR]   # daemons, node and queue
#   profiles/slurm/local-cluster.sh stop   [DIR]   # cancel jobs, stop the daemons (DIR is kept)
#   eval "$(profiles/slurm/local-cluster.sh env [DIR])"   # point sbatch, squeue... at it
#
# DIR (default $LAYERSCOPE_SLURM_DIR, else ${TMPDIR:-/tmp}/layerscope-slurm) holds everything:
# slurm.conf, gres.conf, its own munge key and socket, state, spool, logs, pid files and an
# srun wrapper; nothing is written under /etc. Clients find the cluster through SLURM_CONF and
# PATH, which `env` prints (and `start` too). Needs Debian's slurm-wlm (22.05) and munge, and
# root. The node has this machine's CPUs and memory (`slurmd -C`) and two fake GPUs (gres
# `gpu` backed by /dev/null and /dev/zero), so `--gpus=1` jobs are scheduled as on a GPU
# cluster, two at a time; no CUDA device appears. No slurmdbd: accounting is off, `sacct` only
# says so, and job states come from `squeue`, which shows a job for an hour after it ends
# (MinJobAge). No cgroups: memory asks are scheduled, not enforced.
#
# Ports: 6817/6818 unless taken (then the next free pair), or LAYERSCOPE_SLURM_PORT and +1;
# clusters in two directories can run side by side.
set -euo pipefail

usage() { echo "usage: $0 {start|stop|status|env} [DIR]" >&2; exit 2; }
die() { echo "local-cluster: $*" >&2; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || usage
cmd=$1
dir=$(realpath -m "${2:-${LAYERSCOPE_SLURM_DIR:-${TMPDIR:-/tmp}/layerscope-slurm}}")
conf=$dir/slurm.conf
export SLURM_CONF=$conf
node=$(hostname -s)

# alive PIDFILE NAME: the daemon that wrote PIDFILE still runs (not another process that
# inherited its pid).
alive() { [[ -s $1 ]] && [[ $(cat "/proc/$(cat "$1")/comm" 2>/dev/null) == "$2" ]]; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_ports() {
    local p=${LAYERSCOPE_SLURM_PORT:-6817}
    if [[ -n ${LAYERSCOPE_SLURM_PORT:-} ]]; then
        port_free "$p" && port_free $((p + 1)) || die "LAYERSCOPE_SLURM_PORT=$p: port $p or $((p + 1)) is in use"
        echo "$p"; return
    fi
    for ((; p < 6917; p += 2)); do
        if port_free "$p" && port_free $((p + 1)); then echo "$p"; return; fi
    done
    die "no free port pair in 6817-6916; set LAYERSCOPE_SLURM_PORT"
}

write_config() {
    local port hw mem cpus
    port=$(pick_ports)
    # slurmd refuses (drains the node) if the config promises more than it finds, so the node
    # is described by slurmd's own probe.
    hw=$(slurmd -C | head -n1)
    [[ $hw == NodeName=* ]] || die "slurmd -C did not describe this machine: $hw"
    hw=${hw#NodeName=* }
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    cpus=$(sed -n 's/^CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $mem && -n $cpus ]] || die "slurmd -C gave no CPUs or RealMemory: $hw"
    # slurmd wants a character device behind each GPU: two that every machine has.
    ln -sfn /dev/null "$dir/dev/gpu0"
    ln -sfn /dev/zero "$dir/dev/gpu1"
    cat >"$conf" <<EOF
# Written by profiles/slurm/local-cluster.sh: a one-node cluster on $node, for testing.
ClusterName=layerscope
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket=$dir/munge/munge.socket.2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
PlugStackConfig=$dir/plugstack.conf
MailProg=/bin/true
# No cgroups: containers and CI machines rarely let a daemon manage them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue (the only source of job states without slurmdbd) for
# an hour: far longer than the plugin's checks are apart, and long enough to look back at a
# whole test run.
MinJobAge=3600
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that names no memory would otherwise take the whole node.
DefMemPerCPU=$((mem / cpus))
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 $hw Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # snakemake-executor-plugin-slurm-jobstep (0.6) drops every SLURM_* variable, SLURM_CONF
    # included, before it calls srun inside a job; this srun, first on PATH, finds the cluster.
    local srun
    srun=$(type -P -a srun | grep -v "^$dir/bin/" | head -n1)
    [[ -n $srun ]] || die "srun not found: install slurm-wlm"
    printf '#!/bin/sh\nSLURM_CONF=%q exec %q "$@"\n' "$conf" "$srun" >"$dir/bin/srun"
    chmod 755 "$dir/bin/srun"
    cat >"$dir/gres.conf" <<EOF
AutoDetect=off
NodeName=$node Name=gpu File=$dir/dev/gpu[0-1]
EOF
    : >"$dir/plugstack.conf"
}

env_lines() {
    printf 'export SLURM_CONF=%q\n' "$conf"
    printf 'export PATH=%q:"$PATH"\n' "$dir/bin"
}

log_tails() {
    local f
    for f in "$dir/munge/munged.log" "$dir/log/slurmctld.log" "$dir/log/slurmd.log"; do
        [[ -s $f ]] && { echo "--- tail of $f"; tail -n 15 "$f"; }
    done
    return 0
}

start() {
    local b
    for b in munged mungekey slurmctld slurmd sinfo sbatch squeue scontrol; do
        command -v "$b" >/dev/null || die "$b not found: install slurm-wlm and munge (apt-get install slurm-wlm munge)"
    done
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd starts jobs as their users)"
    mkdir -p "$dir"/{munge,state,spool,log,run,dev,bin}
    # Other users' clients reach munged through its socket in here; the key stays private.
    chmod 755 "$dir/munge"
    # The socket path must fit a sockaddr_un (108 bytes).
    ((${#dir} < 80)) || die "directory path too long for munge's socket: $dir (keep it under 80 characters)"

    # A running daemon keeps the config it was started with (and its ports).
    if ! alive "$dir/run/slurmctld.pid" slurmctld && ! alive "$dir/run/slurmd.pid" slurmd; then
        write_config
    fi

    if ! alive "$dir/munge/munged.pid" munged; then
        [[ -s $dir/munge/munge.key ]] || mungekey --create --keyfile="$dir/munge/munge.key"
        chmod 600 "$dir/munge/munge.key"
        munged --force --socket="$dir/munge/munge.socket.2" --key-file="$dir/munge/munge.key" \
            --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
            --seed-file="$dir/munge/munged.seed" \
            || { log_tails >&2; die "munged did not start"; }
    fi
    alive "$dir/run/slurmctld.pid" slurmctld || slurmctld -f "$conf" || { log_tails >&2; die "slurmctld did not start"; }
    alive "$dir/run/slurmd.pid" slurmd || slurmd -f "$conf" -N "$node" || { log_tails >&2; die "slurmd did not start"; }

    # The node registers within a few seconds once both daemons talk (busy if a cluster that
    # was already up is running jobs).
    local state
    for _ in $(seq 60); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
        if [[ $state == idle* || $state == mixed* || $state == allocated* ]]; then
            echo "local SLURM cluster up in $dir (node $node: $(sinfo -h -n "$node" -o '%c CPUs, %m MB, %G'))"
            env_lines
            return 0
        fi
        sleep 0.5
    done
    echo "node $node did not become idle: $(sinfo -h -n "$node" -o '%T %E' 2>&1)" >&2
    log_tails >&2
    exit 1
}

stop() {
    local name pidfile pid
    if alive "$dir/run/slurmctld.pid" slurmctld; then
        # Jobs first, and wait for them to go, so that no job outlives its slurmd.
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    for name in slurmd:run/slurmd.pid slurmctld:run/slurmctld.pid munged:munge/munged.pid; do
        pidfile=$dir/${name#*:}
        alive "$pidfile" "${name%%:*}" || { rm -f "$pidfile"; continue; }
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "${name%%:*} ($pid) ignored SIGTERM for 10 s; killing it" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    echo "local SLURM cluster in $dir stopped"
}

status() {
    local name rc=0
    for name in munged:munge/munged.pid slurmctld:run/slurmctld.pid slurmd:run/slurmd.pid; do
        if alive "$dir/${name#*:}" "${name%%:*}"; then
            echo "${name%%:*}: running (pid $(cat "$dir/${name#*:}"))"
        else
            echo "${name%%:*}: not running"; rc=3
        fi
    done
    if ((rc == 0)); then
        sinfo -N -o '%N %T %c %m %G'
        squeue
    fi
    return $rc
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) env_lines ;;
    *) usage ;;
esac
