"""From catalog rows to uint8 image batches: decoding in DataLoader workers, nothing else.

Workers only read and decode (JPEG and PNG with torchvision's decoders, anything else Pillow reads),
convert to grey if asked and hand over uint8 tensors; augmentation runs batched on the model's
device (`zoobot_hpc.augment`). Per-galaxy metadata lives in numpy arrays, not pandas rows or lists
of Python objects, so forked workers do not copy-on-write the catalog and their memory stays flat
however many rows it has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import resize

from zoobot_hpc.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ImageError(InputError):
    """An image file cannot be read or decoded; the message names the file."""


def load_image(path: str, color: bool, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 (C, H, W): RGB for `color`, else the unweighted mean of R, G and B (Zoobot's grey).

    With `size`, an image of another size is resized to it, so that every batch stacks.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ImageError(
            f"image {path} cannot be read ({err.strerror}); fix the path in the catalog"
        ) from err
    if not raw:
        raise ImageError(f"image {path} is an empty file; replace it or remove its row from the catalog")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        image = _decode_with_pillow(path)
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = (image.float() / 257.0).round().to(torch.uint8)
    if not color:
        image = (image.sum(dim=0, keepdim=True, dtype=torch.int16) / 3).round().to(torch.uint8)
    if size is not None and tuple(image.shape[1:]) != size:
        image = resize(image, list(size), antialias=True)
    return image


def _decode_with_pillow(path: str) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(
            f"image {path} cannot be decoded ({err}); it is truncated or not an image: "
            "replace it or remove its row from the catalog"
        ) from err
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError(f"image {path} cannot be opened ({err})") from err


class GalaxyDataset(Dataset):
    """Images and (optionally) vote counts of one catalog split, indexed by row."""

    def __init__(
        self,
        file_locs: np.ndarray,
        votes: np.ndarray | None,
        color: bool,
        size: tuple[int, int] | None,
    ) -> None:
        self.file_locs = np.asarray(file_locs, dtype=str)  # fixed-width unicode: no Python objects
        self.votes = None if votes is None else np.ascontiguousarray(votes, dtype=np.int32)
        self.color = color
        self.size = size

    @classmethod
    def from_catalog(
        cls, catalog: pd.DataFrame, label_cols: list[str] | None, color: bool, size: tuple[int, int] | None
    ) -> GalaxyDataset:
        votes = catalog[label_cols].to_numpy() if label_cols else None
        return cls(catalog["file_loc"].to_numpy(dtype=str), votes, color, size)

    def __len__(self) -> int:
        return len(self.file_locs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"image": load_image(str(self.file_locs[index]), self.color, self.size), "index": index}
        if self.votes is not None:
            item["votes"] = torch.from_numpy(self.votes[index])
        return item


@dataclass
class LoaderSettings:
    batch_size: int = 256
    num_workers: int = 4
    prefetch_factor: int = 4
    pin_memory: bool = False
    timeout_s: float = 600.0

    def loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        workers = self.num_workers > 0
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if workers else None,
            persistent_workers=workers,
            pin_memory=self.pin_memory,
            timeout=self.timeout_s if workers else 0,
        )


class GalaxyDataModule(pl.LightningDataModule):
    """Train/val/test loaders over checked catalog splits (see `zoobot_hpc.catalog.load_splits`)."""

    def __init__(
        self,
        train: pd.DataFrame,
        val: pd.DataFrame,
        test: pd.DataFrame,
        label_cols: list[str],
        color: bool,
        loader: LoaderSettings,
    ) -> None:
        super().__init__()
        self.frames = {"train": train, "val": val, "test": test}
        self.label_cols = label_cols
        self.color = color
        self.loader_settings = loader
        self.image_size = image_size(str(train["file_loc"].iloc[0]))
        self.datasets = {
            split: GalaxyDataset.from_catalog(frame, label_cols, color, self.image_size)
            for split, frame in self.frames.items()
        }

    def ids(self, split: str, indices: torch.Tensor) -> list[str]:
        return [str(i) for i in self.frames[split]["id_str"].to_numpy()[indices.cpu().numpy()]]

    def train_dataloader(self) -> DataLoader:
        drop_last = len(self.datasets["train"]) > self.loader_settings.batch_size
        return self.loader_settings.loader(self.datasets["train"], shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self.loader_settings.loader(self.datasets["val"], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader_settings.loader(self.datasets["test"], shuffle=False)
