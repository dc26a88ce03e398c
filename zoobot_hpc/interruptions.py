"""Stopping and resuming a long run without losing work, and resuming it exactly.

- SIGTERM (Slurm's time limit and `scancel`, preemption, `scontrol requeue`) makes Lightning stop
  after the current step; in a single-process run `CheckpointOnSigterm` then saves a full-state
  `last.ckpt`, so the rerun continues from that step rather than from the last epoch end. Under DDP
  the ranks see the signal at different points, and a collective save there can deadlock until
  SIGKILL, so DDP runs rely on the epoch-end `last.ckpt` and on USR1 before the time limit, which is
  Lightning's (`SLURMEnvironment(auto_requeue=True)`): it saves `hpc_ckpt_N.ckpt` and requeues.
- `newest_checkpoint` picks whichever of these is newest when the rerun starts.
- `seed_step` reseeds the random generators from (seed, step, rank) before every training batch
  (`GalaxyDataModule.on_before_batch_transfer`), so a resumed run draws the same augmentations and
  dropout masks at each step as one that never stopped (Lightning checkpoints do not carry RNG
  states); the shuffling sampler is seeded from (seed, epoch).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class CheckpointOnSigterm(pl.Callback):
    """Save a full-state checkpoint when a run is stopped by SIGTERM (every rank takes part)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return  # (a SIGTERM during fit's validation is saved too: the rerun finishes that epoch)
        if trainer.world_size > 1:
            return  # ranks stop at different points; a collective save could deadlock (see module doc)
        trainer.save_checkpoint(self.path)  # atomic: zoobot_hpc.atomic.AtomicCheckpointIO
        if trainer.is_global_zero:
            log.warning(
                "stopped by SIGTERM at epoch %d, step %d; saved %s (a rerun resumes from it)",
                trainer.current_epoch,
                trainer.global_step,
                self.path,
            )


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed Python, numpy and torch (CPU and every CUDA device) from (seed, step, rank)."""
    value = (seed * 1_000_003 + step * 1_009 + rank) % 2**32
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def newest_checkpoint(save_dir: Path, last: Path) -> Path | None:
    """The most recently written of `last` and Lightning's `hpc_ckpt_N.ckpt` (USR1 requeue) files."""
    candidates = [p for p in [last, *save_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)
