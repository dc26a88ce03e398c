"""Inputs shared by bench_predict.py and bench_train_step.py: real shared galaxies, preprocessed."""

from __future__ import annotations

from pathlib import Path

import torch
from common import SHARED_RINGS

from zoobot_hpc.catalog import read_catalog
from zoobot_hpc.data import load_image
from zoobot_hpc.schema import Schema


def shared_batch(count: int, size: int = 424) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 (count, 1, H, W) grey images and their vote counts (decals_rings schema columns)."""
    catalog = read_catalog(SHARED_RINGS / "catalog.csv").iloc[:count]
    images = torch.stack([load_image(p, color=False, size=(size, size)) for p in catalog["file_loc"]])
    return images, catalog


def save_peer_inputs(path: Path, schema: Schema, images: torch.Tensor, votes: torch.Tensor) -> None:
    torch.save(
        {
            "images": images,
            "votes": votes,
            "label_cols": schema.label_cols,
            "pairs": {q.name: [f"_{a}" for a in q.answers] for q in schema.questions},
            "dependencies": {q.name: q.asked_after for q in schema.questions},
        },
        path,
    )
