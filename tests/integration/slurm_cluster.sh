#!/usr/bin/env bash
# Bring up / tear down a real single-node SLURM cluster with accounting
# (munge + MariaDB + slurmdbd + slurmctld + slurmd) for integration tests.
#
# Usage: slurm_cluster.sh up|down|status|reset-job-ids
#
#   up      install missing packages (apt-get), write configs, start every daemon
#           that is not already healthy, wait until the node is usable.
#           Idempotent: a second `up` only verifies health.
#   down    stop slurmd, slurmctld, slurmdbd, MariaDB and munged (in that order).
#           Running job steps (slurmstepd) are left alone.
#   status  exit 0 iff `sinfo` and `sacct` both answer.
#   reset-job-ids
#           restart slurmctld without its saved job state, so it hands out job ids
#           from 1 again while accounting keeps the earlier jobs: what a controller
#           restored from an older copy does. Refuses while any job is queued.
#
# Debian 12 (SLURM 22.05), run as root, no systemd needed. Config goes to
# /etc/slurm (the Debian binaries read /etc/slurm/slurm.conf, no SLURM_CONF
# needed), state to /var/spool/slurm*, logs to /var/log/slurm.
#
# Tunables (environment):
#   SLURM_CLUSTER_NAME     cluster name           (default: bakery)
#   SLURM_CLUSTER_ACCOUNT  account for user root  (default: bakery)
#   SLURM_CLUSTER_TIMEOUT  seconds to wait for each daemon (default: 120)

set -euo pipefail

CLUSTER_NAME=${SLURM_CLUSTER_NAME:-bakery}
ACCOUNT=${SLURM_CLUSTER_ACCOUNT:-bakery}
WAIT_TIMEOUT=${SLURM_CLUSTER_TIMEOUT:-120}

PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

ETC=/etc/slurm
SLURM_CONF=$ETC/slurm.conf
SLURMDBD_CONF=$ETC/slurmdbd.conf
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd

MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
MUNGE_LOG=/var/log/munge/munged.log

MYSQL_SOCK=/run/mysqld/mysqld.sock
MYSQL_LOG=/var/log/mysql/error.log
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=bakery-slurmdbd   # test-only credential; slurmdbd.conf is mode 600

CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
DBD_PID=$RUN_DIR/slurmdbd.pid
CTLD_LOG=$LOG_DIR/slurmctld.log
SLURMD_LOG=$LOG_DIR/slurmd.log
DBD_LOG=$LOG_DIR/slurmdbd.log

log() { printf '[slurm_cluster] %s\n' "$*" >&2; }

# die MESSAGE [LOGFILE...]: print the message and the tail of each log, exit 1.
die() {
    local msg=$1 f
    shift
    log "ERROR: $msg"
    for f in "$@"; do
        if [[ -s $f ]]; then
            printf -- '----- tail of %s -----\n' "$f" >&2
            tail -n 40 "$f" >&2 || true
        fi
    done
    exit 1
}

# wait_until SECONDS COMMAND...: poll COMMAND until it succeeds; 1 on timeout.
wait_until() {
    local limit=$1
    shift
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.5
    done
}

# pid_running PIDFILE COMM: the pid in PIDFILE is alive and is named COMM.
pid_running() {
    local pidfile=$1 comm=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$comm" ]] && ! proc_gone "$pid"
}

# proc_gone PID: the process has exited. A zombie counts as gone: PID 1 on some
# sandboxes reaps orphans only every couple of seconds.
proc_gone() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    [[ ${stat:0:1} == Z ]]
}

# stop_pidfile PIDFILE COMM NAME: SIGTERM, wait (bounded), then SIGKILL.
stop_pidfile() {
    local pidfile=$1 comm=$2 name=$3 pid
    if ! pid_running "$pidfile" "$comm"; then
        log "$name: not running"
        rm -f "$pidfile"
        return 0
    fi
    pid=$(<"$pidfile")
    log "$name: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until 30 proc_gone "$pid"; then
        log "$name: did not stop after 30 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_until 10 proc_gone "$pid" || die "$name (pid $pid) survived SIGKILL"
    fi
    rm -f "$pidfile"
}

