#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests/test_slurm.py and CI.
#
#   sudo bash scripts/slurm_local.sh            # install (if needed), configure, start, wait until idle
#   bash scripts/slurm_local.sh --stop          # stop the daemons this script started
#
# Idempotent: running it again on a healthy cluster with unchanged settings changes nothing.
# Works without systemd and without cgroups (containers, gVisor): proctrack/linuxproc, task/none,
# no accounting (so `sacct` has no data: use `--slurm-status-command squeue`), select/cons_tres.
# The node is this host; it declares generic resources `gpu` so that jobs asking for `--gpus=1` /
# `--gres=gpu:1` are schedulable. slurmd drops a GPU gres without File= ("Removing file-less GPU")
# and rejects regular files ("not a valid character or block device"), so each fake GPU is a
# symlink to /dev/null under /var/lib/slurm/fake-gpu/ (nothing is bound; torch stays on the CPU).
#
# Settings (environment):
#   SLURM_LOCAL_CPU_PARTITION  name of the CPU partition (default: cpu, as in profiles/slurm)
#   SLURM_LOCAL_GPU_PARTITION  name of the GPU partition (default: gpu, as in profiles/slurm)
#   SLURM_LOCAL_GPUS           number of GPU gres declared on the node (default: number of CPUs, so that
#                              as many GPU jobs run at once as the cores allow; 1 serialises GPU rules)
#   SLURM_LOCAL_TIMEOUT        seconds to wait for the node to become idle (default: 60)
# Needs root (apt-get, daemons, /etc/slurm). Debian/Ubuntu only (apt-get, package slurm-wlm 22.05+).
set -euo pipefail

CPU_PART=${SLURM_LOCAL_CPU_PARTITION:-cpu}
GPU_PART=${SLURM_LOCAL_GPU_PARTITION:-gpu}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
CONF_DIR=/etc/slurm
STATE_DIR=/var/lib/slurm
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (installs packages, writes $CONF_DIR, starts daemons)"

stop_daemons() {
    local name pidfile pid
    for name in slurmctld slurmd munged; do
        case $name in munged) pidfile=/run/munge/munged.pid ;; *) pidfile=$RUN_DIR/$name.pid ;; esac
        if [ -s "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" && say "stopped $name (pid $pid)"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
}

if [ "${1:-}" = "--stop" ]; then
    stop_daemons
    exit 0
fi

