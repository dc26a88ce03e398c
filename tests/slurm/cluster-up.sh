#!/usr/bin/env bash
# cluster-up.sh: start a real Slurm 22.05 cluster on this one Debian 12 machine for the Slurm tests.
#
# Why a real cluster: the failures this package guards against (DDP hangs from a wrong
# --ntasks-per-node, multi-node rendezvous, requeue, submitit polling via sacct) only show up with
# real slurmctld/slurmd/slurmdbd daemons. Debian's packages are installed (root) and the daemons are
# started by hand, because this kind of machine has no systemd.
#
# Idempotent and fast when already up (< 1 s): a running cluster with the same settings is left
# alone; changed settings restart only the Slurm daemons. Exit 0 = every node idle, an srun ran and
# sacct answers. Defaults to two nodes (node1, node2), so single-node and multi-node tests share one
# cluster and it is never restarted mid-suite.
#
# Settings (environment):
#   SLURM_CI_NODES=2       compute nodes (slurmd per node, all on this machine)
#   SLURM_CI_CPUS=12       CPUs advertised per node (may exceed the real cores: jobs as
#                          committed, e.g. 2 ranks x 5 CPUs, must fit on one node)
#   SLURM_CI_GPUS=2        fake GPUs (gres/gpu, character devices) per node; 0 = none
#   SLURM_CI_TIMEOUT=90    seconds to wait for the nodes
# Logs: /var/log/slurm/   State: /var/lib/zoobot-slurm-ci/   Stop: tests/slurm/cluster-down.sh
set -euo pipefail

NODES=${SLURM_CI_NODES:-2}
CPUS=${SLURM_CI_CPUS:-12}
GPUS=${SLURM_CI_GPUS:-2}
TIMEOUT=${SLURM_CI_TIMEOUT:-90}
DB_PORT=3307
STATE=/var/lib/zoobot-slurm-ci
RUNDIR=/run/zoobot-slurm-ci
LOGDIR=/var/log/slurm
ETC=/etc/slurm
MARK="# zoobot-slurm-ci"
T0=$(date +%s)

log() { echo "cluster-up: [$(($(date +%s) - T0))s] $*"; }
fail() {
  echo "cluster-up: ERROR: $*" >&2
  for f in "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmdbd.log "$LOGDIR"/slurmd-*.log; do
    [ -r "$f" ] && { echo "--- tail of $f" >&2; grep -v -i pmix "$f" | tail -n 6 >&2; }
  done
  exit 1
}
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { # seconds command...: poll every 0.2 s
  local n=$(($1 * 5)); shift
  while ((n-- > 0)); do "$@" && return 0; sleep 0.2; done
  "$@"
}
stop() { # pidfile: TERM, wait, KILL
  local pid
  [ -s "$1" ] || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    wait_for 20 bash -c "! kill -0 $pid 2>/dev/null" || kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and starts daemons)"
for v in "$NODES" "$CPUS" "$GPUS" "$TIMEOUT"; do
  [[ $v =~ ^[0-9]+$ ]] || fail "SLURM_CI_* settings must be whole numbers (got '$v')"
done
((NODES >= 1 && CPUS >= 1)) || fail "SLURM_CI_NODES and SLURM_CI_CPUS must be at least 1"

# ---- packages (only what is missing; policy-rc.d keeps apt from starting anything)
want=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || fail "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || fail "apt-get install failed"
fi

# ---- munge (auth for every daemon and client)
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 || fail "munged did not start"
  mkdir -p "$RUNDIR" && touch "$RUNDIR/munged.ours"
  wait_for 10 bash -c 'munge -n | unmunge >/dev/null 2>&1' || fail "munge does not authenticate"
  log "munged started"
fi

# ---- names: node names must resolve, or torch's rendezvous on MASTER_ADDR=node1 loops forever
HOST=$(hostname -s)
if ((NODES == 1)); then
  NODELIST=$HOST; NAMES=("$HOST"); PORTS=""
else
  NODELIST="node[1-$NODES]"; NAMES=(); for i in $(seq 1 "$NODES"); do NAMES+=("node$i"); done
  PORTS="Port=[17001-$((17000 + NODES))]"
