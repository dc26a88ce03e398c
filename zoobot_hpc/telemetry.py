"""Throughput telemetry users can act on: images/s per rank, the share of time spent waiting for data,
and a warning that names the cause and the cure when training is loader-bound.

The wait is the time from the end of one training step to the start of the next: fetching the
batch from the DataLoader workers, moving it to the device and augmenting it there (milliseconds on
a GPU). On a GPU node a large share means the GPU idles while the CPUs decode images, the most
common way Zoobot-style training wastes GPU hours.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl

log = logging.getLogger(__name__)

LOADER_BOUND_FRACTION = 0.3  # above this share of step time spent waiting, the loader is the bottleneck
WARMUP_STEPS = 3  # the first steps of an epoch wait for the workers to start: not the steady state


class ThroughputMonitor(pl.Callback):
    """Logs `perf/images_per_s` (per rank, mean over ranks) and `perf/data_wait_fraction` (worst rank)."""

    def __init__(self, num_workers: int, file_locs: Sequence[str], grey_from_rgb: bool = False) -> None:
        self.num_workers = num_workers
        self.grey_from_rgb = grey_from_rgb  # grey="mean": every image is decoded in colour first
        self.png_share = float(np.mean([Path(str(f)).suffix.lower() == ".png" for f in file_locs[:1000]]))
        self.waits: list[float] = []
        self.steps: list[float] = []
        self.images = 0
        self.step_end: float | None = None
        self.step_start = 0.0
        self.warned = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.waits, self.steps, self.images, self.step_end = [], [], 0, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.step_start = time.perf_counter()
        if self.step_end is not None and batch_idx >= WARMUP_STEPS:
            self.waits.append(self.step_start - self.step_end)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.step_end = time.perf_counter()
        if batch_idx < WARMUP_STEPS:
            return
        self.steps.append(self.step_end - self.step_start)
        self.images += len(batch["votes"])
        if len(self.steps) % trainer.log_every_n_steps == 0:
            self._log(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not self.steps or not self.waits:
            return
        fraction = self._log(pl_module)
        if fraction > LOADER_BOUND_FRACTION and not self.warned and trainer.is_global_zero:
            self.warned = True
            log.warning(self.advice(fraction))

    def _rates(self) -> tuple[float, float]:
        wait, busy = sum(self.waits), sum(self.steps)
        return self.images / max(wait + busy, 1e-9), wait / max(wait + busy, 1e-9)

    def _log(self, pl_module: Any) -> float:
        images_per_s, fraction = self._rates()
        pl_module.log("perf/images_per_s", images_per_s, sync_dist=True, batch_size=1)
        pl_module.log("perf/data_wait_fraction", fraction, sync_dist=True, reduce_fx="max", batch_size=1)
        return fraction

    def advice(self, fraction: float) -> str:
        """What to change, most effective first."""
        images_per_s, _ = self._rates()
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        cures = []
        if self.num_workers < cpus:
            cures.append(f"raise num_workers (now {self.num_workers}; this rank sees {cpus} CPUs)")
        if self.png_share > 0.5:
            cures.append("store the images as JPEG: PNG decodes several times slower")
        if self.grey_from_rgb:
            cures.append(
                "train with grey='luma' (the JPEG's own grey channel: about 1.7x the images/s per "
                "worker of grey='mean'; start a new run, the checkpoint records it)"
            )
        cures.append("store the images at about resize_size (decoding 424 px to train at 224 px is wasted)")
        cures.append("copy the images to node-local disk if they are on a network filesystem")
        return (
            f"training is loader-bound: {fraction:.0%} of each step is spent waiting for images "
            f"({images_per_s:.0f} images/s on this rank). To fix: " + "; ".join(cures)
        )