# write_if_changed PATH OWNER MODE: write stdin to PATH if the content differs.
# Returns 0 if the file was (re)written, 1 if it was already up to date.
write_if_changed() {
    local path=$1 owner=$2 mode=$3 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chown "$owner" "$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        chown "$owner" "$path"
        chmod "$mode" "$path"
        return 1
    fi
    mv -f "$tmp" "$path"
    return 0
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
}

# ---------------------------------------------------------------- packages --

packages_installed() {
    local p status
    for p in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) || return 1
        [[ $status == installed ]] || return 1
    done
}

# (pgrep warns about the long pattern; the match still works.)
APT_PROCS='apt|apt-get|aptitude|dpkg|unattended-upgr'

apt_busy() {
    pgrep -x "$APT_PROCS" >/dev/null 2>&1
}

ensure_packages() {
    packages_installed && return 0
    if apt_busy; then
        log "packages: another apt/dpkg run is in progress (see /tmp/apt.log), waiting for it"
        wait_until 900 bash -c "! pgrep -x '$APT_PROCS'" \
            || die "apt/dpkg still busy after 900 s" /tmp/apt.log
        packages_installed && return 0
    fi
    local p need_update=0
    for p in "${PACKAGES[@]}"; do
        apt-cache show "$p" >/dev/null 2>&1 || need_update=1
    done
    export DEBIAN_FRONTEND=noninteractive
    if ((need_update)); then
        log "packages: apt-get update"
        apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 || die "apt-get update failed"
    fi
    log "packages: installing ${PACKAGES[*]}"
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${PACKAGES[@]}" >&2 \
        || die "apt-get install ${PACKAGES[*]} failed"
    packages_installed || die "packages still not installed: ${PACKAGES[*]}"
}

# ------------------------------------------------------------ directories --

ensure_dirs() {
    install -d -o slurm -g slurm -m 755 "$LOG_DIR" "$RUN_DIR" "$CTLD_SPOOL"
    install -d -o root -g root -m 755 "$ETC" "$SLURMD_SPOOL"
    install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o mysql -g mysql -m 755 /run/mysqld
    install -d -o mysql -g adm -m 2750 /var/log/mysql
}

# ------------------------------------------------------------------ munge --

munge_ok() {
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1
}

ensure_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "munge: creating $MUNGE_KEY"
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 400 "$MUNGE_KEY"
    if pid_running "$MUNGE_PID" munged && munge_ok; then
        return 0
    fi
    log "munge: starting munged as user munge"
    runuser -u munge -- /usr/sbin/munged </dev/null >>"$MUNGE_LOG.stdio" 2>&1 \
        || die "munged failed to start" "$MUNGE_LOG" "$MUNGE_LOG.stdio"
    wait_until "$WAIT_TIMEOUT" munge_ok || die "munge does not answer" "$MUNGE_LOG"
}

# ---------------------------------------------------------------- mariadb --

mysql_ok() {
    [[ -S $MYSQL_SOCK ]] && mysqladmin --socket="$MYSQL_SOCK" ping >/dev/null 2>&1
}

# PIDs of live (non-zombie) mysqld_safe / mariadbd processes, if any.
mariadb_procs() {
    pgrep -x -r R,S,D 'mysqld_safe|mariadbd|mysqld' 2>/dev/null
}