fi
hosts=$(grep -v -F "$MARK" /etc/hosts || true)
for n in "$HOST" "${NAMES[@]}"; do
  grep -qw -- "$n" <<<"$hosts" || hosts+=$'\n'"127.0.0.1 $n $MARK"
done
[ "$hosts" = "$(cat /etc/hosts)" ] || printf '%s\n' "$hosts" >/etc/hosts

# ---- fake GPUs: gres/gpu needs File= pointing at character devices (195 = NVIDIA's major)
mkdir -p "$STATE/state" "$STATE/spool" "$RUNDIR" "$LOGDIR" "$ETC"
if ((GPUS > 0)); then
  mkdir -p "$STATE/gpu"
  for i in $(seq 0 $((GPUS - 1))); do
    [ -c "$STATE/gpu/nvidia$i" ] || { rm -f "$STATE/gpu/nvidia$i"; mknod -m 666 "$STATE/gpu/nvidia$i" c 195 "$i"; }
  done
fi

# ---- configs (written to a scratch dir; a changed file restarts the daemons)
NEW=$(mktemp -d)
trap 'rm -rf "$NEW"' EXIT
MEM=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 85 / 100 / NODES))
GRES=""; ((GPUS > 0)) && GRES="Gres=gpu:$GPUS"
{
  echo "$MARK: written by tests/slurm/cluster-up.sh"
  echo "ClusterName=ci"
  echo "SlurmctldHost=$HOST(127.0.0.1)"
  echo "SlurmUser=root"
  echo "AuthType=auth/munge"
  # requeued jobs restart cred_expire + 1 s later (default 120 s)
  echo "AuthInfo=cred_expire=10"
  echo "StateSaveLocation=$STATE/state"
  echo "SlurmdSpoolDir=$STATE/spool/%n"
  echo "SlurmctldPidFile=$RUNDIR/slurmctld.pid"
  echo "SlurmdPidFile=$RUNDIR/slurmd-%n.pid"
  echo "SlurmctldLogFile=$LOGDIR/slurmctld.log"
  echo "SlurmdLogFile=$LOGDIR/slurmd-%n.log"
  echo "SlurmdParameters=config_overrides"
  echo "ProctrackType=proctrack/cgroup"
  echo "TaskPlugin=task/cgroup"
  echo "SwitchType=switch/none"
  echo "MpiDefault=none"
  echo "MailProg=/bin/true"
  echo "SchedulerType=sched/backfill"
  echo "SchedulerParameters=sched_interval=2,bf_interval=1"
  echo "SelectType=select/cons_tres"
  echo "SelectTypeParameters=CR_Core_Memory"
  # jobs without --mem get 512 MB per CPU, so the committed 2 x 5-CPU job fits one node's memory
  echo "DefMemPerCPU=512"
  echo "ReturnToService=2"
  echo "JobRequeue=1"
  echo "MinJobAge=600"
  echo "KillWait=10"
  ((GPUS > 0)) && echo "GresTypes=gpu" && echo "AccountingStorageTRES=gres/gpu"
  # submitit polls sacct: without accounting a job that dies never counts as done
  echo "AccountingStorageType=accounting_storage/slurmdbd"
  echo "AccountingStorageHost=127.0.0.1"
  echo "JobAcctGatherType=jobacct_gather/linux"
  echo "NodeName=$NODELIST NodeHostname=$HOST NodeAddr=127.0.0.1 $PORTS CPUs=$CPUS Boards=1" \
    "SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM $GRES State=UNKNOWN"
  echo "PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP"
} >"$NEW/slurm.conf"
printf '%s\n' "CgroupPlugin=autodetect" "ConstrainCores=yes" "ConstrainRAMSpace=yes" \
  "ConstrainDevices=yes" >"$NEW/cgroup.conf"
if ((GPUS > 0)); then
  printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s/gpu/nvidia[0-%d]\n' "$NODELIST" "$STATE" \
    $((GPUS - 1)) >"$NEW/gres.conf"
else
  : >"$NEW/gres.conf"
fi
printf '%s\n' "AuthType=auth/munge" "DbdHost=localhost" "DbdAddr=127.0.0.1" "SlurmUser=root" \
  "LogFile=$LOGDIR/slurmdbd.log" "PidFile=$RUNDIR/slurmdbd.pid" \
  "StorageType=accounting_storage/mysql" "StorageHost=127.0.0.1" "StoragePort=$DB_PORT" \
  "StorageUser=slurm" "StoragePass=zoobot-ci" "StorageLoc=slurm_acct_db" >"$NEW/slurmdbd.conf"
