"""What a checkpoint holds, read without building its model: seconds, before any work starts.

Resuming from a checkpoint of another schema, architecture or grey/colour setting would otherwise
fail inside Lightning ("size mismatch for head.linear.weight") after the data and the model were
set up, or, worse, load without complaint when only answer names differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoobot_hpc.errors import InputError
from zoobot_hpc.schema import Schema

UNRECORDED_GREY = "mean"  # what checkpoints written before `grey` was recorded were trained on


class CheckpointError(InputError):
    """A checkpoint is missing, corrupt, not a zoobot-hpc checkpoint, or does not fit the run."""


def read_hyperparameters(checkpoint: str | Path) -> dict[str, Any]:
    """The hyperparameters a checkpoint was saved with; memory-mapped, so the weights are not read."""
    path = Path(checkpoint)
    try:
        content = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # torch/pickle/zip errors differ by corruption; all mean the same here
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is corrupt, truncated "
            "or not a checkpoint written by zoobot-hpc train"
        ) from err
    hparams = content.get("hyper_parameters") if isinstance(content, Mapping) else None
    if not isinstance(hparams, Mapping) or "schema" not in hparams:
        raise CheckpointError(
            f"checkpoint {path} holds no zoobot-hpc settings; give a checkpoint written by zoobot-hpc train"
        )
    return dict(hparams)


def check_resumable(
    checkpoint: str | Path, schema: Schema, model_architecture: str, channels: int, grey: str
) -> None:
    """Refuse to resume from a checkpoint trained with another schema, architecture or input."""
    saved = read_hyperparameters(checkpoint)
    saved_schema = Schema.from_dict(saved["schema"])
    differences = []
    if saved_schema.label_cols != schema.label_cols:
        differences.append(
            f"schema {saved_schema.name!r} ({len(saved_schema.label_cols)} answers) vs {schema.name!r} "
            f"({len(schema.label_cols)} answers)"
        )
    if saved.get("model_architecture") != model_architecture:
        architecture = saved.get("model_architecture")
        differences.append(f"model_architecture {architecture!r} vs {model_architecture!r}")
    saved_grey = saved.get("grey", UNRECORDED_GREY)
    if saved.get("channels") != channels:
        differences.append(f"color={saved.get('channels') == 3} vs color={channels == 3}")
    elif channels == 1 and saved_grey != grey:
        differences.append(f"grey={saved_grey!r} vs grey={grey!r} (set grey={saved_grey!r} to continue it)")
    if differences:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: the checkpoint and this run differ in "
            f"{'; '.join(differences)} (checkpoint vs run). Give this run a new save_dir, or pass "
            "resume=False to start afresh here"
        )
