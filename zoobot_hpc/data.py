"""From catalog rows to uint8 image batches: decoding in DataLoader workers, nothing else.

Workers only read and decode (JPEG and PNG with torchvision's decoders, anything else Pillow reads),
convert to grey if asked and hand over uint8 batches (in the loader's batch buffers,
`zoobot_hpc.batch_buffers`); augmentation runs batched on the model's device (`zoobot_hpc.augment`).
Per-galaxy metadata lives in numpy arrays, not pandas rows or lists of Python objects, so forked
workers do not copy-on-write the catalog and their memory stays flat however many rows it has.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import resize

from zoobot_hpc import batch_buffers
from zoobot_hpc.catalog import arrow_strings
from zoobot_hpc.errors import InputError, RunError
from zoobot_hpc.interruptions import seed_batch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Grey images (color=False) as: "luma", 0.299 R + 0.587 G + 0.114 B, which a JPEG stores as its own
# channel and decodes without the colour planes (the default: about 1.7x the images/s per loader
# worker); or "mean", Zoobot's unweighted mean of R, G and B (galaxy-datasets' GrayscaleUnweighted),
# for inputs identical to Zoobot's. A model predicts with the grey it was trained on: the checkpoint
# records it.
GREY_MODES = ("luma", "mean")
DEFAULT_GREY = "luma"
# JPEG and PNG go to torchvision's decoders; the rest to Pillow (torchvision ignores GRAY for WebP/GIF)
TORCHVISION_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
# Pillow modes (FITS, float or 32-bit TIFF) with no canonical stretch to 8 bits: refused, not guessed
DEEP_MODES = {"F": "32-bit floating-point", "I": "32-bit integer"}


class ImageError(InputError):
    """An image file cannot be read or decoded; the message names the file."""


class LoaderError(RunError):
    """The DataLoader workers failed or stalled; the message says what to change."""


def load_image(
    path: str, color: bool, size: tuple[int, int] | None = None, grey: str = DEFAULT_GREY
) -> torch.Tensor:
    """uint8 (C, H, W): RGB for `color`, else one grey channel (`GREY_MODES`).

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
    luma = not color and grey == "luma"
    image = None
    if raw.startswith(TORCHVISION_SIGNATURES):
        with contextlib.suppress(RuntimeError):  # (a damaged file: Pillow says what is wrong)
            data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            image = decode_image(data, mode=ImageReadMode.GRAY if luma else ImageReadMode.RGB)
    if image is None or image.shape[0] != (1 if luma else 3):
        image = _decode_with_pillow(raw, path, "L" if luma else "RGB")
    if image.dtype != torch.uint8:  # 16-bit PNG, or 16-bit grey from Pillow
        image = (image.float() / 257.0).round().to(torch.uint8)
    if not color and not luma:
        image = grey_mean(image)
    if size is not None and tuple(image.shape[1:]) != size:
        image = resize(image, list(size), antialias=True)
    return image


def grey_mean(rgb: torch.Tensor) -> torch.Tensor:
    """(1, H, W) uint8 round((R + G + B) / 3), in integers: twice as fast as through floats.

    (R + G + B) / 3 never ends in .5, so rounding it is floor((sum + 1) / 3), and for sums up to
    766 that is ((sum + 1) * 21846) >> 16 exactly (21846 / 2**16 exceeds 1/3 by 1e-5).
    """
    total = rgb[0].to(torch.int32)
    total += rgb[1]
    total += rgb[2]
    total += 1
    total *= 21846
    total >>= 16
    return total.to(torch.uint8).unsqueeze(0)


