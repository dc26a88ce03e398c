"""The bad-image policy: stop at the first unreadable image (`error`), or `skip` it, loudly.

Workers never raise on an unreadable image (see `zoobot_hpc.data.GalaxyDataset`); the items say
`ok=False` and carry the message, and the main process decides here. A skipped training image
becomes a galaxy without votes: its loss is exactly 0 and it adds no gradient, so every rank keeps
the same batch shape and DDP never waits on a rank that dropped rows. Every skipped file is logged,
listed in a file next to the outputs, and counted at the end; nothing is dropped silently.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from zoobot_hpc.atomic import write_text
from zoobot_hpc.data import ImageError
from zoobot_hpc.errors import InputError

log = logging.getLogger(__name__)

POLICIES = ("error", "skip")
SKIPPED_IMAGES_FILE = "skipped_images.txt"


def check_policy(name: str, value: str) -> None:
    if value not in POLICIES:
        raise InputError(f"{name}={value!r}: use 'error' (stop the run) or 'skip' (skip it, and count it)")


def write_skip_list(target: Path, skipped: list[dict[str, str]]) -> None:
    """One line per skipped image (id, file, reason); removes a stale list when nothing was skipped."""
    if not skipped:
        target.unlink(missing_ok=True)
        return
    lines = [f"{s['id_str']}\t{s['file_loc']}\t{' '.join(s['reason'].split())}" for s in skipped]
    write_text(target, "# id_str\tfile_loc\treason\n" + "\n".join(lines) + "\n")


def _stop_if_any_rank_failed(trainer: pl.Trainer, errors: list[str], split: str) -> None:
    """Every rank stops at the same batch, naming every rank's unreadable files: a rank stopping alone
    would leave the others in their next collective, dying on a closed connection or hanging."""
    # every rank calls this at every batch, so the collective matches (as for a non-finite loss)
    if not trainer.strategy.reduce_boolean_decision(bool(errors), all=False):
        return
    raise ImageError(
        f"{'; '.join(_from_every_rank(errors))} ({split} split; set on_bad_image='skip' to train without "
        "such images, each listed in skipped_images.txt)"
    )


def _from_every_rank(mine: list[Any]) -> list[Any]:
    """The items of every rank's list, in rank order (a collective call under DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return mine
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return [item for rank in gathered for item in rank]


class BadImagePolicy(pl.Callback):
    """Applies the policy to every training, validation and test batch, before the step sees it."""

    def __init__(self, policy: str, save_dir: Path) -> None:
        check_policy("on_bad_image", policy)
        self.policy = policy
        self.save_dir = save_dir
        self.skipped: dict[tuple[str, str], dict[str, str]] = {}  # (split, id): one entry per image

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._apply(trainer, batch, "train")

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._apply(trainer, batch, "val")

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._apply(trainer, batch, "test")

    def _apply(self, trainer: pl.Trainer, batch: dict[str, Any], split: str) -> None:
        bad = ~batch["ok"].bool()
        rows = torch.nonzero(bad).flatten().tolist()
        errors = [batch["error"][i] for i in rows]
        if self.policy == "error":
            _stop_if_any_rank_failed(trainer, errors, split)
            return
        if not errors:
            return
        batch["votes"][bad] = 0  # no votes: exactly zero loss and gradient for this galaxy
        ids = trainer.datamodule.ids(split, batch["index"][bad])
        frame = trainer.datamodule.frames[split]
        for galaxy, index, error in zip(ids, batch["index"][bad].tolist(), errors, strict=True):
            if (split, galaxy) not in self.skipped:
                log.warning("skipped (%s split): %s", split, error)
            file_loc = str(frame["file_loc"].iat[index])
            self.skipped[(split, galaxy)] = {"id_str": galaxy, "file_loc": file_loc, "reason": error}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.write(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.write(trainer)

    def all_skipped(self) -> list[dict[str, str]]:
        """The skipped images of every rank (a collective call under DDP)."""
        unique = {(s["id_str"], s["file_loc"]): s for s in _from_every_rank(list(self.skipped.values()))}
        return list(unique.values())

    def write(self, trainer: pl.Trainer) -> None:
        skipped = self.all_skipped()
        if trainer.is_global_zero:
            write_skip_list(self.save_dir / SKIPPED_IMAGES_FILE, skipped)
            if skipped:
                log.warning(
                    "%d unreadable image(s) were skipped; listed in %s",
                    len(skipped),
                    self.save_dir / SKIPPED_IMAGES_FILE,
                )