ensure_mariadb() {
    if ! mysql_ok; then
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            log "mariadb: initialising data directory"
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >&2 \
                || die "mariadb-install-db failed"
        fi
        local pids
        if pids=$(mariadb_procs); then
            # A previous start is still coming up: a second mysqld_safe would
            # start a second server fighting over the InnoDB lock.
            log "mariadb: already starting (pids ${pids//$'\n'/ }), waiting for it"
        else
            log "mariadb: starting mysqld_safe"
            setsid mysqld_safe --user=mysql --skip-syslog --log-error="$MYSQL_LOG" \
                </dev/null >>/var/log/mysql/mysqld_safe.stdio 2>&1 &
        fi
        wait_until "$WAIT_TIMEOUT" mysql_ok \
            || die "MariaDB not answering on $MYSQL_SOCK after ${WAIT_TIMEOUT}s" \
                "$MYSQL_LOG" /var/log/mysql/mysqld_safe.stdio
    fi
    mysql --socket="$MYSQL_SOCK" <<SQL || die "creating database/user for slurmdbd failed" "$MYSQL_LOG"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
}

stop_mariadb() {
    local pid=
    pid=$(cat /run/mysqld/mysqld.pid 2>/dev/null) || true
    [[ $pid =~ ^[0-9]+$ ]] || pid=
    if mysql_ok; then
        log "mariadb: stopping${pid:+ (pid $pid)}"
        mysqladmin --socket="$MYSQL_SOCK" shutdown \
            || die "mysqladmin shutdown failed" "$MYSQL_LOG"
    elif [[ -n $pid ]] && pid_running /run/mysqld/mysqld.pid mariadbd; then
        log "mariadb: not answering, sending SIGTERM to mariadbd (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
    elif ! mariadb_procs >/dev/null; then
        log "mariadb: not running"
        return 0
    fi
    if [[ -n $pid ]]; then
        wait_until 60 proc_gone "$pid" || die "mariadbd (pid $pid) did not exit within 60 s" "$MYSQL_LOG"
    fi
    # mysqld_safe exits on its own once mariadbd has shut down cleanly.
    wait_until 60 bash -c "! pgrep -x -r R,S,D 'mysqld_safe|mariadbd|mysqld'" \
        || die "MariaDB processes still running 60 s after shutdown: $(mariadb_procs | tr '\n' ' ')" \
            "$MYSQL_LOG" /var/log/mysql/mysqld_safe.stdio
}

# ---------------------------------------------------------------- configs --

# Prints the NodeName line: `slurmd -C` with RealMemory lowered by 5 %
# (rounded down to 256 MB) so the node is never drained for "Low RealMemory".
node_line() {
    local line real mem
    line=$(slurmd -C | head -n 1)
    [[ $line == NodeName=* ]] || die "unexpected 'slurmd -C' output: $line"
    [[ $line =~ RealMemory=([0-9]+) ]] || die "no RealMemory in 'slurmd -C' output: $line"
    real=${BASH_REMATCH[1]}
    mem=$(((real * 95 / 100) / 256 * 256))
    printf '%s\n' "${line/RealMemory=$real/RealMemory=$mem}"
}

SLURM_CONF_CHANGED=0
DBD_CONF_CHANGED=0

write_configs() {
    local host node
    host=$(hostname -s)
    node=$(node_line)

    if write_if_changed "$SLURM_CONF" root:root 644 <<EOF; then
# Generated by tests/integration/slurm_cluster.sh -- single-node test cluster.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
DisableRootJobs=NO

StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, CR_Core_Memory gives every job the whole node's memory
# and jobs would run one at a time.
DefMemPerCPU=1024

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none

MaxArraySize=1001
# Short kill/timeout settings so TIMEOUT and CANCELLED show up quickly.
KillWait=5
OverTimeLimit=0
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
# A node that was DOWN (e.g. after 'down'/'up') returns as soon as it registers.
ReturnToService=2

$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
        SLURM_CONF_CHANGED=1
        log "config: wrote $SLURM_CONF"
    fi

    if write_if_changed "$SLURMDBD_CONF" slurm:slurm 600 <<EOF; then
# Generated by tests/integration/slurm_cluster.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
DebugLevel=info
LogFile=$DBD_LOG
PidFile=$DBD_PID
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
        DBD_CONF_CHANGED=1
        log "config: wrote $SLURMDBD_CONF"
    fi
}

