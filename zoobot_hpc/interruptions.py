"""Stopping and resuming a long run without losing work, and resuming it exactly.

`StopOnSignal` owns the signals that end a Slurm job early:

- SIGTERM: Slurm's time limit, `scancel`, preemption, `scontrol requeue`; SIGKILL follows after
  the cluster's KillWait (often 30 s);
- the requeue signal (USR1, inside Slurm jobs only), sent `--signal=USR1@N` seconds before the time
  limit: the same, and then the job is requeued.

The handlers only record the signal. Saving inside a handler is what deadlocks DDP (Lightning's
own USR1 handler does it): each rank meets the signal in a different place, possibly inside a
different collective, and the save's barrier never completes. Instead, at the start of every
training step the ranks agree (one all-reduce) whether any of them was signalled; if so every rank
saves the same full-state `last.ckpt` at the same step, rank 0 asks for the requeue on USR1, and
`Interrupted` ends the run. A signal during validation takes effect at the next training step,
after that epoch's checkpoint; one during the last epoch's validation, when training ends (its
`last.ckpt` is then the finished fit, so the rerun goes straight to the test).

Who runs `scontrol requeue`: the batch shell, on the host, after srun, when it says so by setting
`ZOOBOT_REQUEUE_FLAG` (the job scripts and submitit jobs do: the ranks may run in a container,
which has no Slurm client); rank 0 then only writes that file. Without it (a hand-written job
script) rank 0 runs `scontrol` itself. No rank exits before the request is made: `srun
--kill-on-bad-exit` ends the whole step as soon as one rank exits.

`EarlyStoppingThatResumes` remembers a decision to stop: Lightning checkpoints the early-stopping
state but not the trainer's decision, so a run interrupted in the validation that stopped it would
otherwise train one more epoch when it resumes.

`seed_batch` reseeds the random generators from (seed, batch, rank) before every training batch
(`GalaxyDataModule.on_before_batch_transfer`), so a resumed run draws the same augmentations and
dropout masks at each batch as one that never stopped (Lightning checkpoints do not carry RNG
states); the shuffling sampler is seeded from (seed, epoch). The batch count, not the optimizer
step: the batches accumulated into one step, or a step skipped for a non-finite loss, would
otherwise share their augmentations and dropout masks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.utilities.exceptions import SIGTERMException

from zoobot_hpc.atomic import write_text
from zoobot_hpc.errors import RunError
from zoobot_hpc.hardware import REQUEUE_FLAG_ENV

log = logging.getLogger(__name__)

NOT_SIGNALLED, TERMINATED, REQUEUE = 0, 1, 2  # ordered: across ranks the largest wins


class Interrupted(RunError):
    """The run was stopped by a signal after saving its state; rerunning the same command resumes it."""


class StopOnSignal(pl.Callback):
    """Stop all ranks at the same training step when any rank is signalled; save; requeue on USR1."""

    def __init__(self, checkpoint: Path, requeue_signal: signal.Signals | None) -> None:
        self.checkpoint = checkpoint
        self.requeue_signal = requeue_signal
        self.received = NOT_SIGNALLED

    def _record(self, signum: int, frame: Any) -> None:
        self.received = max(self.received, REQUEUE if signum == self.requeue_signal else TERMINATED)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Replace Lightning's handlers, which it installed just before; it restores the originals
        when fit ends, however it ends. (A signal during setup is Lightning's: a SIGTERM is kept.)"""
        self.received = TERMINATED if trainer.received_sigterm else NOT_SIGNALLED
        for signum in (signal.SIGTERM, self.requeue_signal):
            if signum is not None:
                signal.signal(signum, self._record)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        received = self._agreed(trainer)
        if received != NOT_SIGNALLED:
            trainer.save_checkpoint(self.checkpoint)  # every rank, same step; atomic (AtomicCheckpointIO)
            self._stop(trainer, received, f"epoch {trainer.current_epoch}, step {trainer.global_step}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """A signal after the last training step (in the last validation) would otherwise be lost: the
        test would start, and SIGKILL end it. ModelCheckpoint has saved the finished fit already."""
        received = self._agreed(trainer)
        if received != NOT_SIGNALLED:
            self._stop(trainer, received, f"the end of training, step {trainer.global_step}")

    def _agreed(self, trainer: pl.Trainer) -> int:
        """The strongest signal any rank received. Every rank calls this at the same hooks, so the
        collective matches."""
        if trainer.world_size == 1:
            return self.received
        flag = torch.tensor(self.received, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max"))

    def _stop(self, trainer: pl.Trainer, received: int, when: str) -> None:
        where = f"{when}; saved {self.checkpoint}"
        if received == REQUEUE:
            outcome = "rank 0 asked for the requeue"
            if trainer.is_global_zero:
                log.warning("stopped by the requeue signal at %s; requeueing the job", where)
                outcome = request_requeue()
            trainer.strategy.barrier("requeue requested")
            raise Interrupted(f"stopped by the requeue signal at {where}; {outcome}")
        raise Interrupted(
            f"stopped by SIGTERM at {where}; rerun the same command (or requeue the job) to resume from it"
        )


class EarlyStoppingThatResumes(EarlyStopping):
    """Early stopping whose decision survives a restart: a resumed run that had already been stopped
    goes straight to the test."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.stopping_reason is not EarlyStoppingReason.NOT_STOPPED:  # restored from the checkpoint
            trainer.should_stop = True


@contextlib.contextmanager
def sigterm_is_an_interruption(stage: str) -> Iterator[None]:
    """SIGTERM outside `StopOnSignal`'s reach (before training starts, or during the test) is
    Lightning's, which ends the stage with a SystemExit that exits 0, as if the run had finished."""
    try:
        yield
    except SIGTERMException:
        raise Interrupted(f"stopped by SIGTERM {stage}; rerun the same command to resume") from None


def request_requeue() -> str:
    """Requeue this Slurm job (or array task), or leave that to the job script; says what happened."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    flag = os.environ.get(REQUEUE_FLAG_ENV)
    if flag:
        try:
            write_text(flag, f"{job}\n")
        except OSError as err:
            return f"could not write {flag} for the job script to requeue job {job} ({err}): resubmit it"
        return f"the job script requeues job {job}; it resumes from the checkpoint when it restarts"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return (
            f"could not requeue job {job} ({err}; in a container, let the batch shell requeue: "
            "see REQUEUE_TEARDOWN in zoobot_hpc.hardware): resubmit the same job to resume"
        )
    if result.returncode != 0:
        return (
            f"`scontrol requeue {job}` failed ({result.stderr.strip()}): submit jobs with --requeue, "
            "or resubmit the same job script to resume"
        )
    return f"requeued job {job}: it resumes from the checkpoint when it restarts"


def seed_batch(seed: int, batch: int, rank: int) -> None:
    """Seed Python, numpy and torch (CPU and every CUDA device) from (seed, batch, rank)."""
    value = (seed * 1_000_003 + batch * 1_009 + rank) % 2**32
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
