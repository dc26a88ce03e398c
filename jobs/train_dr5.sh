#!/bin/bash
# Train a Galaxy Zoo model (train_dr5): 1 node(s) x 2 GPU(s), 4 loader workers per rank.
#
# Rendered from its config by the command below; edit the config and re-render rather than
# editing this file (a test checks that the committed copy matches):
#   zoobot-hpc render --config jobs/configs/train_dr5.yaml --log-dir jobs/logs --script-name jobs/train_dr5.sh
#
# Usage, from the directory the paths below are relative to (the repository root):
#   sbatch jobs/train_dr5.sh
# Environment (all optional; defaults in brackets):
#   ZOOBOT_CONFIG    run config, keys = train() arguments [jobs/configs/train_dr5.yaml]
#   ZOOBOT_CATALOG   catalog CSV/Parquet, replaces `catalog` in the config [from the config]
#   ZOOBOT_SAVE_DIR  output folder, replaces `save_dir`; a rerun there resumes [from the config]
#   ZOOBOT_SET       more overrides, space-separated key=value, e.g. "epochs=10 batch_size=128"
#   ZOOBOT_IMAGE     container image: every rank runs in `apptainer exec --nv IMAGE` [none]
#   ZOOBOT_RUNTIME   apptainer (a .sif) or charliecloud (an image directory, ch-run) [apptainer]
#   ZOOBOT_BIND      extra paths to bind into the container, e.g. /data,/scratch [none]
#   ZOOBOT_PYTHON    Python outside a container [python3, i.e. the environment you submit from]
#   MASTER_PORT      DDP rendezvous port [derived from the job id]
# Requeue: Slurm sends SIGUSR1 before the time limit; every rank saves last.ckpt at the same step and
# this script requeues the job, which resumes from save_dir/checkpoints/last.ckpt. Logs append to one file.
#SBATCH --job-name=train_dr5
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=5
#SBATCH --gpus-per-node=2
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=jobs/logs/%x-%j.out
set -euo pipefail

CONFIG=${ZOOBOT_CONFIG:-"jobs/configs/train_dr5.yaml"}
if [ ! -f "$CONFIG" ]; then
  echo "zoobot job: config $CONFIG not found in $(pwd);" \
    "submit from the repository root or set ZOOBOT_CONFIG" >&2
  exit 2
fi
args=(--config "$CONFIG")
if [ -n "${ZOOBOT_CATALOG:-}" ]; then args+=(--set "catalog=$ZOOBOT_CATALOG"); fi
if [ -n "${ZOOBOT_SAVE_DIR:-}" ]; then args+=(--set "save_dir=$ZOOBOT_SAVE_DIR"); fi
read -r -a extra <<<"${ZOOBOT_SET:-}"
for kv in ${extra[@]+"${extra[@]}"}; do args+=(--set "$kv"); done

IMAGE=${ZOOBOT_IMAGE:-""}
RUNTIME=${ZOOBOT_RUNTIME:-apptainer}
binds=()
if [ -z "$IMAGE" ]; then
  python=("${ZOOBOT_PYTHON:-python3}")
elif [ "$RUNTIME" = apptainer ]; then
  if [ -n "${ZOOBOT_BIND:-}" ]; then binds=(--bind "$ZOOBOT_BIND"); fi
  python=(apptainer exec --nv ${binds[@]+"${binds[@]}"} "$IMAGE" python3)
elif [ "$RUNTIME" = charliecloud ]; then  # an image directory; for GPUs run `ch-fromhost --nvidia` on it once
  IFS=, read -r -a paths <<<"${ZOOBOT_BIND:-}"
  for path in ${paths[@]+"${paths[@]}"}; do binds+=(-b "$path"); done
  export USER=${USER:-$(id -un)}  # ch-run requires it
  python=(ch-run --home --set-env --unset-env=PYTHONPATH ${binds[@]+"${binds[@]}"} "$IMAGE" -- python3)
else
  echo "zoobot job: ZOOBOT_RUNTIME=$RUNTIME: use apptainer or charliecloud" >&2
  exit 2
fi

export PYTHONFAULTHANDLER="${PYTHONFAULTHANDLER:-1}"
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Rank 0's node hosts the DDP rendezvous; ranks and world size come from srun (SLURM_PROCID/NTASKS).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
echo "zoobot job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
  "$SLURM_JOB_NUM_NODES node(s) x ${SLURM_NTASKS_PER_NODE:-?} task(s), rendezvous $MASTER_ADDR:$MASTER_PORT"

# Seconds, before any rank starts: the package, config keys, catalog files, this allocation vs the spec.
if ! "${python[@]}" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('zoobot_hpc', 'torch', 'pytorch_lightning', 'pandas')))" 2>/dev/null; then
  echo "zoobot job: '${python[*]}' lacks zoobot_hpc or its dependencies; activate its environment before" \
    "sbatch, or set ZOOBOT_PYTHON=/path/to/python or ZOOBOT_IMAGE=image.sif" >&2
  exit 2
fi
"${python[@]}" -m zoobot_hpc preflight --in-job "${args[@]}"

# After the requeue signal every rank saves last.ckpt and rank 0 (on this node) leaves the flag file;
# the requeue runs here, on the host: the ranks may be in a container, without a Slurm client.
export ZOOBOT_REQUEUE_FLAG=/tmp/zoobot-requeue-$SLURM_JOB_ID
rm -f "$ZOOBOT_REQUEUE_FLAG"
status=0
srun --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \
  "${python[@]}" -m zoobot_hpc train "${args[@]}" || status=$?
if [ -f "$ZOOBOT_REQUEUE_FLAG" ]; then
  rm -f "$ZOOBOT_REQUEUE_FLAG"
  echo "zoobot job $SLURM_JOB_ID: requeueing; the rerun resumes from last.ckpt"
  scontrol requeue "$SLURM_JOB_ID" || echo "zoobot job $SLURM_JOB_ID: scontrol requeue failed; submit the job again to resume" >&2
fi
exit "$status"