# --------------------------------------------------------------- slurmdbd --

dbd_ok() {
    sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1
}

ensure_slurmdbd() {
    if ((DBD_CONF_CHANGED)) && pid_running "$DBD_PID" slurmdbd; then
        log "slurmdbd: config changed, restarting"
        stop_pidfile "$DBD_PID" slurmdbd slurmdbd
    fi
    if pid_running "$DBD_PID" slurmdbd && dbd_ok; then
        return 0
    fi
    if ! pid_running "$DBD_PID" slurmdbd; then
        log "slurmdbd: starting"
        slurmdbd </dev/null >>"$DBD_LOG.stdio" 2>&1 \
            || die "slurmdbd failed to start" "$DBD_LOG" "$DBD_LOG.stdio"
    fi
    wait_until "$WAIT_TIMEOUT" dbd_ok \
        || die "slurmdbd not answering (sacctmgr) after ${WAIT_TIMEOUT}s" "$DBD_LOG" "$DBD_LOG.stdio"
}

ensure_associations() {
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
        log "sacctmgr: adding cluster $CLUSTER_NAME"
        sacctmgr -i add cluster "$CLUSTER_NAME" >&2 || die "sacctmgr add cluster failed" "$DBD_LOG"
    fi
    if ! sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT"; then
        log "sacctmgr: adding account $ACCOUNT"
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER_NAME" \
            description="integration tests" organization=test >&2 \
            || die "sacctmgr add account failed" "$DBD_LOG"
    fi
    if ! sacctmgr -n -P list association cluster="$CLUSTER_NAME" account="$ACCOUNT" user=root \
            format=user | grep -qx root; then
        log "sacctmgr: adding user root to account $ACCOUNT"
        sacctmgr -i add user root account="$ACCOUNT" defaultaccount="$ACCOUNT" \
            cluster="$CLUSTER_NAME" >&2 || die "sacctmgr add user failed" "$DBD_LOG"
    fi
}

# -------------------------------------------------------- slurmctld/slurmd --

ctld_ok() {
    scontrol ping 2>/dev/null | grep -q 'is UP'
}

node_state() {
    sinfo -h -N -o '%T' 2>/dev/null | head -n 1
}

# Usable: registered and not down/drained/not-responding.
node_ok() {
    local s
    s=$(node_state)
    case $s in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

start_slurmctld() {
    log "slurmctld: starting"
    slurmctld </dev/null >>"$CTLD_LOG.stdio" 2>&1 \
        || die "slurmctld failed to start" "$CTLD_LOG" "$CTLD_LOG.stdio"
}

wait_ctld() {
    wait_until "$WAIT_TIMEOUT" ctld_ok \
        || die "slurmctld not answering (scontrol ping) after ${WAIT_TIMEOUT}s" "$CTLD_LOG" "$CTLD_LOG.stdio"
}

ensure_slurm() {
    if ((SLURM_CONF_CHANGED)); then
        if pid_running "$SLURMD_PID" slurmd || pid_running "$CTLD_PID" slurmctld; then
            log "slurm.conf changed, restarting slurmctld and slurmd"
        fi
        if pid_running "$SLURMD_PID" slurmd; then stop_pidfile "$SLURMD_PID" slurmd slurmd; fi
        if pid_running "$CTLD_PID" slurmctld; then stop_pidfile "$CTLD_PID" slurmctld slurmctld; fi
    fi
    if ! pid_running "$CTLD_PID" slurmctld; then start_slurmctld; fi
    wait_ctld

    local started_slurmd=0
    if ! pid_running "$SLURMD_PID" slurmd; then
        log "slurmd: starting"
        slurmd </dev/null >>"$SLURMD_LOG.stdio" 2>&1 \
            || die "slurmd failed to start" "$SLURMD_LOG" "$SLURMD_LOG.stdio"
        started_slurmd=1
    fi

    if ((started_slurmd)); then
        # Fresh slurmd: wait for the node to register and become usable (idle,
        # or mixed/allocated when jobs survived a down/up).
        log "slurmd: waiting for node to register"
        if ! wait_until "$WAIT_TIMEOUT" node_ok; then
            local s
            s=$(node_state)
            case $s in
                down* | drain* | fail*)
                    log "node is '$s', trying 'scontrol update state=resume'"
                    scontrol update nodename="$(hostname -s)" state=resume >&2 || true
                    wait_until 30 node_ok || die "node state is '$(node_state)' ($(
                        sinfo -h -N -o '%E')), not idle" "$SLURMD_LOG" "$CTLD_LOG"
                    ;;
                *) die "node state is '$s', not idle after ${WAIT_TIMEOUT}s" "$SLURMD_LOG" "$CTLD_LOG" ;;
            esac
        fi
    else
        node_ok || die "node state is '$(node_state)' ($(sinfo -h -N -o '%E' 2>/dev/null))" \
            "$SLURMD_LOG" "$CTLD_LOG"
    fi
}

