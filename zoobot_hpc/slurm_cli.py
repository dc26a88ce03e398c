"""Slurm subcommands: render (a dry run), render-predict, submit, preflight."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from zoobot_hpc.config import dump_yaml, hardware_spec, load_config
from zoobot_hpc.errors import InputError

CATALOG_KEYS = ("catalog", "train_catalog", "val_catalog", "test_catalog")


class MissingInputError(InputError):
    """A file the run needs does not exist."""


def add_cli_parser(subparsers: argparse._SubParsersAction) -> None:
    render = subparsers.add_parser(
        "render", help="print the sbatch script for a config (a dry run; nothing is submitted)"
    )
    _config_arguments(render)
    render.add_argument("--job-name", help="Slurm job name (default: the config file's name)")
    render.add_argument("--log-dir", default="logs", help="folder of the job logs (default: %(default)s)")
    render.add_argument("--script-name", help="the script's path in its usage line (default: JOB_NAME.sh)")
    render.add_argument("-o", "--output", help="write the script to this file instead of stdout")
    render.set_defaults(func=run_render)

    predict = subparsers.add_parser(
        "render-predict", help="print a self-submitting prediction job array + merge script"
    )
    predict.add_argument("--checkpoint", default="outputs/train_dr5/checkpoints/best.ckpt")
    predict.add_argument("--images", default="data/predict/catalog.parquet")
    predict.add_argument("--save-path", default="outputs/predictions/parts", help="folder of the shards")
    predict.add_argument("--merged", default="outputs/predictions/predictions.parquet")
    predict.add_argument("--shards", type=int, default=4)
    predict.add_argument("--n-samples", type=int, default=5)
    predict.add_argument("--gpus", type=int, default=1, help="GPUs per shard task (0 = CPU)")
    predict.add_argument("--num-workers", type=int, default=4)
    predict.add_argument("--time", default="4:00:00")
    predict.add_argument("--mem", default=None)
    predict.add_argument("--partition", default=None)
    predict.add_argument("--account", default=None)
    predict.add_argument("--job-name", default="predict_array")
    predict.add_argument("--log-dir", default="logs")
    predict.add_argument("--script-name", help="the script's path in its usage line (default: JOB_NAME.sh)")
    predict.add_argument("-o", "--output", help="write the script to this file instead of stdout")
    predict.set_defaults(func=run_render_predict)

    submit = subparsers.add_parser("submit", help="submit training for a config to Slurm (or run it locally)")
    _config_arguments(submit)
    submit.add_argument(
        "--executor",
        choices=("sbatch", "slurm", "local", "debug"),
        default="slurm",
        help="sbatch: the rendered script; slurm: submitit on Slurm; local/debug: submitit on this "
        "machine (default: %(default)s)",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the result (submitit executors)")
    submit.set_defaults(func=run_submit)

    preflight = subparsers.add_parser(
        "preflight", help="check a config's hardware and input files (and, in a job, the allocation)"
    )
    _config_arguments(preflight)
    preflight.add_argument(
        "--in-job", action="store_true", help="also check the running Slurm job against the spec"
    )
    preflight.set_defaults(func=run_preflight)


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (keys = train() arguments)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key"
    )


def _write(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    print(f"wrote {path}", file=sys.stderr)


def run_render(args: argparse.Namespace) -> int:
    from zoobot_hpc.slurm import render_train_script

    config = load_config(args.config, args.overrides)
    spec = hardware_spec(config)
    spec.preflight()
    env = (config.get("slurm") or {}).get("env") or {}
    script = render_train_script(
        args.config,
        spec,
        env=env,
        job_name=args.job_name,
        log_dir=args.log_dir,
        script_name=args.script_name,
    )
    _write(script, args.output)
    return 0


def run_render_predict(args: argparse.Namespace) -> int:
    from zoobot_hpc.hardware import HardwareSpec
    from zoobot_hpc.slurm import render_predict_array

    spec = HardwareSpec(
        nodes=1,
        gpus=args.gpus,
        num_workers=args.num_workers,
        time=args.time,
        mem=args.mem,
        partition=args.partition,
        account=args.account,
    )
    spec.preflight()
    script = render_predict_array(
        spec,
        checkpoint=args.checkpoint,
        images=args.images,
        save_path=args.save_path,
        output=args.merged,
        num_shards=args.shards,
        n_samples=args.n_samples,
        job_name=args.job_name,
        log_dir=args.log_dir,
        script_name=args.script_name,
    )
    _write(script, args.output)
    return 0


def check_inputs(config: dict[str, Any], where: str) -> None:
    """Catalog files named in the config exist (relative paths: relative to the working directory)."""
    for key in CATALOG_KEYS:
        value = config.get(key)
        if isinstance(value, str) and not Path(value).expanduser().exists():
            env = " set ZOOBOT_CATALOG=/path/to/catalog.parquet," if key == "catalog" else ""
            raise MissingInputError(
                f"{key} {value!r} does not exist (working directory {Path.cwd()});{env} edit {key} in "
                f"{where}, or pass --set {key}=PATH"
            )


def run_preflight(args: argparse.Namespace) -> int:
    from zoobot_hpc.slurm import node_cpus

    config = load_config(args.config, args.overrides)
    spec = hardware_spec(config)
    check_inputs(config, args.config)
    if args.in_job:
        spec.preflight()
        spec.check_job(gpus_in_batch_shell=True)
    else:
        spec.preflight(node_cpus=node_cpus(spec.partition))
    print(
        f"preflight ok: {spec.nodes} node(s) x {spec.ranks_per_node} rank(s) on {spec.resolved_accelerator}, "
        f"world size {spec.world_size}, {spec.cpus_per_task} CPU(s) per rank",
        flush=True,
    )
    return 0


def run_submit(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    check_inputs(config, args.config)
    if "save_dir" not in config:
        raise InputError("the config has no save_dir: set it, e.g. --set save_dir=outputs/run1")
    if args.executor == "sbatch":
        return _submit_sbatch(config, args)
    from zoobot_hpc import launch

    job = launch.train(config, executor=args.executor)
    print(f"submitted {args.executor} job {job.job_id}; submitit files in {Path(job.paths.folder)}")
    if args.wait:
        print(json.dumps(launch.result(job), indent=2))
    return 0


def _submit_sbatch(config: dict[str, Any], args: argparse.Namespace) -> int:
    from zoobot_hpc.slurm import node_cpus, render_train_script, sbatch

    spec = hardware_spec(config)
    spec.preflight(node_cpus=node_cpus(spec.partition))
    save_dir = Path(config["save_dir"]).expanduser().resolve()
    save_dir.mkdir(parents=True, exist_ok=True)
    config_path = save_dir / "submitted-config.yaml"  # overrides baked in: the job reads exactly this
    config_path.write_text(dump_yaml(config))
    log_dir = save_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    env = (config.get("slurm") or {}).get("env") or {}
    name = args.job_name if getattr(args, "job_name", None) else Path(args.config).stem
    script = render_train_script(config_path, spec, env=env, job_name=name, log_dir=str(log_dir))
    script_path = save_dir / f"{name}.sh"
    script_path.write_text(script)
    job_id = sbatch(script_path, pinned=True)
    print(f"submitted job {job_id}: {script_path}; log {log_dir}/{name}-{job_id}.out")
    return 0
