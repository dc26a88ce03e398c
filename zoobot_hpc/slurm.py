"""Slurm job scripts rendered from one template per job kind, and a clean environment to submit from.

The scripts are plain bash a Slurm admin can read: `#SBATCH` lines from `HardwareSpec`, documented
environment overrides, a seconds-long pre-flight check in the batch shell, then every rank launched
by `srun --kill-on-bad-exit=1` (optionally inside an Apptainer image). The committed `jobs/*.sh`
are rendered by these functions, and a test fails when they drift.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from zoobot_hpc.errors import InputError
from zoobot_hpc.hardware import (
    CHRUN_OPTIONS,
    REQUEUE_SETUP,
    REQUEUE_TEARDOWN,
    SRUN_RANK_OPTIONS,
    HardwareSpec,
)

# Variables of the parent job that must not reach a job submitted from inside it: srun in the child
# would read e.g. SLURM_NTASKS / SLURM_CPUS_PER_TASK of the parent and launch the wrong step.
KEEP_SLURM_VARIABLES = ("SLURM_CONF",)

# Diagnostics every job gets; each may be overridden from the submitting shell or the config's env.
DIAGNOSTICS = {
    "PYTHONFAULTHANDLER": "1",  # a Python traceback on SIGSEGV/SIGABRT/timeout kills
    "PYTHONUNBUFFERED": "1",  # log lines appear in the job log when they are printed
    "NCCL_DEBUG": "WARN",  # INFO shows the rings/transport NCCL picked (noisy)
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed collective raises instead of hanging
}


class SubmitError(InputError):
    """Submitting a job failed; the message carries Slurm's answer."""


# How every rank starts Python: in the image (one container per rank, started by srun; SLURM_*
# variables pass through to Lightning), or the environment this job was submitted from.
# ${a[@]+"${a[@]}"} expands a possibly empty array: bash < 4.4 (RHEL 7) calls "${a[@]}" unbound under -u.
PYTHON_SETUP = r"""IMAGE=${ZOOBOT_IMAGE:-"@CONTAINER@"}
RUNTIME=${ZOOBOT_RUNTIME:-@RUNTIME@}
binds=()
if [ -z "$IMAGE" ]; then
  python=("${ZOOBOT_PYTHON:-python3}")
elif [ "$RUNTIME" = apptainer ]; then
  if [ -n "${ZOOBOT_BIND:-}" ]; then binds=(--bind "$ZOOBOT_BIND"); fi
  python=(apptainer exec@NV@ ${binds[@]+"${binds[@]}"} "$IMAGE" python3)
elif [ "$RUNTIME" = charliecloud ]; then  # an image directory; for GPUs run `ch-fromhost --nvidia` on it once
  IFS=, read -r -a paths <<<"${ZOOBOT_BIND:-}"
  for path in ${paths[@]+"${paths[@]}"}; do binds+=(-b "$path"); done
  export USER=${USER:-$(id -un)}  # ch-run requires it
  python=(ch-run @CHRUN_OPTIONS@ ${binds[@]+"${binds[@]}"} "$IMAGE" -- python3)
else
  echo "zoobot job: ZOOBOT_RUNTIME=$RUNTIME: use apptainer or charliecloud" >&2
  exit 2
fi
""".replace("@CHRUN_OPTIONS@", CHRUN_OPTIONS)


SHELL_CODE_PLACEHOLDERS = ("SBATCH", "ENV", "FIND_SPEC", "REQUEUE_SETUP", "REQUEUE_TEARDOWN")  # not values


def _fill(template: str, **values: str) -> str:
    template = template.replace("@PYTHON_SETUP@", PYTHON_SETUP)
    template = template.replace("@SRUN_RANK_OPTIONS@", " ".join(SRUN_RANK_OPTIONS))
    for key, value in values.items():
        if key not in SHELL_CODE_PLACEHOLDERS and re.search(r'["$`\\\n]', value):
            raise InputError(
                f"{value!r} cannot go into a job script: remove quotes, $, backticks, backslashes"
            )
        template = template.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", template)
    if left:
        raise AssertionError(f"unfilled template placeholders: {left}")
    return template


