"""Atomic file output: write to a temporary name beside the target, flush, fsync, rename.

A job killed at any moment (time limit, preemption, full disk) leaves either the old file or the new
one under the final name, never half of one. Used for checkpoints, configs and predictions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from zoobot_hpc.errors import RunError


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; shared project folders want the umask's
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_temporaries(target: Path) -> None:
    """Delete what killed writers of `target` left (`.NAME.*.tmp`); call only when none is writing it."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose `save_checkpoint` is atomic (see module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            folder = Path(path).parent
            free_mb = shutil.disk_usage(folder).free / 2**20 if folder.is_dir() else 0.0
            raise CheckpointWriteError(
                f"cannot write checkpoint {path} ({err}); {free_mb:.0f} MB free in {folder}. Free space "
                "there or choose another save_dir; earlier checkpoints are intact (writes are atomic)"
            ) from err


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (full disk, quota, permissions); the old files are intact."""