changed=0
for f in slurm.conf cgroup.conf gres.conf slurmdbd.conf; do
  cmp -s "$NEW/$f" "$ETC/$f" || { install -m 644 "$NEW/$f" "$ETC/$f"; changed=1; }
done
chmod 600 "$ETC/slurmdbd.conf"

# ---- accounting: a private MariaDB (own datadir and port, no system config) + slurmdbd
if ! listening "$DB_PORT"; then
  install -d -o mysql -g mysql "$STATE/mysql" "$RUNDIR/mysql"
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" --skip-test-db \
      --auth-root-authentication-method=socket >"$LOGDIR/mariadb-install.log" 2>&1 ||
      fail "mariadb-install-db failed (see $LOGDIR/mariadb-install.log)"
  fi
  touch "$LOGDIR/mariadb.log" && chown mysql:mysql "$LOGDIR/mariadb.log"
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" \
    --socket="$RUNDIR/mysql/mysqld.sock" --pid-file="$RUNDIR/mysql/mysqld.pid" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --innodb-lock-wait-timeout=900 \
    --log-error="$LOGDIR/mariadb.log" </dev/null >/dev/null 2>&1 &
  wait_for 20 listening "$DB_PORT" || fail "MariaDB is not listening on 127.0.0.1:$DB_PORT"
  mariadb --no-defaults --socket="$RUNDIR/mysql/mysqld.sock" -u root -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'zoobot-ci';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'zoobot-ci';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || fail "could not create the database user"
  log "MariaDB up"
fi
if ((changed)) || ! running "$RUNDIR/slurmdbd.pid"; then
  stop "$RUNDIR/slurmdbd.pid"
  (cd / && slurmdbd </dev/null >/dev/null 2>&1) || fail "slurmdbd did not start"
  wait_for 20 listening 6819 || fail "slurmdbd is not listening on 6819"
  log "slurmdbd up"
fi

# ---- controller and node daemons (a config change needs a real restart, not reconfigure)
restart=$changed
running "$RUNDIR/slurmctld.pid" || restart=1
for n in "${NAMES[@]}"; do running "$RUNDIR/slurmd-$n.pid" || restart=1; done
if ((restart)); then
  for f in "$RUNDIR"/slurmd-*.pid; do stop "$f"; done
  stop "$RUNDIR/slurmctld.pid"
  (cd / && slurmctld -i </dev/null >/dev/null 2>&1) || fail "slurmctld did not start"
  wait_for 20 bash -c 'scontrol ping 2>/dev/null | grep -q UP' || fail "slurmctld does not answer"
  for n in "${NAMES[@]}"; do
    mkdir -p "$STATE/spool/$n"
    (cd / && slurmd -N "$n" </dev/null >/dev/null 2>&1) || fail "slurmd -N $n did not start"
  done
  log "slurmctld + slurmd (${NAMES[*]}) started"
fi

# ---- ready when every node is usable; a node drained by an earlier config is resumed once
states=""
usable() {
  states=$(sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')
  [ -n "$states" ] || return 1
  for s in $states; do case $s in idle | mixed | allocated | completing) ;; *) return 1 ;; esac; done
}
resumed=0
for _ in $(seq $((TIMEOUT * 2))); do
  usable && break
  if ((!resumed)) && [[ $states =~ drain|down ]]; then
    scontrol update nodename="$NODELIST" state=resume 2>/dev/null || true
    resumed=1
  fi
  sleep 0.5
done
usable || { sinfo -N -o '%N %T %E' >&2; fail "nodes not usable after ${TIMEOUT}s (states: $states)"; }
if ((restart)); then
  timeout 60 srun -N "$NODES" -n "$NODES" true || fail "a test srun across ${NODES} node(s) failed"
  timeout 30 sacct -n -X -o JobID >/dev/null || fail "sacct does not answer (slurmdbd)"
fi
log "ready: $(sinfo -h -o '%D nodes %T, cpus=%c mem=%m gres=%G' | head -n 1)"
