"""CPU side of the training pipeline, images/s: ours vs galaxy-datasets' CatalogDataModule.

Files: ../shared/data/decals_rings (370 JPEGs, 424 px). Batch 64, 2 workers, grey, 224 px output,
train loaders (shuffle, drop_last), several epochs per repetition, repetitions interleaved.

- ours (package defaults): `GalaxyDataset` + `LoaderSettings.loader`, as the training loader (batch
  buffers kept between epochs) -> uint8 (64, 1, 424, 424) batches in the loader's batch buffers;
  grey is the JPEG's own luma channel (`decode_jpeg(..., mode=GRAY)`, 0.299 R + 0.587 G + 0.114 B).
  Augmentation runs after the transfer, on the model's device, so it is timed on its own:
  `GalaxyAugment(224)(batch, train=True)`.
- ours, `grey="mean"`: the same loader with Zoobot's grey, the unweighted mean of R, G, B after an
  RGB decode.
- peer: `CatalogDataModule(train_transform=...)` with the same augmentation in galaxy-datasets' own
  transform builder: grey, RandomResizedCrop scale (0.7, 0.8) ratio (0.9, 1.1) to 224, rotation, flips,
  float32 output; run in the peer venv (Pillow decode in its workers).
- decode limit: one process, one thread, read + `decode_jpeg(mode=GRAY)` per file; plus the parts
  (reading files, RGB decode + mean, batched decode).

Targets: ours >= 3x peer and >= 50% of (decode limit x workers).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import SHARED_RINGS, Peer, machine, median, set_threads, spread
from torchvision.io import ImageReadMode, decode_jpeg

from zoobot_hpc.augment import GalaxyAugment
from zoobot_hpc.catalog import read_catalog
from zoobot_hpc.data import GalaxyDataset, LoaderSettings, grey_mean
from zoobot_hpc.schema import load_schema

BATCH, WORKERS, PREFETCH = 64, 2, 4


def run_epochs(loader, epochs: int) -> tuple[int, float]:
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images += batch["image"].shape[0]
    return images, time.perf_counter() - start


def decode_limits(paths: list[str], rounds: int) -> dict[str, float]:
    """Single-process, single-thread images/s of reading and decoding the same files."""
    torch.set_num_threads(1)
    blobs = []
    for p in paths:
        with open(p, "rb") as f:
            blobs.append(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
    n = len(paths) * rounds
    out: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        for _ in range(rounds):
            fn()
        out.setdefault(name, []).append(n / (time.perf_counter() - start))

    def read_only() -> None:
        for p in paths:
            with open(p, "rb") as f:
                torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)

    def read_decode_grey() -> None:
        for p in paths:
            with open(p, "rb") as f:
                decode_jpeg(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), mode=ImageReadMode.GRAY)

    def decode_grey() -> None:
        for b in blobs:
            decode_jpeg(b, mode=ImageReadMode.GRAY)

    def decode_rgb_mean() -> None:
        for b in blobs:
            grey_mean(decode_jpeg(b, mode=ImageReadMode.RGB))

    def decode_rgb_only() -> None:
        for b in blobs:
            decode_jpeg(b, mode=ImageReadMode.RGB)

    def decode_grey_batched() -> None:
        for i in range(0, len(blobs), BATCH):
            decode_jpeg(blobs[i : i + BATCH], mode=ImageReadMode.GRAY)

    for _ in range(3):
        for name, fn in [
            ("read files only", read_only),
            ("read + decode_jpeg GRAY (the limit)", read_decode_grey),
            ("decode_jpeg GRAY, bytes in memory", decode_grey),
            ("decode_jpeg GRAY batched (lists of 64)", decode_grey_batched),
            ("decode_jpeg RGB, bytes in memory", decode_rgb_only),
            ("decode_jpeg RGB + unweighted mean (grey='mean')", decode_rgb_mean),
        ]:
            timed(name, fn)
    return {k: median(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4, help="epochs (320 images each) per repetition")
    args = parser.parse_args()

    catalog = read_catalog(SHARED_RINGS / "catalog.csv")
    schema = load_schema("decals_rings")
    paths = [str(p) for p in catalog["file_loc"]]
    settings = LoaderSettings(batch_size=BATCH, num_workers=WORKERS, prefetch_factor=PREFETCH)

    limits = decode_limits(paths, rounds=2)
    set_threads(2)

    # as the training loader: shuffled, last partial batch dropped, batch buffers kept between epochs
    ours_pkg = settings.loader(
        GalaxyDataset.from_catalog(catalog, schema.label_cols, color=False, size=(424, 424)),
        shuffle=True,
        drop_last=True,
        keep_buffers=True,
    )
    mean = GalaxyDataset.from_catalog(catalog, schema.label_cols, color=False, size=(424, 424), grey="mean")
    ours_mean = settings.loader(mean, shuffle=True, drop_last=True, keep_buffers=True)
    peer = Peer(
        "peer_loader.py",
        {
            "catalog": str(SHARED_RINGS / "catalog.csv"),
            "label_cols": schema.label_cols,
            "batch": BATCH,
            "workers": WORKERS,
            "prefetch": PREFETCH,
        },
    )
    run_epochs(ours_pkg, 1)  # start workers, warm the page cache
    run_epochs(ours_mean, 1)
    peer.call(cmd="epochs", epochs=1)

    rates: dict[str, list[float]] = {"ours": [], "ours_mean": [], "peer": []}
    for _ in range(args.reps):
        n, s = run_epochs(ours_pkg, args.epochs)
        rates["ours"].append(n / s)
        r = peer.call(cmd="epochs", epochs=args.epochs)
        rates["peer"].append(r["images"] / r["seconds"])
        n, s = run_epochs(ours_mean, args.epochs)
        rates["ours_mean"].append(n / s)
    peer_shape = peer.call(cmd="shape")
    peer.close()

    # augmentation after the transfer, here on the CPU fallback (2 threads)
    augment = GalaxyAugment(224)
    batch = next(iter(ours_pkg))["image"]
    aug_rates = []
    with torch.no_grad():
        augment(batch, train=True)
        for _ in range(args.reps):
            start = time.perf_counter()
            for _ in range(3):
                out = augment(batch, train=True)
            aug_rates.append(3 * batch.shape[0] / (time.perf_counter() - start))
    del ours_pkg, ours_mean

    limit = limits["read + decode_jpeg GRAY (the limit)"]
    ours, zoobot_grey, peer_rate = median(rates["ours"]), median(rates["ours_mean"]), median(rates["peer"])
    print(f"machine: {machine()}")
    print(
        f"files: {len(paths)} JPEGs {SHARED_RINGS} (424x424); batch {BATCH}, {WORKERS} workers, prefetch "
        f"{PREFETCH}, grey, {args.epochs} epochs x 320 images per repetition, median of {args.reps}"
    )
    print("single process, 1 thread, images/s:")
    for name, value in limits.items():
        print(f"  {name:45s} {value:8.0f}")
    print(
        f"ours (package defaults: luma decode), uint8 {tuple(batch.shape)} batches: {ours:7.0f} img/s "
        f"{spread(rates['ours'])}"
    )
    print(
        f"ours (grey='mean': RGB decode + mean), uint8 batches:             {zoobot_grey:7.0f} img/s "
        f"{spread(rates['ours_mean'])}"
    )
    print(
        f"peer (CatalogDataModule, Pillow + torchvision v2), float {peer_shape['shape']} batches: "
        f"{peer_rate:7.0f} img/s {spread(rates['peer'])}"
    )
    print(
        f"ours augmentation GalaxyAugment(224), batch 64, CPU 2 threads: {median(aug_rates):7.0f} img/s "
        f"{spread(aug_rates)} -> {tuple(out.shape)} float"
    )
    both = 1 / (1 / ours + 1 / median(aug_rates))
    print(f"(if the augmentation also ran on these 2 CPU cores, one after the other: {both:.0f} img/s)")
    speed, fraction = ours / peer_rate, ours / (limit * WORKERS)
    print(
        f"RATIOS loader: ours/peer {speed:.2f}x (target >=3: {'met' if speed >= 3 else 'NOT met'}), "
        f"ours/(limit x {WORKERS}) {fraction:.0%} (target >=50%: {'met' if fraction >= 0.5 else 'NOT met'}); "
        f"grey='mean': /peer {zoobot_grey / peer_rate:.2f}x, /(limit x {WORKERS}) "
        f"{zoobot_grey / (limit * WORKERS):.0%}"
    )


if __name__ == "__main__":
    main()