def _sbatch_block(lines: list[str]) -> str:
    return "\n".join(f"#SBATCH {line}" for line in lines)


def _env_block(env: Mapping[str, object]) -> str:
    """`export` lines: diagnostics as defaults the submitting shell may override, then the config's env."""
    env = dict(env or {})
    out = [f'export {key}="${{{key}:-{value}}}"' for key, value in DIAGNOSTICS.items() if key not in env]
    for key, value in env.items():
        if not str(key).isidentifier():
            raise InputError(f"slurm.env key {key!r} is not a valid environment variable name")
        out.append(f"export {key}={shlex.quote(str(value))}")
    return "\n".join(out)


# The variables by which the train script's environment overrides its config.
RUN_OVERRIDES = ("ZOOBOT_CONFIG", "ZOOBOT_CATALOG", "ZOOBOT_SAVE_DIR", "ZOOBOT_SET")

TRAIN_TEMPLATE = r"""#!/bin/bash
# @TITLE@
#
# Rendered from its config by the command below; edit the config and re-render rather than
# editing this file (a test checks that the committed copy matches):
#   @COMMAND@
#
# Usage, from the directory the paths below are relative to (the repository root):
#   sbatch @SCRIPT_NAME@
# Environment (all optional; defaults in brackets):
#   ZOOBOT_CONFIG    run config, keys = train() arguments [@CONFIG@]
#   ZOOBOT_CATALOG   catalog CSV/Parquet, replaces `catalog` in the config [from the config]
#   ZOOBOT_SAVE_DIR  output folder, replaces `save_dir`; a rerun there resumes [from the config]
#   ZOOBOT_SET       more overrides, space-separated key=value, e.g. "epochs=10 batch_size=128"
#   ZOOBOT_IMAGE     container image: every rank runs in `apptainer exec@NV@ IMAGE` [@CONTAINER_DOC@]
#   ZOOBOT_RUNTIME   apptainer (a .sif) or charliecloud (an image directory, ch-run) [@RUNTIME@]
#   ZOOBOT_BIND      extra paths to bind into the container, e.g. /data,/scratch [none]
#   ZOOBOT_PYTHON    Python outside a container [python3, i.e. the environment you submit from]
#   MASTER_PORT      DDP rendezvous port [derived from the job id]
# Requeue: Slurm sends SIGUSR1 before the time limit; every rank saves last.ckpt at the same step and
# this script requeues the job, which resumes from save_dir/checkpoints/last.ckpt. Logs append to one file.
@SBATCH@
set -euo pipefail

CONFIG=${ZOOBOT_CONFIG:-"@CONFIG@"}
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

@PYTHON_SETUP@
@ENV@
# Rank 0's node hosts the DDP rendezvous; ranks and world size come from srun (SLURM_PROCID/NTASKS).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
echo "zoobot job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
  "$SLURM_JOB_NUM_NODES node(s) x ${SLURM_NTASKS_PER_NODE:-?} task(s), rendezvous $MASTER_ADDR:$MASTER_PORT"

# Seconds, before any rank starts: the package, config keys, catalog files, this allocation vs the spec.
if ! "${python[@]}" -c "@FIND_SPEC@" 2>/dev/null; then
  echo "zoobot job: '${python[*]}' lacks zoobot_hpc or its dependencies; activate its environment before" \
    "sbatch, or set ZOOBOT_PYTHON=/path/to/python or ZOOBOT_IMAGE=image.sif" >&2
  exit 2
fi
"${python[@]}" -m zoobot_hpc preflight --in-job "${args[@]}"

# After the requeue signal every rank saves last.ckpt and rank 0 (on this node) leaves the flag file;
# the requeue runs here, on the host: the ranks may be in a container, without a Slurm client.
@REQUEUE_SETUP@
status=0
srun @SRUN_RANK_OPTIONS@ --cpus-per-task="$SLURM_CPUS_PER_TASK" \
  "${python[@]}" -m zoobot_hpc train "${args[@]}" || status=$?
@REQUEUE_TEARDOWN@
exit "$status"
"""