# 1. packages --------------------------------------------------------------------------------------
missing=()
for bin in slurmctld:slurm-wlm slurmd:slurm-wlm sbatch:slurm-wlm munged:munge; do
    command -v "${bin%%:*}" >/dev/null 2>&1 || missing+=("${bin##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is not available; install slurm-wlm and munge"
    pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
    say "installing $pkgs with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $pkgs </dev/null >/tmp/slurm_local_apt.log 2>&1 \
        || die "apt-get install $pkgs failed, see /tmp/slurm_local_apt.log"
else
    say "slurm-wlm and munge already installed ($(slurmd -V))"
fi

# 2. configuration ---------------------------------------------------------------------------------
HOST=$(hostname -s)
# the hardware line slurmd itself detects: CPUs, sockets, cores, threads, memory
HW=$(slurmd -C | head -1) || die "slurmd -C failed"
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
[ -n "$CPUS" ] || die "could not parse CPUs from 'slurmd -C': $HW"
GPUS=${SLURM_LOCAL_GPUS:-$CPUS}
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_GPUS must be a positive integer, got '$GPUS'"
NODE_HW=$(sed -e 's/^NodeName=[^ ]* //' <<<"$HW")   # "CPUs=2 Boards=1 ... RealMemory=24105"

mkdir -p "$CONF_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$LOG_DIR" "$RUN_DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat >"$tmp/slurm.conf" <<EOF
# Written by dbprepro scripts/slurm_local.sh: single-node test cluster, no systemd, no cgroups.
ClusterName=dbprepro-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: track processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: sacct has no data, squeue is the status command; keep finished jobs visible
# to squeue / scontrol for 2 h (the SLURM executor needs MinJobAge >= 3x its first status delay)
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=7200
# cores are the consumable resource; memory is checked against RealMemory but not reserved,
# so several --mem=16000 jobs may share the node (this is a test cluster)
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
NodeName=$HOST $NODE_HW Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$CPU_PART Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=$GPU_PART Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF

# fake GPU devices: symlinks to the character device /dev/null (see the header)
FAKE_DIR=$STATE_DIR/fake-gpu
mkdir -p "$FAKE_DIR"
for i in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$FAKE_DIR/gpu$i"; done
cat >"$tmp/gres.conf" <<EOF
# Written by dbprepro scripts/slurm_local.sh: $GPUS schedulable fake GPU(s), each a symlink to /dev/null.
NodeName=$HOST Name=gpu File=$FAKE_DIR/gpu[0-$((GPUS - 1))]
EOF

# cgroup.conf is only read by cgroup plugins, none of which is configured; written so that a stray
# plugin load does not fail on a missing file.
cat >"$tmp/cgroup.conf" <<EOF
# Written by dbprepro scripts/slurm_local.sh: cgroups unused (proctrack/linuxproc, task/none).
CgroupPlugin=autodetect
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF

changed=0
for f in slurm.conf gres.conf cgroup.conf; do
    if ! cmp -s "$tmp/$f" "$CONF_DIR/$f"; then
        install -m 0644 "$tmp/$f" "$CONF_DIR/$f"
        say "wrote $CONF_DIR/$f"
        changed=1
    fi
done
[ $changed = 1 ] || say "configuration in $CONF_DIR unchanged"

# 3. daemons ---------------------------------------------------------------------------------------
running() {  # running NAME PIDFILE
    [ -s "$2" ] && kill -0 "$(cat "$2")" 2>/dev/null
}

if [ $changed = 1 ]; then
    stop_daemons
fi

mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if running munged /run/munge/munged.pid; then
    say "munged already running"
else
    rm -f /run/munge/munged.pid
    if command -v runuser >/dev/null; then
        runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
    else
        /usr/sbin/munged --force || die "munged failed to start (see /var/log/munge/munged.log)"
    fi
    say "started munged"
fi
munge -n | unmunge >/dev/null 2>&1 || die "munge round trip failed (munge -n | unmunge); see /var/log/munge/munged.log"

if running slurmctld "$RUN_DIR/slurmctld.pid"; then
    say "slurmctld already running"
else
    slurmctld || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log:
$(tail -20 $LOG_DIR/slurmctld.log 2>/dev/null)"
    say "started slurmctld"
fi
if running slurmd "$RUN_DIR/slurmd.pid"; then
    say "slurmd already running"
else
    slurmd || die "slurmd failed to start; see $LOG_DIR/slurmd.log:
$(tail -20 $LOG_DIR/slurmd.log 2>/dev/null)"
    say "started slurmd"
fi

# 4. wait until the node is idle (or mixed/allocated: busy with jobs is healthy too) ----------------
deadline=$(( $(date +%s) + TIMEOUT ))
state=""
while :; do
    state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null | sort -u | head -1 || true)
    case $state in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*)
            # a node left down/drained by an earlier run (e.g. a daemon restart): bring it back
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        die "node $HOST not idle after ${TIMEOUT}s (state: '${state:-none}', reason: $(sinfo -h -R -n "$HOST" -o '%E' 2>/dev/null));
--- $LOG_DIR/slurmctld.log ---
$(tail -15 $LOG_DIR/slurmctld.log 2>/dev/null)
--- $LOG_DIR/slurmd.log ---
$(tail -15 $LOG_DIR/slurmd.log 2>/dev/null)"
    fi
    for d in slurmctld slurmd; do
        running $d "$RUN_DIR/$d.pid" || die "$d exited after start; see $LOG_DIR/$d.log:
$(tail -15 $LOG_DIR/$d.log 2>/dev/null)"
    done
    sleep 1
done

say "node $HOST is $state: $CPUS CPUs, gres gpu:$GPUS, partitions $CPU_PART (default) and $GPU_PART"
sinfo -o '%P %a %D %T %c %m %G' | sed 's/^/slurm_local:   /'
