#!/usr/bin/env bash
# Export a Docker image's file system to a directory that Charliecloud's `ch-run` runs unprivileged:
# the same exec model as `apptainer exec` (no daemon, the host's network and PIDs, the caller's uid,
# the host environment passed through), so a Slurm job can start one container per rank:
#
#   bash scripts/export_image_for_chrun.sh zoobot-hpc:latest /var/tmp/zoobot-hpc-img
#   srun ch-run --home --set-env --unset-env=PYTHONPATH -b /path/to/data:/data /var/tmp/zoobot-hpc-img -- \
#       python -m zoobot_hpc selftest
#
# The image's ENV (PATH with /opt/venv/bin, PYTHONNOUSERSITE, ...) is written to DIR/ch/environment,
# which `ch-run --set-env` (no argument) applies on top of the host's variables, so SLURM_* still
# reach Lightning inside. `--home` binds the caller's $HOME (as Apptainer does), so libraries find a
# writable ~/.config and ~/.cache. The host's /tmp is shared by default. `-b SRC:DST` needs DST to
# exist in the (read-only) tree: /data, /scratch and /work are there for that. Needs a Docker client that reaches an engine holding IMAGE (DOCKER_HOST),
# and for ch-run: unprivileged user namespaces and $USER set (`USER=root` when run as root in CI).
# DIR must not exist or be empty, or be an earlier export (marker file DIR/ch/exported-from), which
# is replaced.
set -euo pipefail

if [ "$#" -ne 2 ]; then
  echo "usage: $0 IMAGE DIR   (e.g. $0 zoobot-hpc:latest /var/tmp/zoobot-hpc-img)" >&2
  exit 2
fi
IMAGE=$1
DIR=$2
DOCKER=${DOCKER:-docker}
if [ -x /usr/bin/docker ] && [ "$DOCKER" = docker ]; then DOCKER=/usr/bin/docker; fi

"$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 || {
  echo "$0: image $IMAGE not found in the Docker engine at ${DOCKER_HOST:-the default socket}" >&2
  exit 1
}
if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then
  if [ -f "$DIR/ch/exported-from" ]; then
    echo "replacing the earlier export in $DIR ($(cat "$DIR/ch/exported-from"))"
    rm -rf "$DIR"
  else
    echo "$0: $DIR exists, is not empty and is not an earlier export; choose another directory" >&2
    exit 1
  fi
fi
mkdir -p "$DIR"

CONTAINER=$("$DOCKER" create "$IMAGE")
trap '"$DOCKER" rm "$CONTAINER" >/dev/null' EXIT
"$DOCKER" export "$CONTAINER" | tar -C "$DIR" -x
mkdir -p "$DIR/ch" "$DIR/dev" "$DIR/proc" "$DIR/sys" "$DIR/tmp" "$DIR/data" "$DIR/scratch"
"$DOCKER" image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" \
  | grep -v '^$' >"$DIR/ch/environment"
echo "$IMAGE $("$DOCKER" image inspect --format '{{.Id}}' "$IMAGE")" >"$DIR/ch/exported-from"
chmod 1777 "$DIR/tmp"
echo "exported $IMAGE to $DIR ($(du -sh "$DIR" | cut -f1)); run it with:"
echo "  ch-run --home --set-env --unset-env=PYTHONPATH $DIR -- python -m zoobot_hpc selftest"