def _decode_with_pillow(raw: bytes, path: str, mode: str) -> torch.Tensor:
    """What torchvision does not decode, or not in `mode`'s channels; 16-bit grey stays 16-bit."""
    try:
        with Image.open(io.BytesIO(raw)) as im:
            pixels = _pillow_pixels(im, path, mode)
    except UnidentifiedImageError as err:  # (its text names the in-memory buffer, not the file)
        raise ImageError(
            f"image {path} cannot be decoded: no image format that torchvision or Pillow reads starts "
            "like it (is it an image?); replace it or remove its row from the catalog"
        ) from err
    except (OSError, SyntaxError) as err:
        raise ImageError(
            f"image {path} cannot be decoded ({err}); it is truncated or damaged: "
            "replace it or remove its row from the catalog"
        ) from err
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def _pillow_pixels(im: Image.Image, path: str, mode: str) -> np.ndarray:
    """`im` as (H, W[, C]) pixels in `mode`; Pillow's 16-bit modes keep their values, to scale as a PNG's.

    `Image.convert` clips values to 0-255, which makes deep images black or white without a word.
    """
    deep = _without_8_bit_scale(im)
    if deep:
        raise ImageError(
            f"image {path} has {deep} pixels (Pillow mode {im.mode}), which have no standard 8-bit "
            "scale; replace it or remove its row from the catalog: convert it to an 8-bit PNG or "
            "JPEG with the stretch of your choice (e.g. asinh)"
        )
    if im.mode.startswith("I;16"):  # 16-bit TIFF
        grey = np.asarray(im).astype(np.int32)
        return grey if mode == "L" else np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert(mode))


def _without_8_bit_scale(im: Image.Image) -> str:
    """What `im`'s pixels are if no stretch to 8 bits is canonical, else "".

    Pillow reads 16-bit FITS as unsigned and ignores BZERO, so negative values would turn white.
    """
    if im.format == "FITS" and im.mode.startswith("I;16"):
        return "16-bit integer FITS"
    return DEEP_MODES.get(im.mode, "")


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError(f"image {path} cannot be opened ({err})") from err


