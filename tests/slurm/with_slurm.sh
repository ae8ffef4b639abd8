#!/usr/bin/env bash
# Run a command against a throw-away single-node SLURM cluster on this machine (`make test-slurm`).
#
#   tests/slurm/with_slurm.sh CMD [ARGS...]
#
# Installs Debian's slurm-wlm and munge when missing (needs root and apt), writes a private munge key and a
# single-node slurm.conf under a temporary folder (nothing under /etc is changed), starts munged, slurmctld and
# slurmd on free local ports, waits until `sinfo` shows the node idle, runs CMD with SLURM_CONF pointing at the
# cluster, and stops every daemon it started when it exits (also on failure or Ctrl-C). CMD's exit status is the
# script's.
#
# Environment: SLURM_TEST_KEEP=1 keeps the temporary folder (configs, daemon logs) for a post-mortem;
# SLURM_TEST_DIR=PATH uses that folder instead of a new one.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi

need_install=0
for exe in sbatch squeue scancel sinfo slurmctld slurmd munged; do
    command -v "$exe" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" -eq 1 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "with_slurm.sh: slurm-wlm / munge are not installed and this is not root: apt-get install -y slurm-wlm munge" >&2
        exit 1
    fi
    echo "with_slurm.sh: installing slurm-wlm and munge (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi
# Debian puts the daemons in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

DIR="${SLURM_TEST_DIR:-$(mktemp -d /tmp/rsna19-slurm.XXXXXX)}"
mkdir -p "$DIR"/{state,spool/localhost,munge}
chmod 711 "$DIR" "$DIR/munge"
PIDS=()

cleanup() {
    local rc=$?
    # Cancel whatever the tests left queued, then stop the daemons in reverse order (only the PIDs started here).
    if [ -f "$DIR/slurm.conf" ]; then
        SLURM_CONF="$DIR/slurm.conf" timeout 10 scancel --full --quiet --partition=debug >/dev/null 2>&1 || true
    fi
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[i]}" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ]; then
        echo "with_slurm.sh: exit status $rc; daemon logs in $DIR (tail below)" >&2
        tail -n 20 "$DIR"/slurmctld.log "$DIR"/slurmd.log "$DIR"/munged.log 2>/dev/null >&2 || true
    fi
    if [ "${SLURM_TEST_KEEP:-0}" = "1" ] || [ "$rc" -ne 0 ]; then
        echo "with_slurm.sh: kept $DIR" >&2
    else
        rm -rf "$DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# munge: a private key, socket and daemon, so a system munged (if any) is left alone.
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge/munge.key"
munged --foreground --force \
    --key-file="$DIR/munge/munge.key" \
    --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" \
    --seed-file="$DIR/munge/munged.seed" \
    --log-file="$DIR/munged.log" >>"$DIR/munged.stderr" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do
    [ -S "$DIR/munge/munge.socket" ] && break
    sleep 0.1
done
[ -S "$DIR/munge/munge.socket" ] || { echo "with_slurm.sh: munged did not start" >&2; exit 1; }

CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
CTLD_PORT="$(free_port)"
SLURMD_PORT="$(free_port)"
: >"$DIR/plugstack.conf"
cat >"$DIR/slurm.conf" <<CONF
# Single-node test cluster written by tests/slurm/with_slurm.sh; everything lives under $DIR.
ClusterName=rsna19test
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
PlugStackConfig=$DIR/plugstack.conf
# No cgroups in this sandbox: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -D -i -f "$SLURM_CONF" >>"$DIR/slurmctld.stderr" 2>&1 &
PIDS+=($!)
slurmd -D -N localhost -f "$SLURM_CONF" >>"$DIR/slurmd.stderr" 2>&1 &
PIDS+=($!)

state=""
for _ in $(seq 120); do
    state="$(sinfo -h -n localhost -o '%T' 2>/dev/null || true)"
    [ "$state" = "idle" ] && break
    sleep 0.5
done
if [ "$state" != "idle" ]; then
    echo "with_slurm.sh: node not idle after 60 s (sinfo state: '${state:-none}')" >&2
    exit 1
fi
echo "with_slurm.sh: cluster up in $DIR ($CPUS CPUs, $MEM_MB MB, slurmctld port $CTLD_PORT)" >&2

set +e
"$@"
rc=$?
set -e
exit "$rc"
