"""Submit training and sharded prediction from Python with submitit, from the same `HardwareSpec`.

`executor='slurm'` submits to Slurm (one submitit task per rank, launched by srun, so Lightning's
`SLURMEnvironment` sees the job exactly as with `jobs/train_dr5.sh`); `'local'` runs on this
machine in a subprocess and `'debug'` in this process, both with Lightning's own launcher
starting the ranks. Requeue is `StopOnSignal`'s (see `zoobot_hpc.hardware`): the submitted function is
not submitit-Checkpointable, and submitit's USR2 is replaced by USR1, so a requeued job simply
reruns `train()` in the same `save_dir`, which resumes from `last.ckpt`.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zoobot_hpc.config import dump_yaml, hardware_spec, load_config, train_kwargs
from zoobot_hpc.errors import InputError
from zoobot_hpc.hardware import CHRUN_OPTIONS, HardwareSpec
from zoobot_hpc.slurm import DIAGNOSTICS, node_cpus, outside_job

EXECUTORS = ("slurm", "local", "debug")


def make_executor(
    spec: HardwareSpec,
    folder: str | Path,
    executor: str = "slurm",
    job_name: str = "zoobot",
    array_parallelism: int | None = None,
):
    """A `submitit.AutoExecutor` whose resources all come from `spec`."""
    import submitit

    if executor not in EXECUTORS:
        raise InputError(f"executor={executor!r}: use one of {', '.join(EXECUTORS)}")
    kwargs: dict[str, Any] = {}
    if spec.container:
        kwargs["slurm_python"] = container_python(spec)
    with outside_job():
        ex = submitit.AutoExecutor(folder=str(folder), cluster=executor, **kwargs)
    if executor == "slurm":
        params = spec.submitit_parameters()
        params["name"] = job_name
        if array_parallelism:
            params["slurm_array_parallelism"] = array_parallelism
    else:
        if spec.nodes > 1:
            raise InputError(f"executor={executor!r} runs on this machine: nodes={spec.nodes} needs 'slurm'")
        # one process; Lightning starts the other ranks itself
        params = {"timeout_min": spec.submitit_parameters()["timeout_min"], "name": job_name}
    ex.update_parameters(**params)
    return ex


def container_python(spec: HardwareSpec) -> str:
    """The command that starts Python in `spec.container` (as the job scripts do; see slurm.py)."""
    if spec.container_runtime == "charliecloud":
        return f"ch-run {CHRUN_OPTIONS} {spec.container} -- python3"
    nv = " --nv" if spec.resolved_accelerator == "gpu" else ""
    return f"apptainer exec{nv} {spec.container} python3"


def _run_training(config: dict[str, Any]) -> dict[str, Any]:
    """What a submitit job runs: train() in every rank; returns a small, picklable summary."""
    _job_environment((config.get("slurm") or {}).get("env") or {})
    from zoobot_hpc.interruptions import Interrupted
    from zoobot_hpc.training import train

    try:
        _, trainer = train(**train_kwargs(config))
    except Interrupted as stop:  # saved and requeued (or to resubmit): no result, so result() keeps waiting
        print(stop, file=sys.stderr, flush=True)
        raise SystemExit(1) from None  # submitit stores an error result for an Exception, not for this
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    return {
        "save_dir": str(config["save_dir"]),
        "best_checkpoint": best,
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "epochs_completed": int(trainer.current_epoch),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }


def _job_environment(env: Mapping[str, object]) -> None:
    """What the job scripts export (`slurm._env_block`): the diagnostics as defaults, `slurm.env` over
    anything. Python reads PYTHONFAULTHANDLER only when it starts, so the handler is enabled here."""
    for key, value in DIAGNOSTICS.items():
        os.environ.setdefault(key, value)
    os.environ.update({str(key): str(value) for key, value in env.items()})
    if os.environ.get("PYTHONFAULTHANDLER"):
        faulthandler.enable()


def train(
    config: str | Path | Mapping[str, Any],
    executor: str = "slurm",
    overrides: Iterable[str] = (),
    folder: str | Path | None = None,
):
    """Submit `train()` for a config (path or dict) and return the submitit job.

    `result(job)` waits and returns rank 0's summary (save_dir, best_checkpoint, world_size, ...).
    submitit's files (pickles, logs) go to `folder`, by default `save_dir/submitit`.
    """
    if isinstance(config, Mapping):
        loaded = load_config(None, [])
        loaded.update(config)
        config = loaded
    else:
        config = load_config(config, overrides)
    if "save_dir" not in config:
        raise InputError("the config has no save_dir: set it, e.g. --set save_dir=outputs/run1")
    config["save_dir"] = str(Path(config["save_dir"]).expanduser().resolve())
    spec = hardware_spec(config)
    spec.preflight(node_cpus=node_cpus(spec.partition) if executor == "slurm" else None)
    folder = Path(folder or Path(config["save_dir"]) / "submitit")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(dump_yaml(config))
    ex = make_executor(spec, folder, executor, job_name=Path(config["save_dir"]).name)
    with outside_job():
        return ex.submit(_run_training, dict(config))


def result(job) -> dict[str, Any]:
    """Wait for a training job and return rank 0's summary (a multi-rank job has one per rank)."""
    results = job.results()
    return results[0]


def _run_shard(
    checkpoint: str, images: str, save_path: str, shard_index: int, num_shards: int, options: dict[str, Any]
) -> str:
    """What one array task runs: predict one shard; returns the shard file's folder."""
    _job_environment({})
    from zoobot_hpc.prediction import predict

    predict(checkpoint, images, save_path, shard_index=shard_index, num_shards=num_shards, **options)
    return save_path


def predict(
    checkpoint: str | Path,
    images: str | Path,
    save_path: str | Path,
    num_shards: int,
    spec: HardwareSpec | None = None,
    executor: str = "slurm",
    output: str | Path | None = None,
    folder: str | Path | None = None,
    n_samples: int = 5,
    batch_size: int | None = None,
):
    """Predict `images` in `num_shards` shards as one submitit job array, then merge the parts.

    Returns the submitit jobs; with `output` it waits for them and writes the merged file there.
    """
    spec = spec or HardwareSpec(gpus=1, num_workers=4, time="4:00:00")
    if spec.nodes != 1 or spec.ranks_per_node != 1:
        raise InputError("each prediction shard runs as one task on one node: set nodes=1 and gpus<=1")
    spec.preflight()
    save_path = Path(save_path).expanduser().resolve()
    save_path.mkdir(parents=True, exist_ok=True)
    folder = Path(folder or save_path / "submitit")
    ex = make_executor(spec, folder, executor, job_name="predict", array_parallelism=num_shards)
    options: dict[str, Any] = {"n_samples": n_samples, "num_workers": spec.num_workers, "gpus": spec.gpus}
    if spec.resolved_accelerator != "gpu":
        options["gpus"] = 0
    if batch_size is not None:
        options["batch_size"] = batch_size
    shards = list(range(num_shards))
    with outside_job():
        jobs = ex.map_array(
            _run_shard,
            [str(Path(checkpoint).resolve())] * num_shards,
            [str(Path(images).resolve())] * num_shards,
            [str(save_path)] * num_shards,
            shards,
            [num_shards] * num_shards,
            [options] * num_shards,
        )
    if output is not None:
        from zoobot_hpc.prediction import merge_parts

        for job in jobs:
            job.result()
        merge_parts(save_path, output)
    return jobs
