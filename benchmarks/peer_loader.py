"""Peer side of bench_loader.py: galaxy-datasets' CatalogDataModule train loader, with the seed's
augmentation built by galaxy-datasets' own `get_galaxy_transform` and passed as `train_transform`."""

from __future__ import annotations

import json
import sys
import time

import pandas as pd
import torch
from common import serve
from galaxy_datasets.pytorch.galaxy_datamodule import CatalogDataModule
from galaxy_datasets.transforms import get_galaxy_transform, minimal_view_config
from omegaconf import DictConfig


def seed_augmentation() -> DictConfig:
    """Grey, random resized crop scale (0.7, 0.8) ratio (0.9, 1.1) to 224, rotation, flips."""
    cfg = minimal_view_config()
    cfg.greyscale = True
    cfg.random_affine = False
    cfg.random_resized_crop = {"scale": [0.7, 0.8], "ratio": [0.9, 1.1]}
    cfg.rotation_prob = 1.0
    cfg.flip_prob = 0.5
    return cfg


def main() -> None:
    config = json.loads(sys.argv[1])
    torch.set_num_threads(2)
    catalog = pd.read_csv(config["catalog"], dtype={"id_str": str})
    base = config["catalog"].rsplit("/", 1)[0]
    catalog["file_loc"] = [f"{base}/{loc}" for loc in catalog["file_loc"]]
    transform = get_galaxy_transform(seed_augmentation())
    datamodule = CatalogDataModule(
        label_cols=config["label_cols"],
        train_transform=transform,
        test_transform=transform,
        train_catalog=catalog,
        val_catalog=catalog.iloc[:64],
        batch_size=config["batch"],
        num_workers=config["workers"],
        prefetch_factor=config["prefetch"],
    )
    datamodule.setup(stage="fit")
    loader = datamodule.train_dataloader()
    last = {}

    def epochs(epochs: int) -> dict:
        images, start = 0, time.perf_counter()
        for _ in range(epochs):
            for batch in loader:
                images += batch["image"].shape[0]
                last["shape"] = list(batch["image"].shape)
        return {"images": images, "seconds": time.perf_counter() - start}

    serve({"epochs": epochs, "shape": lambda: last}, ready={"transform": str(transform)})


if __name__ == "__main__":
    main()
