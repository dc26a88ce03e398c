"""Telemetry users can act on: images/s per rank, the share of time spent waiting for data, a warning
that names the cause and the cure when training is loader-bound, and where a stuck rank is stuck.

The wait is the time from the end of one training step to the start of the next: fetching the
batch from the DataLoader workers, moving it to the device and augmenting it there (milliseconds on
a GPU). On a GPU node a large share means the GPU idles while the CPUs decode images, the most
common way Zoobot-style training wastes GPU hours.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

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


class HangReport(pl.Callback):
    """Writes every thread's Python stack to the rank's log (stderr) when no batch has finished for
    about `after_s` seconds (90-100% of it), and again every `after_s` while none does.

    A DDP run that hangs (a rank stuck in a collective the others never reach, a wedged file read)
    otherwise shows nothing until the process group's timeout kills it; with each rank's stacks in
    its log, the hang points at its cause. Python's faulthandler dumps from its own C thread, so it
    works even if the stuck thread holds the GIL. Re-arming starts a thread (~70 us), so a finished
    batch re-arms only once a tenth of `after_s` has passed since the last time.
    """

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self.armed_at: float | None = None

    def _arm(self, *args: Any) -> None:
        stream = _file_backed_stderr()
        if self.after_s > 0 and stream is not None:
            faulthandler.dump_traceback_later(self.after_s, repeat=True, file=stream)
            self.armed_at = time.monotonic()

    def _progress(self, *args: Any) -> None:
        if self.armed_at is not None and time.monotonic() - self.armed_at > self.after_s / 10:
            self._arm()

    def _disarm(self, *args: Any) -> None:
        if self.armed_at is not None:
            faulthandler.cancel_dump_traceback_later()
            self.armed_at = None

    on_fit_start = on_test_start = _arm
    on_train_batch_end = on_validation_batch_end = on_test_batch_end = _progress
    on_fit_end = on_test_end = on_exception = _disarm


def _file_backed_stderr() -> TextIO | None:
    """stderr, or else the process's own: faulthandler writes to a file descriptor, which a notebook's
    or a test runner's replacement `sys.stderr` does not have."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
            return stream
        except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is both of the last)
            continue
    return None