# the packages a rank needs, found without importing them (a torch import takes seconds)
_FIND_SPEC = (
    "import importlib.util as u, sys; "
    "sys.exit(any(u.find_spec(m) is None for m in ('zoobot_hpc', 'torch', 'pytorch_lightning', 'pandas')))"
)


def render_train_script(
    config_path: str | Path,
    spec: HardwareSpec,
    env: Mapping[str, object] | None = None,
    job_name: str | None = None,
    log_dir: str = "logs",
    script_name: str | None = None,
) -> str:
    """The sbatch script that trains from `config_path` with `spec`'s resources.

    `config_path` is written as given (relative paths are relative to where sbatch is run);
    `log_dir` must exist when the job starts (`zoobot-hpc submit` creates it).
    """
    config_path = str(config_path)
    job_name = job_name or Path(config_path).stem
    command = f"zoobot-hpc render --config {config_path}"
    if job_name != Path(config_path).stem:
        command += f" --job-name {job_name}"
    if log_dir != "logs":
        command += f" --log-dir {log_dir}"
    if script_name:
        command += f" --script-name {script_name}"
    gpu = spec.resolved_accelerator == "gpu"
    return _fill(
        TRAIN_TEMPLATE,
        TITLE=f"Train a Galaxy Zoo model ({job_name}): {_describe(spec)}.",
        COMMAND=command,
        SCRIPT_NAME=script_name or f"{job_name}.sh",
        CONFIG=config_path,
        NV=" --nv" if gpu else "",
        CONTAINER=spec.container or "",
        CONTAINER_DOC=spec.container or "none",
        RUNTIME=spec.container_runtime,
        SBATCH=_sbatch_block(spec.sbatch_directives(job_name=job_name, log_dir=log_dir)),
        ENV=_env_block(env or {}),
        FIND_SPEC=_FIND_SPEC,
        REQUEUE_SETUP="\n".join(REQUEUE_SETUP),
        REQUEUE_TEARDOWN="\n".join(REQUEUE_TEARDOWN),
    )