class GalaxyDataset(Dataset):
    """Images and (optionally) vote counts of one catalog split, indexed by row.

    An unreadable image does not raise inside the worker (where its name would be buried in a
    worker traceback): the item carries `ok=False`, a blank image and the error message, and the
    main process applies the run's bad-image policy (`zoobot_hpc.bad_images`).
    """

    def __init__(
        self,
        file_locs: np.ndarray,
        votes: np.ndarray | None,
        color: bool,
        size: tuple[int, int],
        grey: str = DEFAULT_GREY,
    ) -> None:
        # one Arrow buffer: forked workers share it without per-row objects whose reference counts
        # would copy pages, and no path is padded to the longest one (as in a fixed-width numpy array)
        self.file_locs = arrow_strings(pd.Series(file_locs))
        self.votes = None if votes is None else np.ascontiguousarray(votes, dtype=np.int32)
        self.color = color
        self.size = size
        self.grey = grey
        self.blank = torch.zeros(self.image_shape, dtype=torch.uint8)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image this dataset returns."""
        return (3 if self.color else 1, *self.size)

    @classmethod
    def from_catalog(
        cls,
        catalog: pd.DataFrame,
        label_cols: list[str] | None,
        color: bool,
        size: tuple[int, int],
        grey: str = DEFAULT_GREY,
    ) -> GalaxyDataset:
        votes = catalog[label_cols].to_numpy() if label_cols else None
        return cls(catalog["file_loc"], votes, color, size, grey)

    def __len__(self) -> int:
        return len(self.file_locs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = load_image(self.file_locs[int(index)].as_py(), self.color, self.size, self.grey)
            ok, error = True, ""
        except ImageError as err:
            image, ok, error = self.blank, False, str(err)
        item = {"image": image, "index": index, "ok": ok, "error": error}
        if self.votes is not None:
            item["votes"] = self.votes[index]
        return item


def collate_galaxies(
    items: list[dict[str, Any]], stack: Callable[[list[torch.Tensor]], Any] = default_collate
) -> dict[str, Any]:
    """One batch of `GalaxyDataset` items: images stacked by `stack`, small fields as numpy arrays.

    Each tensor a loader worker returns crosses to the main process as its own shared-memory file,
    with a file-descriptor handshake that costs both processes about a millisecond; the index, ok
    flags and votes (a few hundred bytes) cross inside the pickled batch instead: 10-20% more images/s
    from two workers. `GalaxyLoader` makes them tensors again. The images cross in the loader's batch
    buffers (`stack` is then `BatchBuffers.stack`).
    """
    batch = {
        "image": stack([item["image"] for item in items]),
        "index": np.array([item["index"] for item in items], dtype=np.int64),
        "ok": np.array([item["ok"] for item in items], dtype=bool),
        "error": [item["error"] for item in items],
    }
    if "votes" in items[0]:
        batch["votes"] = np.stack([item["votes"] for item in items])
    return batch


class GalaxyLoader(DataLoader):
    """A DataLoader whose batches' numpy arrays (see `collate_galaxies`) become tensors on arrival.

    With `buffers`, the workers' images arrive in them; unless `keep_buffers` (the training loader,
    iterated again at once), their memory is given back after each pass.
    """

    def __init__(
        self,
        *args: Any,
        buffers: batch_buffers.BatchBuffers | None = None,
        keep_buffers: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.buffers = buffers
        self.keep_buffers = keep_buffers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in super().__iter__():
            yield {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
        if self.buffers is not None and not self.keep_buffers:
            self.buffers.drop_free_pages()  # (the pass is over: no worker has a batch to make)


def common_image_size(file_locs: Sequence[str], fallback: int | None = None) -> tuple[int, int]:
    """The size every image is brought to so batches stack: that of the first readable image."""
    for loc in file_locs[:50]:
        try:
            return image_size(loc)
        except ImageError:
            continue
    if fallback is None:
        raise ImageError(
            f"none of the first {min(50, len(file_locs))} images can be opened "
            f"(the first is {file_locs[0]}); check the file_loc paths (zoobot-hpc validate --check-images)"
        )
    return fallback, fallback


def unreadable_images(file_locs: Sequence[str], color: bool, num_workers: int) -> list[tuple[str, str]]:
    """(file, reason) of every image that cannot be decoded, checked in parallel with a progress bar."""
    from tqdm.auto import tqdm

    dataset = GalaxyDataset(file_locs, None, color, common_image_size(file_locs, fallback=64))
    loader = LoaderSettings(batch_size=32, num_workers=num_workers, prefetch_factor=2).loader(dataset)
    bad: list[tuple[str, str]] = []
    with tqdm(total=len(dataset), unit="img", desc="decoding", disable=None) as bar:
        for batch in loader:
            for index, ok, error in zip(
                batch["index"].tolist(), batch["ok"].tolist(), batch["error"], strict=True
            ):
                if not ok:
                    bad.append((dataset.file_locs[index].as_py(), error))
            bar.update(len(batch["index"]))
    return bad


@dataclass
class LoaderSettings:
    batch_size: int = 256
    num_workers: int = 4
    prefetch_factor: int = 4
    pin_memory: bool = False
    timeout_s: float = 600.0

    def loader(
        self,
        dataset: GalaxyDataset,
        shuffle: bool = False,
        drop_last: bool = False,
        sampler: Any = None,
        keep_buffers: bool = False,
    ) -> GalaxyLoader:
        """`keep_buffers`: keep the batch buffers' memory between passes (the training loader)."""
        workers = self.num_workers > 0
        context = _worker_context() if workers else None
        buffers = None
        if context is not None:  # (buffers are inherited by forked workers only)
            buffers = batch_buffers.for_loader(
                self.num_workers, self.prefetch_factor, (self.batch_size, *dataset.image_shape)
            )
        return GalaxyLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if workers else None,
            persistent_workers=workers,
            pin_memory=self.pin_memory,
            timeout=self.timeout_s if workers else 0,
            worker_init_fn=partial(leave_job_signals_to_the_main_process, main_pid=os.getpid())
            if workers
            else None,
            multiprocessing_context=context,
            collate_fn=collate_galaxies
            if buffers is None
            else partial(collate_galaxies, stack=buffers.stack),
            buffers=buffers,
            keep_buffers=keep_buffers,
        )


