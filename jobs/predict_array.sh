#!/bin/bash
# Predict with a trained model as a Slurm job array (predict_array), then merge the shards.
#
# Rendered by:
#   zoobot-hpc render-predict --gpus 1 --job-name predict_array --log-dir jobs/logs --script-name jobs/predict_array.sh
# Run with bash (not sbatch), from the repository root:
#   ZOOBOT_CHECKPOINT=path/to/best.ckpt ZOOBOT_IMAGES=catalog.parquet bash jobs/predict_array.sh
# It submits itself as a job array of ZOOBOT_SHARDS tasks (one catalog shard each, writing
# part-KKKKK-of-N.parquet into ZOOBOT_PREDICTIONS) and a merge job that runs only if every shard
# succeeded (--dependency=afterok), writing ZOOBOT_OUTPUT. A failed shard is rerun alone with
#   sbatch --array=K jobs/predict_array.sh   (same environment; the submission prints the exact command),
# then the merge command it prints.
# Environment (defaults in brackets):
#   ZOOBOT_CHECKPOINT   trained checkpoint [outputs/train_dr5/checkpoints/best.ckpt]
#   ZOOBOT_IMAGES       catalog (id_str, file_loc) or folder of images [data/predict/catalog.parquet]
#   ZOOBOT_PREDICTIONS  folder for the shard files [outputs/predictions/parts]
#   ZOOBOT_OUTPUT       merged prediction file [outputs/predictions/predictions.parquet]
#   ZOOBOT_SHARDS       number of shards = array tasks [4]
#   ZOOBOT_N_SAMPLES    MC-dropout forward passes per galaxy [5]
#   ZOOBOT_GPUS         GPUs each shard asks for and uses, 0 = CPU [1]
#   ZOOBOT_NUM_WORKERS  image-decoding processes per shard [4]
#   ZOOBOT_IMAGE        container image for every task [none]
#   ZOOBOT_RUNTIME, ZOOBOT_BIND, ZOOBOT_PYTHON   as in the training script [apptainer]
#SBATCH --job-name=predict_array
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=5
#SBATCH --gpus-per-node=1
#SBATCH --time=4:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=jobs/logs/%x-%A_%a.out
set -euo pipefail

CHECKPOINT=${ZOOBOT_CHECKPOINT:-"outputs/train_dr5/checkpoints/best.ckpt"}
IMAGES=${ZOOBOT_IMAGES:-"data/predict/catalog.parquet"}
PREDICTIONS=${ZOOBOT_PREDICTIONS:-"outputs/predictions/parts"}
OUTPUT=${ZOOBOT_OUTPUT:-"outputs/predictions/predictions.parquet"}
SHARDS=${ZOOBOT_SHARDS:-4}
N_SAMPLES=${ZOOBOT_N_SAMPLES:-5}
GPUS=${ZOOBOT_GPUS:-1}
NUM_WORKERS=${ZOOBOT_NUM_WORKERS:-4}
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

if [ -z "${SLURM_JOB_ID:-}" ]; then
  # Not in a job: check the inputs, then submit the array and the merge that waits for it.
  for f in "$CHECKPOINT" "$IMAGES"; do
    if [ ! -e "$f" ]; then
      echo "predict: $f does not exist; set ZOOBOT_CHECKPOINT / ZOOBOT_IMAGES" >&2
      exit 2
    fi
  done
  mkdir -p "$PREDICTIONS" jobs/logs
  export ZOOBOT_CHECKPOINT=$CHECKPOINT ZOOBOT_IMAGES=$IMAGES ZOOBOT_PREDICTIONS=$PREDICTIONS \
    ZOOBOT_OUTPUT=$OUTPUT ZOOBOT_SHARDS=$SHARDS ZOOBOT_N_SAMPLES=$N_SAMPLES ZOOBOT_GPUS=$GPUS \
    ZOOBOT_NUM_WORKERS=$NUM_WORKERS
  submit=(sbatch)
  if [ "$GPUS" != "1" ]; then submit+=(--gpus-per-node="$GPUS"); fi  # replaces the #SBATCH line
  array_id=$("${submit[@]}" --parsable --array="0-$((SHARDS - 1))" "$0")
  array_id=${array_id%%;*}
  merge=("${python[@]}" -m zoobot_hpc merge "$PREDICTIONS" "$OUTPUT" --images "$IMAGES")
  merge_id=$(sbatch --parsable --job-name=predict_array-merge --dependency="afterok:$array_id" \
    --kill-on-invalid-dep=yes --nodes=1 --ntasks=1 --cpus-per-task=1 --time=30:00 \
    --output=jobs/logs/%x-%j.out --wrap="$(printf '%q ' "${merge[@]}")")
  merge_id=${merge_id%%;*}
  echo "submitted prediction array $array_id ($SHARDS shards) and merge job $merge_id"
  echo "if a shard fails: ${submit[*]} --array=K $0, then: ${merge[*]}"
  echo "$array_id $merge_id"
  exit 0
fi
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "predict: run this script with bash, not sbatch: it submits the array and the merge itself" >&2
  exit 2
fi

srun --kill-on-bad-exit=1 --ntasks=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \
  "${python[@]}" -m zoobot_hpc predict "$CHECKPOINT" "$IMAGES" "$PREDICTIONS" --no-progress \
  --n-samples "$N_SAMPLES" --gpus "$GPUS" --num-workers "$NUM_WORKERS" \
  --num-shards "$SHARDS" --shard-index "$SLURM_ARRAY_TASK_ID"