PREDICT_TEMPLATE = r"""#!/bin/bash
# @TITLE@
#
# Rendered by:
#   @COMMAND@
# Run with bash (not sbatch), from the repository root:
#   ZOOBOT_CHECKPOINT=path/to/best.ckpt ZOOBOT_IMAGES=catalog.parquet bash @SCRIPT_NAME@
# It submits itself as a job array of ZOOBOT_SHARDS tasks (one catalog shard each, writing
# part-KKKKK-of-N.parquet into ZOOBOT_PREDICTIONS) and a merge job that runs only if every shard
# succeeded (--dependency=afterok), writing ZOOBOT_OUTPUT. A failed shard is rerun alone with
#   sbatch --array=K @SCRIPT_NAME@   (same environment; the submission prints the exact command),
# then the merge command it prints.
# Environment (defaults in brackets):
#   ZOOBOT_CHECKPOINT   trained checkpoint [@CHECKPOINT@]
#   ZOOBOT_IMAGES       catalog (id_str, file_loc) or folder of images [@IMAGES@]
#   ZOOBOT_PREDICTIONS  folder for the shard files [@SAVE_PATH@]
#   ZOOBOT_OUTPUT       merged prediction file [@OUTPUT@]
#   ZOOBOT_SHARDS       number of shards = array tasks [@SHARDS@]
#   ZOOBOT_N_SAMPLES    MC-dropout forward passes per galaxy [@N_SAMPLES@]
#   ZOOBOT_GPUS         GPUs each shard asks for and uses, 0 = CPU [@GPUS@]
#   ZOOBOT_NUM_WORKERS  image-decoding processes per shard [@NUM_WORKERS@]
#   ZOOBOT_IMAGE        container image for every task [@CONTAINER_DOC@]
#   ZOOBOT_RUNTIME, ZOOBOT_BIND, ZOOBOT_PYTHON   as in the training script [@RUNTIME@]
@SBATCH@
set -euo pipefail

CHECKPOINT=${ZOOBOT_CHECKPOINT:-"@CHECKPOINT@"}
IMAGES=${ZOOBOT_IMAGES:-"@IMAGES@"}
PREDICTIONS=${ZOOBOT_PREDICTIONS:-"@SAVE_PATH@"}
OUTPUT=${ZOOBOT_OUTPUT:-"@OUTPUT@"}
SHARDS=${ZOOBOT_SHARDS:-@SHARDS@}
N_SAMPLES=${ZOOBOT_N_SAMPLES:-@N_SAMPLES@}
GPUS=${ZOOBOT_GPUS:-@GPUS@}
NUM_WORKERS=${ZOOBOT_NUM_WORKERS:-@NUM_WORKERS@}
@PYTHON_SETUP@@ENV@

if [ -z "${SLURM_JOB_ID:-}" ]; then
  # Not in a job: check the inputs, then submit the array and the merge that waits for it.
  for f in "$CHECKPOINT" "$IMAGES"; do
    if [ ! -e "$f" ]; then
      echo "predict: $f does not exist; set ZOOBOT_CHECKPOINT / ZOOBOT_IMAGES" >&2
      exit 2
    fi
  done
  mkdir -p "$PREDICTIONS" @LOG_DIR@
  export ZOOBOT_CHECKPOINT=$CHECKPOINT ZOOBOT_IMAGES=$IMAGES ZOOBOT_PREDICTIONS=$PREDICTIONS \
    ZOOBOT_OUTPUT=$OUTPUT ZOOBOT_SHARDS=$SHARDS ZOOBOT_N_SAMPLES=$N_SAMPLES ZOOBOT_GPUS=$GPUS \
    ZOOBOT_NUM_WORKERS=$NUM_WORKERS
  submit=(sbatch)
  if [ "$GPUS" != "@GPUS@" ]; then submit+=(--gpus-per-node="$GPUS"); fi  # replaces the #SBATCH line
  array_id=$("${submit[@]}" --parsable --array="0-$((SHARDS - 1))" "$0")
  array_id=${array_id%%;*}
  merge=("${python[@]}" -m zoobot_hpc merge "$PREDICTIONS" "$OUTPUT" --images "$IMAGES")
  merge_id=$(sbatch --parsable --job-name=@JOB_NAME@-merge --dependency="afterok:$array_id" \
    --kill-on-invalid-dep=yes --nodes=1 --ntasks=1 --cpus-per-task=1 --time=@MERGE_TIME@ \
    --output=@LOG_DIR@/%x-%j.out@MERGE_SBATCH@ --wrap="$(printf '%q ' "${merge[@]}")")
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

srun @SRUN_RANK_OPTIONS@ --ntasks=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \
  "${python[@]}" -m zoobot_hpc predict "$CHECKPOINT" "$IMAGES" "$PREDICTIONS" --no-progress \
  --n-samples "$N_SAMPLES" --gpus "$GPUS" --num-workers "$NUM_WORKERS" \
  --num-shards "$SHARDS" --shard-index "$SLURM_ARRAY_TASK_ID"
"""


