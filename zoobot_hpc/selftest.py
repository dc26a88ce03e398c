"""`zoobot-hpc selftest`: is this environment (container, node, Slurm step) able to run zoobot-hpc?

It reports what a user debugging a cluster job needs first: package, Python, torch/CUDA/cuDNN versions,
the GPUs torch sees, CUDA_VISIBLE_DEVICES, the container runtime, the Slurm step, the size of
/dev/shm; it loads every built-in schema and checks the bundled demo data. Optionally:

* `--gpus N` fails with a clear message unless N GPUs are visible, and runs a small computation on each;
* `--train-step` runs one CPU training step (plus one validation and one test batch) of `train()` on
  the bundled demo into a temporary folder, then one prediction with the resulting checkpoint.

Apptainer's `%test` and the CI container stage run it inside the image. The exit status is 0 when
every check passed (warnings and skips allowed) and 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OK, WARN, SKIP, FAIL = "ok", "warn", "skip", "FAIL"
MIN_SHM_BYTES = 512 * 2**20  # below this, DataLoader workers die with "Bus error" on real batch sizes
SLURM_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_NTASKS",
    "SLURMD_NODENAME",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
)


@dataclass
class Check:
    name: str
    status: str
    detail: str
    data: dict[str, Any] | None = None


def add_cli_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "selftest",
        help="report torch/CUDA/GPU/Slurm/container facts and check that this environment works",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=0,
        metavar="N",
        help="fail unless at least N GPUs are visible, and use each of them once (default: 0)",
    )
    parser.add_argument(
        "--train-step",
        action="store_true",
        help="also run one CPU training step on the bundled demo and one prediction (~10-30 s)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_selftest)


def run_selftest(args: argparse.Namespace) -> int:
    if args.gpus < 0:
        from zoobot_hpc.errors import InputError

        raise InputError(f"--gpus {args.gpus}: must be 0 or more")
    checks = selftest(gpus=args.gpus, train_step=args.train_step, echo=not args.json)
    failed = [c for c in checks if c.status == FAIL]
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(f"selftest: {'FAILED: ' + ', '.join(c.name for c in failed) if failed else 'OK'}")
    return 1 if failed else 0


def selftest(gpus: int = 0, train_step: bool = False, echo: bool = True) -> list[Check]:
    """Run the checks in order and return them; with `echo`, print each line as it completes."""
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("package", check_package),
        ("torch", check_torch),
        ("container", check_container),
        ("slurm", check_slurm),
        ("gpus", lambda: check_gpus(gpus)),
        ("shm", check_shm),
        ("schemas", check_schemas),
        ("demo data", check_demo_data),
    ]
    checks: list[Check] = []
    for name, step in steps:
        checks.append(_guarded(name, step))
        if echo:
            _print(checks[-1])
    if train_step:
        with tempfile.TemporaryDirectory(prefix="zoobot-hpc-selftest-") as tmp:
            trained = _guarded("train step", lambda: check_train_step(Path(tmp)))
            checks.append(trained)
            if echo:
                _print(trained)
            checkpoint = (trained.data or {}).get("checkpoint")
            predicted = _guarded("prediction", lambda: check_prediction(Path(tmp), checkpoint))
            checks.append(predicted)
            if echo:
                _print(predicted)
    return checks


def _guarded(name: str, step: Callable[[], Check]) -> Check:
    """A check that raises is a failed check, reported with the exception, not a traceback."""
    try:
        return step()
    except Exception as err:  # every failure becomes one report line
        return Check(name, FAIL, f"{type(err).__name__}: {err}")


def _print(check: Check) -> None:
    print(f"  {check.status:4s}  {check.name:12s} {check.detail}", flush=True)


# -- environment ---------------------------------------------------------------------------------------


def check_package() -> Check:
    import zoobot_hpc

    where = Path(zoobot_hpc.__file__).parent
    detail = (
        f"zoobot-hpc {zoobot_hpc.__version__} ({where}); "
        f"Python {platform.python_version()} ({sys.executable})"
    )
    status = OK
    if not sys.flags.no_user_site and os.environ.get("PYTHONNOUSERSITE") != "1" and _in_container():
        status = WARN
        detail += "; PYTHONNOUSERSITE is not set, so ~/.local packages may shadow the image's"
    return Check("package", status, detail, {"version": zoobot_hpc.__version__, "path": str(where)})


def check_torch() -> Check:
    import torch
    import torchvision

    data = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        import pytorch_lightning

        data["pytorch_lightning"] = pytorch_lightning.__version__
    except ImportError:
        data["pytorch_lightning"] = None
    cuda = f"CUDA {data['cuda']}" if data["cuda"] else "CPU-only build"
    cudnn = f", cuDNN {data['cudnn']}" if data["cudnn"] else ""
    detail = (
        f"torch {data['torch']} ({cuda}{cudnn}), torchvision {data['torchvision']}, "
        f"pytorch-lightning {data['pytorch_lightning']}"
    )
    return Check("torch", OK, detail, data)


def _in_container() -> str | None:
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return "apptainer"
    if os.environ.get("CH_RUNNING"):
        return "charliecloud"
    if Path("/.dockerenv").exists():
        return "docker"
    if Path("/run/.containerenv").exists():
        return "podman"
    return None


def check_container() -> Check:
    runtime = _in_container()
    if runtime is None:
        return Check("container", OK, "none detected (running on the host)", {"runtime": None})
    image = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER") or ""
    return Check("container", OK, f"{runtime} {image}".rstrip(), {"runtime": runtime, "image": image})


def check_slurm() -> Check:
    env = {k: os.environ[k] for k in SLURM_VARIABLES if k in os.environ}
    if "SLURM_JOB_ID" not in env:
        return Check("slurm", OK, "not inside a Slurm job", env)
    if "SLURM_PROCID" not in env:
        return Check(
            "slurm",
            OK,
            f"job {env['SLURM_JOB_ID']}, batch script (not an srun task: Lightning will not use Slurm here)",
            env,
        )
    detail = (
        f"job {env['SLURM_JOB_ID']} step {env.get('SLURM_STEP_ID', '?')}: rank {env['SLURM_PROCID']} of "
        f"{env.get('SLURM_NTASKS', '?')} (local {env.get('SLURM_LOCALID', '?')}) "
        f"on {env.get('SLURMD_NODENAME', platform.node())}"
    )
    gpus = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS")
    if gpus:
        detail += f", Slurm GPUs {gpus}"
    return Check("slurm", OK, detail, env)


def _gpu_hint() -> str:
    runtime = _in_container()
    hints = {
        "docker": "start the container with `docker run --gpus all` (needs the NVIDIA container toolkit)",
        "podman": "start the container with `--device nvidia.com/gpu=all`",
        "apptainer": "run `apptainer exec --nv ...`",
        "charliecloud": "inject the driver with `ch-fromhost --nvidia IMAGE_DIR`",
    }
    hint = hints.get(runtime or "", "check `nvidia-smi` on this node")
    if "SLURM_JOB_ID" in os.environ:
        hint += "; and ask Slurm for them (--gpus-per-node=N or --gres=gpu:N)"
    return hint


def check_gpus(requested: int = 0) -> Check:
    import torch

    visible_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown_env = "unset" if visible_env is None else repr(visible_env)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    data = {"count": count, "names": names, "CUDA_VISIBLE_DEVICES": visible_env, "requested": requested}
    detail = f"{count} visible" + (f" ({', '.join(names)})" if names else "")
    detail += f"; CUDA_VISIBLE_DEVICES={shown_env}"
    if count == 0:
        reason = _no_cuda_reason()
        data["reason"] = reason
        detail += f"; {reason}"
    if requested > count:
        return Check(
            "gpus",
            FAIL,
            f"{requested} GPU(s) requested but only {count} visible ({detail}). To fix: {_gpu_hint()}; "
            "or train on CPU with gpus=0.",
            data,
        )
    if requested:
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
        for index in range(requested):
            x = torch.ones(256, 256, device=f"cuda:{index}")
            value = float((x @ x).sum().item())
            if value != 256.0**3:
                return Check("gpus", FAIL, f"GPU {index} computed a wrong result ({value})", data)
        detail += f"; a matrix product ran on each of the {requested} requested (NCCL {nccl})"
    return Check("gpus", OK, detail, data)


def _no_cuda_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as err:  # the driver's own words are the most useful detail
        return f"CUDA unavailable: {str(err).splitlines()[0]}"
    return "CUDA unavailable (no NVIDIA driver or device exposed)"


def check_shm() -> Check:
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return Check("shm", WARN, "/dev/shm is missing: DataLoader workers (num_workers > 0) will fail")
    size = stat.f_blocks * stat.f_frsize
    detail = f"/dev/shm {size / 2**20:.0f} MiB"
    if size < MIN_SHM_BYTES:
        return Check(
            "shm",
            WARN,
            f"{detail}: too small for DataLoader workers; use `docker run --shm-size=8g` "
            "(or --ipc=host), or num_workers=0",
            {"bytes": size},
        )
    return Check("shm", OK, detail, {"bytes": size})


# -- package data --------------------------------------------------------------------------------------


def check_schemas() -> Check:
    from zoobot_hpc.schema import builtin_schema_names, load_schema

    names = builtin_schema_names()
    if not names:
        return Check("schemas", FAIL, "no built-in schema files found in the installed package")
    sizes = {}
    for name in names:
        schema = load_schema(name)
        sizes[name] = [len(schema.questions), len(schema.label_cols)]
    listing = ", ".join(f"{n} {q}/{a}" for n, (q, a) in sizes.items())
    return Check("schemas", OK, f"{len(names)} built-in schemas load (questions/answers: {listing})", sizes)


def check_demo_data() -> Check:
    import pandas as pd

    from zoobot_hpc.demo import demo_catalog

    catalog_path = demo_catalog()
    if not catalog_path.is_file():
        return Check("demo data", FAIL, f"{catalog_path} is missing from the installed package")
    catalog = pd.read_csv(catalog_path)
    missing = [loc for loc in catalog["file_loc"] if not (catalog_path.parent / loc).is_file()]
    if missing:
        return Check(
            "demo data", FAIL, f"{len(missing)} of {len(catalog)} demo images are missing, e.g. {missing[0]}"
        )
    return Check("demo data", OK, f"{len(catalog)} galaxies, all images present ({catalog_path.parent})")


# -- one training step and one prediction -------------------------------------------------------------


def check_train_step(work: Path) -> Check:
    """One training batch, one validation and one test batch of `train()` on the demo, on CPU."""
    from zoobot_hpc import train
    from zoobot_hpc.demo import DEMO_SCHEMA, DEMO_SETTINGS, demo_catalog

    settings = {**DEMO_SETTINGS, "gpus": 0, "batch_size": 8, "num_workers": 1, "prefetch_factor": 2}
    start = time.perf_counter()
    _, trainer = train(
        work / "run",
        DEMO_SCHEMA,
        catalog=demo_catalog(),
        epochs=1,
        **settings,
        trainer_kwargs={
            "limit_train_batches": 1,
            "limit_val_batches": 1,
            "limit_test_batches": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    )
    elapsed = time.perf_counter() - start
    checkpoint = trainer.checkpoint_callback.best_model_path
    if not checkpoint or not Path(checkpoint).is_file():
        return Check("train step", FAIL, "training finished but wrote no checkpoint")
    steps = int(trainer.global_step)
    return Check(
        "train step",
        OK,
        f"{steps} CPU training step(s) of {settings['model_architecture']} on the demo in {elapsed:.1f} s "
        f"(num_workers={settings['num_workers']}), checkpoint {Path(checkpoint).name}",
        {"checkpoint": checkpoint, "seconds": elapsed, "steps": steps},
    )


def check_prediction(work: Path, checkpoint: str | None) -> Check:
    """Predict a few demo images with the checkpoint of the training step, through the CLI."""
    if not checkpoint:
        return Check("prediction", SKIP, "no checkpoint, because the training step did not run")
    import pandas as pd

    from zoobot_hpc.cli import main
    from zoobot_hpc.demo import demo_catalog

    catalog_path = demo_catalog()
    images = work / "images"
    images.mkdir()
    for loc in pd.read_csv(catalog_path)["file_loc"][:4]:
        shutil.copy(catalog_path.parent / loc, images / Path(loc).name)
    save_path = work / "predictions.csv"
    start = time.perf_counter()
    status = main(["predict", checkpoint, str(images), str(save_path), "--num-workers", "1", "--no-progress"])
    elapsed = time.perf_counter() - start
    if status != 0:
        return Check("prediction", FAIL, f"`zoobot-hpc predict` exited with status {status}")
    if not save_path.is_file():
        return Check("prediction", FAIL, f"`zoobot-hpc predict` wrote nothing at {save_path}")
    rows = len(pd.read_csv(save_path))
    if rows != 4:
        return Check("prediction", FAIL, f"`zoobot-hpc predict` wrote {rows} rows for 4 images")
    return Check(
        "prediction",
        OK,
        f"predicted 4 demo images with that checkpoint in {elapsed:.1f} s (zoobot-hpc predict, CPU)",
        {"seconds": elapsed},
    )
