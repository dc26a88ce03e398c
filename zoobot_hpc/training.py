"""`train()`: the training recipe, readable top to bottom.

1. check every argument, the schema and the catalogs (seconds, before any model exists);
2. record the resolved configuration and the splits in `save_dir`;
3. build the data module, the model and a Trainer from the one `HardwareSpec`;
4. fit with early stopping, resuming from `save_dir/checkpoints/last.ckpt` when it exists;
5. test the best checkpoint and return it.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from zoobot_hpc import __version__
from zoobot_hpc.atomic import AtomicCheckpointIO, atomic_path, write_text
from zoobot_hpc.augment import check_bounds
from zoobot_hpc.bad_images import BadImagePolicy, check_policy
from zoobot_hpc.catalog import CatalogLike, Splits, load_splits
from zoobot_hpc.checkpoint import check_resumable
from zoobot_hpc.config import check_argument_types, dump_yaml, python_arguments
from zoobot_hpc.data import (
    DEFAULT_GREY,
    GREY_MODES,
    GalaxyDataModule,
    LoaderSettings,
    loader_errors_explained,
)
from zoobot_hpc.errors import InputError, check_whole
from zoobot_hpc.galaxy_model import GalaxyZooModel
from zoobot_hpc.hardware import HardwareSpec
from zoobot_hpc.interruptions import EarlyStoppingThatResumes, StopOnSignal, sigterm_is_an_interruption
from zoobot_hpc.models import ENCODERS, ModelError
from zoobot_hpc.report import report_after_training
from zoobot_hpc.schema import Schema, load_schema
from zoobot_hpc.telemetry import HangReport, ThroughputMonitor

log = logging.getLogger(__name__)
# the model, not the data module, owns the transforms (checkpoints must carry them): that is intended
warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule`.*")

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.yaml"
SPLITS_DIR = "splits"
TRAINER_SETTINGS_FROM_ARGUMENTS = {  # pl.Trainer arguments train() sets: the train() argument to use
    "default_root_dir": "save_dir",
    "max_epochs": "epochs",
    "logger": "logger",
    "accelerator": "accelerator",
    "devices": "gpus",
    "num_nodes": "nodes",
    "precision": "mixed_precision",
}
TRAINER_SETTINGS_MANAGED = {  # ... and those that no argument sets: how train() chooses them
    "callbacks": "checkpoints, early stopping (patience), on_bad_image, signals and throughput",
    "plugins": "the cluster environment and atomic checkpoint writes",
    "strategy": "DDP when nodes x gpus > 1",
    "log_every_n_steps": "from the batches per epoch, at most 50",
}


class SaveDirError(InputError):
    """`save_dir` cannot be used."""


@python_arguments  # numpy values (np.int64 batch sizes, array bounds) as the Python ones they hold
def train(
    save_dir: str | Path,
    schema: str | Path | Schema,
    catalog: CatalogLike | None = None,
    train_catalog: CatalogLike | None = None,
    val_catalog: CatalogLike | None = None,
    test_catalog: CatalogLike | None = None,
    model_architecture: str = "efficientnet",
    batch_size: int = 256,
    epochs: int = 1000,
    patience: int = 8,
    color: bool = False,
    resize_size: int = 224,
    crop_scale_bounds: Sequence[float] = (0.7, 0.8),
    crop_ratio_bounds: Sequence[float] = (0.9, 1.1),
    nodes: int = 1,
    gpus: int = 2,
    num_workers: int = 4,
    prefetch_factor: int = 4,
    mixed_precision: bool = False,
    random_state: int = 42,
    wandb_logger: Logger | None = None,
    *,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    dropout_rate: float = 0.2,
    split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
    accelerator: str = "auto",
    resume: bool | str = "auto",
    channels_last: bool | str = "auto",
    grey: str = DEFAULT_GREY,
    on_bad_image: str = "error",
    on_nonfinite_loss: str = "error",
    loader_timeout: float = 600.0,
    hang_report_after: float = 900.0,
    logger: Logger | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> tuple[GalaxyZooModel, pl.Trainer]:
    """Train a Galaxy Zoo model from scratch and return `(best_model, trainer)`.

    Give either `catalog` (split into train/val/test by `split_fractions` and `random_state`) or
    all three of `train_catalog`, `val_catalog`, `test_catalog` (paths to CSV/Parquet, or
    DataFrames). `gpus` is the number of GPUs per node; `gpus=0` trains on one CPU process.
    `resume='auto'` continues from `save_dir/checkpoints/last.ckpt` if it exists (what a requeued
    job needs); `True` requires it, `False` starts afresh, a path resumes from that checkpoint.
    `logger` replaces the default TensorBoard logger; `wandb_logger` is used in addition to the CSV log.
    `trainer_kwargs` passes further settings to `pl.Trainer` (e.g. `limit_train_batches`); those
    train() sets itself (`max_epochs`, `callbacks`, ...) are refused, naming the argument to use.
    `on_bad_image='skip'` trains without unreadable images (listed in `skipped_images.txt`) instead
    of stopping at the first; `on_nonfinite_loss='skip'` skips (and counts) a step whose loss is
    NaN/inf instead of stopping. `loader_timeout` (s) stops a run whose image reads hang;
    after `hang_report_after` (s) without a finished batch, every rank writes its Python stacks to
    its log (0: never), to show where a hung run is stuck.
    `channels_last='auto'` picks the encoder's memory format for the hardware
    (`HardwareSpec.channels_last`); `True`/`False` force it.
    `grey` is how images become grey with `color=False`: `'luma'`, the JPEG's own luma channel
    (fastest), or `'mean'`, Zoobot's mean of R, G and B (see `zoobot_hpc.data.GREY_MODES`).
    """
    arguments = dict(locals())  # before any other local: exactly what the caller asked for

    # 1. checks that cost seconds
    check_argument_types(arguments)  # a quoted YAML value is a string: `color: "no"` would be true
    _check_trainer_kwargs(trainer_kwargs or {})
    check_policy("on_bad_image", on_bad_image)
    check_policy("on_nonfinite_loss", on_nonfinite_loss)
    if grey not in GREY_MODES:
        raise InputError(f"grey={grey!r}: use one of {', '.join(GREY_MODES)}")
    if model_architecture not in ENCODERS:
        raise ModelError(
            f"model_architecture={model_architecture!r} is unknown; use one of {', '.join(ENCODERS)}"
        )
    check_bounds(resize_size, crop_scale_bounds, crop_ratio_bounds)
    check_whole(1, batch_size=batch_size, epochs=epochs, prefetch_factor=prefetch_factor)
    check_whole(0, patience=patience, random_state=random_state)
    hardware = HardwareSpec(
        nodes=nodes,
        gpus=gpus,
        num_workers=num_workers,
        mixed_precision=mixed_precision,
        accelerator=accelerator,
    )
    hardware.check_launch()  # in a Slurm job: refuse a launch or allocation that cannot work, before
    hardware.check_job()  # any catalog is read or model built (no-ops outside Slurm)
    hardware.check_machine()  # outside Slurm: the GPUs this machine shows, loader workers vs CPUs
    channels_last = hardware.channels_last(channels_last)
    schema = load_schema(schema)
    save_dir = _prepare_save_dir(save_dir)
    ckpt_path = resolve_resume(resume, save_dir)
    if ckpt_path is not None:
        check_resumable(ckpt_path, schema, model_architecture, channels=3 if color else 1, grey=grey)
    splits = load_splits(
        schema, catalog, train_catalog, val_catalog, test_catalog, split_fractions, random_state
    )
    splits.check_batches(batch_size, hardware.world_size)
    pl.seed_everything(random_state, workers=True, verbose=False)

    # 2. what this run is, on disk before anything long starts
    _record_run(save_dir, splits, arguments, schema)

    # 3. data, model, trainer
    datamodule = GalaxyDataModule(
        splits.train,
        splits.val,
        splits.test,
        schema.label_cols,
        color,
        LoaderSettings(
            batch_size,
            num_workers,
            prefetch_factor,
            pin_memory=hardware.resolved_accelerator == "gpu",
            timeout_s=loader_timeout,
        ),
        seed=random_state,
        grey=grey,
    )
    model = GalaxyZooModel(
        schema=schema.to_dict(),
        model_architecture=model_architecture,
        channels=3 if color else 1,
        resize_size=resize_size,
        crop_scale_bounds=tuple(crop_scale_bounds),
        crop_ratio_bounds=tuple(crop_ratio_bounds),
        dropout_rate=dropout_rate,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        channels_last=channels_last,
        on_nonfinite_loss=on_nonfinite_loss,
        package_version=__version__,
        grey=grey,
    )
    checkpointing = ModelCheckpoint(
        dirpath=save_dir / CHECKPOINT_DIR,
        filename="epoch={epoch}-val_loss={val_loss:.4f}",
        auto_insert_metric_name=False,
        monitor="val_loss",
        mode="min",
        save_top_k=3,
        save_last=True,
    )
    bad_images = BadImagePolicy(on_bad_image, save_dir)
    hardware_kwargs = hardware.trainer_kwargs()
    plugins = [*hardware_kwargs.pop("plugins"), AtomicCheckpointIO()]
    trainer = pl.Trainer(
        default_root_dir=save_dir,
        max_epochs=epochs,
        callbacks=[
            checkpointing,
            EarlyStoppingThatResumes(monitor="val_loss", mode="min", patience=patience),
            bad_images,
            StopOnSignal(save_dir / CHECKPOINT_DIR / LAST_CHECKPOINT, hardware.requeue_signal()),
            ThroughputMonitor(
                num_workers,
                splits.train["file_loc"].array,
                grey_from_rgb=not color and grey == "mean",
            ),
            HangReport(hang_report_after),
        ],
        logger=_loggers(save_dir, logger, wandb_logger),
        plugins=plugins,
        log_every_n_steps=min(50, max(1, len(splits.train) // max(1, batch_size * hardware.world_size))),
        **hardware_kwargs,
        **(trainer_kwargs or {}),
    )

    # 4. fit
    # (after training starts, StopOnSignal owns SIGTERM: it saves and raises Interrupted itself)
    with loader_errors_explained(datamodule.loader_settings), sigterm_is_an_interruption("before training"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    # 5. the best checkpoint, tested
    best_path = checkpointing.best_model_path or str(save_dir / CHECKPOINT_DIR / LAST_CHECKPOINT)
    test_metrics: dict[str, float] = {}
    if len(splits.test):
        with (
            loader_errors_explained(datamodule.loader_settings),
            sigterm_is_an_interruption("while testing the trained model"),
        ):
            results = trainer.test(model, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    faults = {"skipped_images": len(bad_images.all_skipped()), "skipped_nonfinite_steps": model.skipped_steps}
    _record_results(save_dir, trainer, checkpointing, best_path, test_metrics, faults)
    report_after_training(save_dir)
    best_model = GalaxyZooModel.load_from_checkpoint(best_path, map_location="cpu")
    return best_model, trainer


def _check_trainer_kwargs(trainer_kwargs: dict[str, Any]) -> None:
    """A Trainer setting that train() sets too would fail as a duplicate keyword, after the config
    and splits are written: refuse it now, saying where that setting lives."""
    for key in trainer_kwargs:
        if key in TRAINER_SETTINGS_FROM_ARGUMENTS:
            argument = TRAINER_SETTINGS_FROM_ARGUMENTS[key]
            raise InputError(
                f"trainer_kwargs[{key!r}]: train() sets it from its argument {argument!r}; "
                f"set {argument!r} instead (the same key in a config file)"
            )
        if key in TRAINER_SETTINGS_MANAGED:
            raise InputError(
                f"trainer_kwargs[{key!r}]: zoobot-hpc sets it ({TRAINER_SETTINGS_MANAGED[key]}); remove it"
            )


def _prepare_save_dir(save_dir: str | Path) -> Path:
    save_dir = Path(save_dir).expanduser().resolve()
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SaveDirError(
            f"save_dir {save_dir} is not writable ({err.strerror}); choose a folder you can write to"
        ) from err
    return save_dir


def resolve_resume(resume: bool | str, save_dir: Path) -> str | None:
    """The checkpoint `trainer.fit` should resume from, or None to start afresh."""
    last = save_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if resume in ("auto", True):
        if last.is_file():
            log.warning("resuming from %s (pass resume=False to start afresh)", last)
            return str(last)
        if resume is True:
            raise SaveDirError(f"resume=True but {last} does not exist; use resume='auto' or False")
        return None
    if resume is False or resume is None:
        return None
    path = Path(resume)
    if not path.is_file():
        raise SaveDirError(f"resume={resume!r}: no such checkpoint file")
    return str(path)


def _loggers(save_dir: Path, logger: Logger | None, wandb_logger: Logger | None) -> list[Logger]:
    """TensorBoard (or the given logger), wandb if given, and a CSV log that `report` reads."""
    main = logger or TensorBoardLogger(save_dir, name="tensorboard", version="", default_hp_metric=False)
    # one CSV version per (re)start: Lightning would delete the previous attempt's metrics.csv
    loggers = [main, CSVLogger(save_dir, name="csv")]
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    return loggers


NOT_IN_CONFIG = (
    "save_dir",
    "schema",
    "catalog",
    "train_catalog",
    "val_catalog",
    "test_catalog",
    "wandb_logger",
    "logger",
    "trainer_kwargs",
    "resume",
)


@rank_zero_only
def _record_run(save_dir: Path, splits: Splits, arguments: dict[str, Any], schema: Schema) -> None:
    """Write the splits and the resolved config; `zoobot-hpc train --config` reruns the same run from it."""
    for stale in (save_dir / CHECKPOINT_DIR).glob(".*.ckpt.*.tmp"):  # a killed attempt was writing these
        stale.unlink(missing_ok=True)
    split_files = {}
    for split in ("train", "val", "test"):
        target = save_dir / SPLITS_DIR / f"{split}.parquet"
        with atomic_path(target) as tmp:
            getattr(splits, split).to_parquet(tmp, index=False)
        split_files[f"{split}_catalog"] = str(target)
    settings = {k: v for k, v in arguments.items() if k not in NOT_IN_CONFIG}
    config = {
        "save_dir": str(save_dir),
        "schema": schema.to_dict(),
        **split_files,
        **settings,
        "resume": "auto",
    }
    write_text(save_dir / CONFIG_FILE, f"# resolved by zoobot-hpc {__version__}\n" + dump_yaml(config))


@rank_zero_only
def _record_results(
    save_dir: Path,
    trainer: pl.Trainer,
    checkpointing: ModelCheckpoint,
    best_path: str,
    test: dict[str, float],
    faults: dict[str, int],
) -> None:
    best_score = checkpointing.best_model_score
    results = {
        "best_checkpoint": best_path,
        "best_val_loss": None if best_score is None else float(best_score),
        "epochs_completed": int(trainer.current_epoch),
        "stopped_early": bool(trainer.should_stop and trainer.current_epoch < trainer.max_epochs),
        "test": test,
        **faults,
        "package_version": __version__,
    }
    write_text(save_dir / RESULTS_FILE, dump_yaml(results))


def read_metrics(save_dir: str | Path) -> pd.DataFrame:
    """Logged metrics of every attempt of a run (`csv/version_N/metrics.csv`), later attempts winning.

    A run killed mid-epoch logged steps that its resumption logs again: rows of an earlier attempt
    from the epoch the next attempt starts at onwards are dropped.
    """
    frames: list[pd.DataFrame] = []
    for path in sorted((Path(save_dir) / "csv").glob("version_*/metrics.csv"), key=_version_number):
        frame = _read_attempt(path)
        if frame is None:
            continue
        if frames and len(frame) and "epoch" in frame:
            first_epoch = frame["epoch"].min()
            frames = [f[f["epoch"] < first_epoch] for f in frames]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _read_attempt(path: Path) -> pd.DataFrame | None:
    """One attempt's metrics. An attempt killed while Lightning wrote them can leave the file empty
    or its last line cut short: the cut line is left out, and an empty file is no attempt."""
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return pd.read_csv(io.StringIO(complete)) if complete.strip() else None


def _version_number(path: Path) -> int:
    return int(path.parent.name.removeprefix("version_"))


def read_splits(save_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The train/val/test catalogs a run in `save_dir` used."""
    folder = Path(save_dir) / SPLITS_DIR
    return {split: pd.read_parquet(folder / f"{split}.parquet") for split in ("train", "val", "test")}
