#!/usr/bin/env bash
# cluster-down.sh: stop the cluster that tests/slurm/cluster-up.sh started (root).
#   cluster-down.sh           cancel jobs; stop slurmd(s), slurmctld, slurmdbd, MariaDB and munged
#                             (munged only if cluster-up started it). State is kept for a fast restart.
#   cluster-down.sh --purge   also delete job state, the accounting database, the fake GPUs, the
#                             configs cluster-up wrote and its /etc/hosts lines.
# Packages stay installed. Safe to run when nothing is up.
set -uo pipefail

STATE=/var/lib/zoobot-slurm-ci
RUNDIR=/run/zoobot-slurm-ci
MARK="# zoobot-slurm-ci"
purge=0
case ${1:-} in
  --purge) purge=1 ;;
  "") ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "cluster-down: run as root" >&2; exit 1; }

stop() { # pidfile: TERM, up to 20 s, then KILL
  local pid
  [ -s "$1" ] || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null && echo "cluster-down: killed $(basename "$1" .pid)"
    echo "cluster-down: stopped $(basename "$1" .pid)"
  fi
  rm -f "$1"
}

if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o '%A' 2>/dev/null)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086  # one id per word
    scancel $jobs 2>/dev/null
    for _ in $(seq 150); do [ -z "$(squeue -h -t R,CG,S 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
for f in "$RUNDIR"/slurmd-*.pid; do stop "$f"; done
stop "$RUNDIR/slurmctld.pid"
if ((purge)) && [ -S "$RUNDIR/mysql/mysqld.sock" ]; then
  mariadb --no-defaults --socket="$RUNDIR/mysql/mysqld.sock" -u root \
    -e 'DROP DATABASE IF EXISTS slurm_acct_db' 2>/dev/null
fi
stop "$RUNDIR/slurmdbd.pid"
stop "$RUNDIR/mysql/mysqld.pid"
if [ -f "$RUNDIR/munged.ours" ]; then
  stop /run/munge/munged.pid
  rm -f "$RUNDIR/munged.ours"
fi

if ((purge)); then
  rm -rf "$STATE" "$RUNDIR"
  for f in slurm.conf cgroup.conf gres.conf slurmdbd.conf; do
    if [ "$f" = slurm.conf ] && ! grep -qs -F "$MARK" /etc/slurm/slurm.conf; then
      break  # someone else's configuration: leave all of it
    fi
    rm -f "/etc/slurm/$f"
  done
  if grep -q -F "$MARK" /etc/hosts; then
    kept=$(grep -v -F "$MARK" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
  fi
  # empty cgroup (v1) folders slurmd leaves behind
  find /sys/fs/cgroup -mindepth 2 -maxdepth 2 -type d -name 'slurm_*' 2>/dev/null |
    while read -r d; do find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null; done
  echo "cluster-down: purged state, database, configs"
fi
echo "cluster-down: done"