def leave_job_signals_to_the_main_process(worker_id: int, main_pid: int) -> None:
    """Loader workers ignore the job's SIGTERM and requeue signal (USR1), but not the main process's.

    Slurm signals every process of a job step, workers included. A worker killed by the signal (USR1's
    default action; torch's worker SIGTERM handler) takes the run down with "worker killed" before the
    main process can save and requeue; the main process stops its workers itself when it exits. A
    SIGTERM from the main process itself (multiprocessing terminates its daemonic children when
    Python exits, after an uncaught error for example, then waits for them) still ends the worker at
    once: ignored, it would leave the main process waiting forever.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (a thread started before this one: ignored there)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # kept pending, for the watcher
    threading.Thread(target=_exit_on_sigterm_from, args=(main_pid,), daemon=True).start()


def _exit_on_sigterm_from(main_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
        pass
    os._exit(0)


class _WorkerProcess(multiprocessing.context.ForkProcess):
    """A loader worker forked with SIGTERM blocked, so that every thread it ever has blocks it and
    only `_exit_on_sigterm_from` receives it. A thread that did not block it would take the signal
    and drop it (ignored): threads the worker starts before `worker_init_fn` runs (after
    `torch.set_num_threads(2)` in the main process, for one) did, the main process's SIGTERM at exit
    was lost, and Python's exit waited for the worker forever."""

    def start(self) -> None:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class _WorkerContext(multiprocessing.context.ForkContext):
    Process = _WorkerProcess


def _worker_context() -> multiprocessing.context.BaseContext | None:
    """Forked workers (Linux's default start method) as `_WorkerProcess`; the default context where
    workers are not forked (macOS and Windows spawn them)."""
    return _WorkerContext() if multiprocessing.get_start_method() == "fork" else None


@contextlib.contextmanager
def loader_errors_explained(settings: LoaderSettings) -> Iterator[None]:
    """Turn PyTorch's terse DataLoader failures into what happened and what to change."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if "DataLoader timed out" in text:
            for worker in multiprocessing.active_children():  # a stuck worker would also block exit
                worker.kill()
            raise LoaderError(
                f"no batch arrived from the DataLoader workers for {settings.timeout_s:g} s: "
                "an image read is hanging (a stalled network filesystem, a FIFO or device file in "
                "the catalog) or a worker is stuck. Check that the images are readable "
                "(zoobot-hpc validate --check-images), or raise loader_timeout if the filesystem "
                "is just slow"
            ) from err
        if "DataLoader worker" in text and ("killed" in text or "exited unexpectedly" in text):
            raise LoaderError(
                f"a DataLoader worker died ({text.strip()}); most often the job ran out of memory: lower "
                f"num_workers (now {settings.num_workers}) or prefetch_factor "
                f"(now {settings.prefetch_factor}), or ask Slurm for more memory (slurm: mem)"
            ) from err
        raise


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
        seed: int = 0,
        grey: str = DEFAULT_GREY,
    ) -> None:
        super().__init__()
        self.frames = {"train": train, "val": val, "test": test}
        self.label_cols = label_cols
        self.color = color
        self.loader_settings = loader
        self.seed = seed
        self.image_size = common_image_size(train["file_loc"].array)
        self.datasets = {
            split: GalaxyDataset.from_catalog(frame, label_cols, color, self.image_size, grey)
            for split, frame in self.frames.items()
        }

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Before each training batch is augmented: reseed from (seed, batch, rank), for exact resume.

        The batches since the start of the run (restored with the loop state on resume).
        """
        trainer = self.trainer
        if trainer is not None and trainer.training:
            seed_batch(self.seed, trainer.fit_loop.epoch_loop.total_batch_idx, trainer.global_rank)
        return batch

    def ids(self, split: str, indices: torch.Tensor) -> list[str]:
        return [str(i) for i in self.frames[split]["id_str"].to_numpy()[indices.cpu().numpy()]]

    def train_dataloader(self) -> DataLoader:
        """Shuffled by a sampler seeded with (seed, epoch): a resumed run sees the same order."""
        dataset = self.datasets["train"]
        trainer = self.trainer
        sampler = DistributedSampler(
            dataset,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=True,
            seed=self.seed,
        )
        drop_last = len(sampler) > self.loader_settings.batch_size
        return self.loader_settings.loader(dataset, sampler=sampler, drop_last=drop_last, keep_buffers=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader_settings.loader(self.datasets["val"], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader_settings.loader(self.datasets["test"], shuffle=False)