# ---------------------------------------------------------------- actions --

status_ok() {
    sinfo -h >/dev/null 2>&1 && sacct -n -X >/dev/null 2>&1
}

cmd_up() {
    require_root
    local t0=$SECONDS
    ensure_packages
    ensure_dirs
    ensure_munge
    ensure_mariadb
    write_configs
    ensure_slurmdbd
    ensure_associations
    ensure_slurm
    status_ok || die "cluster started but sinfo/sacct do not answer" "$CTLD_LOG" "$DBD_LOG"
    log "up: cluster '$CLUSTER_NAME' ready, node $(sinfo -h -N -o '%N %T'), partition debug ($((SECONDS - t0)) s)"
}

cmd_down() {
    require_root
    stop_pidfile "$SLURMD_PID" slurmd slurmd
    stop_pidfile "$CTLD_PID" slurmctld slurmctld
    stop_pidfile "$DBD_PID" slurmdbd slurmdbd
    stop_mariadb
    stop_pidfile "$MUNGE_PID" munged munged
    log "down: all daemons stopped"
}

cmd_status() {
    local rc=0
    if sinfo -h -N -o '%N %T' >&2; then
        log "status: sinfo answers"
    else
        log "status: sinfo does not answer"
        rc=1
    fi
    if sacct -n -X >/dev/null 2>&1; then
        log "status: sacct answers"
    else
        log "status: sacct does not answer"
        rc=1
    fi
    return "$rc"
}

cmd_reset_job_ids() {
    require_root
    # Never on a cluster this script did not set up: it would make a real controller forget jobs.
    grep -q '^# Generated by tests/integration/slurm_cluster.sh' "$SLURM_CONF" 2>/dev/null \
        || die "$SLURM_CONF was not written by $0: refusing to reset that cluster's job ids"
    ctld_ok || die "slurmctld is not running: run '$0 up' first" "$CTLD_LOG"
    local queued
    queued=$(squeue -h -o '%i' | wc -l)
    ((queued == 0)) || die "$queued job(s) still queued: the controller would forget them"
    stop_pidfile "$CTLD_PID" slurmctld slurmctld
    rm -f "$CTLD_SPOOL/job_state" "$CTLD_SPOOL/job_state.old"
    log "slurmctld: job state removed"
    start_slurmctld
    wait_ctld
    wait_until "$WAIT_TIMEOUT" node_ok || die "node not usable after the restart" "$CTLD_LOG" "$SLURMD_LOG"
    log "reset-job-ids: job ids start again from 1"
}

main() {
    case ${1:-} in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        reset-job-ids) cmd_reset_job_ids ;;
        *)
            echo "usage: $0 up|down|status|reset-job-ids" >&2
            exit 2
            ;;
    esac
}

main "$@"