def render_predict_array(
    spec: HardwareSpec,
    checkpoint: str = "outputs/train_dr5/checkpoints/best.ckpt",
    images: str = "data/predict/catalog.parquet",
    save_path: str = "outputs/predictions/parts",
    output: str = "outputs/predictions/predictions.parquet",
    num_shards: int = 4,
    n_samples: int = 5,
    job_name: str = "predict",
    log_dir: str = "logs",
    env: Mapping[str, object] | None = None,
    script_name: str | None = None,
) -> str:
    """A self-submitting prediction job array (one shard per task) plus its `afterok` merge job.

    One task per shard on one node: prediction shards are independent, so the array replaces DDP.
    """
    if spec.nodes != 1:
        raise InputError(f"prediction shards run on one node each; got nodes={spec.nodes}. Use more shards")
    if num_shards < 1:
        raise InputError(f"num_shards={num_shards}: must be at least 1")
    sbatch = [
        f"--output={log_dir}/%x-%A_%a.out" if line.startswith("--output=") else line
        for line in spec.sbatch_directives(job_name=job_name, log_dir=log_dir)
        if not line.startswith(("--ntasks-per-node=", "--signal="))  # a shard has no mid-way state to save
    ]
    sbatch.insert(2, "--ntasks=1")
    merge_extra = "".join(
        f" {line}" for line in spec.sbatch_directives() if line.split("=")[0] in _MERGE_KEEP
    )
    gpu = spec.resolved_accelerator == "gpu"
    return _fill(
        PREDICT_TEMPLATE,
        TITLE=f"Predict with a trained model as a Slurm job array ({job_name}), then merge the shards.",
        COMMAND=f"zoobot-hpc render-predict --gpus {spec.gpus} --job-name {job_name} --log-dir {log_dir}"
        + (f" --script-name {script_name}" if script_name else ""),
        SCRIPT_NAME=script_name or f"{job_name}.sh",
        SBATCH=_sbatch_block(sbatch),
        CHECKPOINT=checkpoint,
        IMAGES=images,
        SAVE_PATH=save_path,
        OUTPUT=output,
        SHARDS=str(num_shards),
        N_SAMPLES=str(n_samples),
        NV=" --nv" if gpu else "",
        CONTAINER=spec.container or "",
        CONTAINER_DOC=spec.container or "none",
        RUNTIME=spec.container_runtime,
        ENV=_env_block(env or {}),
        LOG_DIR=log_dir,
        JOB_NAME=job_name,
        MERGE_TIME="30:00",
        MERGE_SBATCH=merge_extra,
        GPUS=str(spec.gpus if gpu else 0),
        NUM_WORKERS=str(spec.num_workers),
    )


_MERGE_KEEP = ("--partition", "--account", "--qos")


def _describe(spec: HardwareSpec) -> str:
    device = "GPU" if spec.resolved_accelerator == "gpu" else "CPU rank"
    workers = f"{spec.num_workers} loader workers per rank"
    return f"{spec.nodes} node(s) x {spec.ranks_per_node} {device}(s), {workers}"


# ---------------------------------------------------------------------- submission
def clean_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without the SLURM_* variables of an enclosing job."""
    env = dict(os.environ if environ is None else environ)
    for key in list(env):
        if key.startswith(("SLURM_", "SRUN_")) and key not in KEEP_SLURM_VARIABLES:
            del env[key]
    return env


@contextmanager
def outside_job() -> Iterator[None]:
    """Temporarily drop the enclosing job's SLURM_* variables from `os.environ` (for submitit)."""
    saved = {k: v for k, v in os.environ.items() if k not in clean_environment()}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def sbatch(script: str | Path, *args: str, env: Mapping[str, str] | None = None, pinned: bool = False) -> str:
    """Submit a script with sbatch from a clean environment; returns the job id.

    `pinned`: the script's config is final, so the submitting shell's run overrides (`ZOOBOT_CONFIG`,
    `ZOOBOT_SET`, ...), perhaps left exported from another run, must not reach it.
    """
    full_env = {**clean_environment(), **dict(env or {})}
    if pinned:
        full_env = {key: value for key, value in full_env.items() if key not in RUN_OVERRIDES}
    try:
        result = subprocess.run(
            ["sbatch", "--parsable", *args, str(script)],
            env=full_env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    except FileNotFoundError as err:
        raise SubmitError("sbatch is not on PATH: submit from a Slurm login node") from err
    if result.returncode != 0:
        raise SubmitError(f"sbatch {script} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def node_cpus(partition: str | None = None) -> int | None:
    """CPUs of the smallest node in `partition`, or in the default partition, where a job without
    `--partition` runs (None when sinfo is unavailable)."""
    cmd = ["sinfo", "-h", "-o", "%P %c"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, timeout=30, env=clean_environment()
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return smallest_node(out, default_only=partition is None)


def smallest_node(sinfo_partition_cpus: str, default_only: bool) -> int | None:
    """The smallest CPU count in `sinfo -o "%P %c"` lines (sinfo marks the default partition `name*`)."""
    counts = []
    for line in sinfo_partition_cpus.splitlines():
        name, _, cpus = line.strip().partition(" ")
        if cpus.rstrip("+").isdigit() and (name.endswith("*") or not default_only):
            counts.append(int(cpus.rstrip("+")))
    return min(counts) if counts else None
