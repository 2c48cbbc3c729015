#!/usr/bin/env bash
# A one-node SLURM cluster on 127.0.0.1 for trying launch configs (and for the project's tests): munge, MariaDB,
# slurmdbd (accounting: submitit reads job states with sacct), slurmctld and slurmd, started directly (no systemd,
# no cgroups). Debian/Ubuntu, as root:
#
#   apt-get install munge slurmctld slurmd slurm-client slurmdbd mariadb-server
#   slurm/local_cluster.sh up      # ~15 s; partition "debug" with this machine's CPUs
#   slurm/local_cluster.sh status
#   slurm/local_cluster.sh down    # stops the daemons by their pid files
#
# State, logs and slurm.conf live in $BAM_SLURM_DIR (default /var/tmp/bam-slurm). When /etc/slurm/slurm.conf does not
# exist it is linked to ours so plain sbatch/squeue/sacct find the cluster; otherwise export SLURM_CONF=<dir>/slurm.conf.
set -euo pipefail

DIR=${BAM_SLURM_DIR:-/var/tmp/bam-slurm}
CONF=$DIR/slurm.conf
CLUSTER=bam
NODE=$(hostname -s)
CPUS=${BAM_SLURM_CPUS:-$(nproc)}
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
PIDS=(slurmd slurmctld slurmdbd mariadb munged)  # stop order

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

require() {
    [ "$(id -u)" = 0 ] || die "run as root (the daemons switch users and write /run); e.g. sudo $0 up"
    local missing=()
    for cmd in munged mariadbd slurmdbd slurmctld slurmd sbatch sacct; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [ ${#missing[@]} = 0 ] || die "missing ${missing[*]}; install: apt-get install munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
}

# A requeued job may start cred_expire + 1 s after its requeue (AuthInfo), but nothing wakes the scheduler then:
# it waits for the main scheduling loop, every sched_interval (SLURM's default: 60 s). Both short here, so a
# preempted test job is back in seconds.
write_configs() {
    mkdir -p "$DIR"/{state,spool,log,run}
    cat > "$CONF" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
MinJobAge=300
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
    cat > "$DIR/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=bam_slurm_acct
CONF
    chmod 600 "$DIR/slurmdbd.conf"
    if [ ! -e /etc/slurm/slurm.conf ]; then
        mkdir -p /etc/slurm && ln -s "$CONF" /etc/slurm/slurm.conf
    fi
}

alive() { kill -0 "$(cat "$DIR/run/$1.pid" 2>/dev/null)" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up in ${seconds}s; logs: $DIR/log"
}

up() {
    require
    write_configs
    export SLURM_CONF=$CONF
    mkdir -p /run/munge /run/mysqld && chown munge:munge /run/munge && chown mysql:mysql /run/mysqld
    if [ ! -f /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key && chown munge:munge /etc/munge/munge.key
    fi
    if ! alive munged; then
        mkdir -p "$DIR/munge" && chown munge:munge "$DIR/munge"
        runuser -u munge -- munged --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --force
        cp "$DIR/munge/munged.pid" "$DIR/run/munged.pid"
        wait_for 10 munged munge -n
    fi
    if ! alive mariadb; then
        [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >"$DIR/log/mariadb-install.log" 2>&1
        mkdir -p "$DIR/mysql" && chown mysql:mysql "$DIR/mysql"
        (mariadbd --user=mysql --pid-file="$DIR/mysql/mariadb.pid" --log-error="$DIR/mysql/mariadb.log" \
            --skip-networking >/dev/null 2>&1 &)
        wait_for 30 MariaDB mariadb -e "select 1"
        cp "$DIR/mysql/mariadb.pid" "$DIR/run/mariadb.pid"
    fi
    # a controller without saved state numbers its jobs from 1 again: an older accounting database would then
    # answer sacct with another job's record for the same id, so a fresh controller starts a fresh accounting
    if [ ! -e "$DIR/state/job_state" ] && ! alive slurmdbd; then
        mariadb -e "DROP DATABASE IF EXISTS bam_slurm_acct"
    fi
    alive slurmdbd || { slurmdbd;  # reads slurmdbd.conf beside $SLURM_CONF
        wait_for 30 slurmdbd sacctmgr -n list cluster; }
    alive slurmctld || slurmctld -f "$CONF"
    wait_for 30 slurmctld scontrol ping
    alive slurmd || slurmd -f "$CONF"
    wait_for 30 "node $NODE" bash -c "sinfo -h -N -o %t | grep -qx idle"
    echo "SLURM cluster '$CLUSTER' up: node $NODE ($CPUS CPUs), partition debug; SLURM_CONF=$CONF"
}

down() {
    for name in "${PIDS[@]}"; do
        if alive "$name"; then
            kill "$(cat "$DIR/run/$name.pid")" 2>/dev/null || true
            for _ in $(seq 50); do alive "$name" || break; sleep 0.2; done
        fi
        rm -f "$DIR/run/$name.pid"
    done
    [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ] && rm -f /etc/slurm/slurm.conf
    echo "SLURM cluster '$CLUSTER' down (state kept in $DIR)"
}

status() {
    for name in "${PIDS[@]}"; do
        if alive "$name"; then echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"; else echo "$name: stopped"; fi
    done
    if alive slurmctld; then SLURM_CONF=$CONF sinfo; fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    conf) echo "$CONF" ;;
    *) echo "usage: $0 up|down|status|conf" >&2; exit 2 ;;
esac
