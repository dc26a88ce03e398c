"""Memory and catalog handling at scale: a 1,000,000-row Parquet catalog (rows reuse the 370 shared
images, `file_loc` relative to the catalog), 4 loader workers, 20,000 samples.

1. Per-worker memory growth while loading: RSS and private (unique) memory of each worker after its
   first batch and after 20,000 samples; target < 50 MB RSS growth per worker.
2. Catalog load + validation without opening images, the package's `read_catalog` +
   `find_problems(..., check_files=False)`, against a bare `pandas.read_parquet` of the same file;
   target < 3x. Timed on two files with the same rows: ids in order (as catalogs are usually
   written; the target's figure) and the rows shuffled (a duplicate-id check then needs a hash
   pass). For reference, on the file in order: the bare read followed by pandas'
   `Index.is_unique` of `id_str`. Timed once: `find_problems(check_files=True)`, the training
   path, which also checks that every image file exists (by listing each folder once).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import SHARED_RINGS, WORK, machine, median, spread

from zoobot_hpc.catalog import find_problems, read_catalog
from zoobot_hpc.data import GalaxyDataset, LoaderSettings
from zoobot_hpc.schema import Schema, load_schema

WORKERS, BATCH = 4, 64


def make_catalog(path: Path, rows: int, label_cols: list[str], shuffled: bool) -> None:
    shared = pd.read_csv(SHARED_RINGS / "catalog.csv")
    take = np.arange(rows) % len(shared)
    # relative file_loc, as users write them: resolved against the catalog's folder by read_catalog
    rel = os.path.relpath(SHARED_RINGS, path.parent)
    frame = pd.DataFrame(
        {
            "id_str": [f"G{i:07d}" for i in range(rows)],
            "file_loc": [f"{rel}/{loc}" for loc in shared["file_loc"].to_numpy()[take]],
        }
    )
    for col in label_cols:
        frame[col] = shared[col].to_numpy()[take].astype(np.int64)
    if shuffled:
        frame = frame.sample(frac=1, random_state=0)
    frame.to_parquet(path, index=False)


def time_catalog(path: Path, schema: Schema, reps: int) -> dict[str, list[float]]:
    """Seconds per repetition: bare read, read + pandas `is_unique`, ours (interleaved)."""
    times: dict[str, list[float]] = {"bare": [], "is_unique": [], "ours": []}
    for _ in range(reps):
        t = time.perf_counter()
        pd.read_parquet(path)
        times["bare"].append(time.perf_counter() - t)

        t = time.perf_counter()
        assert pd.Index(pd.read_parquet(path)["id_str"]).is_unique
        times["is_unique"].append(time.perf_counter() - t)

        t = time.perf_counter()
        problems = find_problems(read_catalog(path), schema, str(path), check_files=False)
        times["ours"].append(time.perf_counter() - t)
        assert not problems, problems.report()
    return times


def memory_of(pid: int) -> tuple[float, float]:
    """(RSS, private = Private_Clean + Private_Dirty) in MB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        values[key] = int(value.split()[0]) / 1024
    return values["Rss"], values["Private_Clean"] + values["Private_Dirty"]


def worker_memory(catalog: pd.DataFrame, label_cols: list[str], samples: int) -> list[dict]:
    dataset = GalaxyDataset.from_catalog(catalog, label_cols, color=False, size=(424, 424))
    loader = LoaderSettings(batch_size=BATCH, num_workers=WORKERS, prefetch_factor=2).loader(
        dataset, shuffle=True
    )
    iterator = iter(loader)
    next(iterator)
    pids = [worker.pid for worker in multiprocessing.active_children()]  # the loader's workers
    assert len(pids) == WORKERS, pids
    start = {pid: memory_of(pid) for pid in pids}
    peak = dict(start)
    seen = BATCH
    t0 = time.perf_counter()
    while seen < samples:
        seen += next(iterator)["image"].shape[0]
        if seen % (BATCH * 20) == 0:
            for pid in pids:
                rss, private = memory_of(pid)
                peak[pid] = (max(rss, peak[pid][0]), max(private, peak[pid][1]))
    seconds = time.perf_counter() - t0
    end = {pid: memory_of(pid) for pid in pids}
    del iterator
    return [
        {
            "pid": pid,
            "rss0": start[pid][0],
            "rss1": end[pid][0],
            "rss_peak": peak[pid][0],
            "priv0": start[pid][1],
            "priv1": end[pid][1],
            "seconds": seconds,
            "samples": seen,
        }
        for pid in pids
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1_000_000, help="catalog rows (default: %(default)s)")
    parser.add_argument(
        "--samples", type=int, default=20_000, help="samples loaded for worker memory; 0 skips it"
    )
    args = parser.parse_args()
    schema = load_schema("decals_rings")
    WORK.mkdir(parents=True, exist_ok=True)
    paths = {
        "in order": WORK / f"catalog_{args.rows}.parquet",
        "shuffled": WORK / f"catalog_{args.rows}_shuffled.parquet",
    }
    times = {}
    for order, path in paths.items():
        if not path.is_file():
            make_catalog(path, args.rows, schema.label_cols, shuffled=order == "shuffled")
        times[order] = time_catalog(path, schema, args.reps)
    path = paths["in order"]
    df = read_catalog(path)
    t = time.perf_counter()
    file_problems = find_problems(df, schema, str(path), check_files=True)
    with_files = time.perf_counter() - t
    assert not file_problems, file_problems.report()

    print(f"machine: {machine()}")
    print(f"catalog: {path} ({args.rows:,} rows, {path.stat().st_size / 2**20:.0f} MiB, relative file_loc)")
    ratios = {}
    for order, timed in times.items():
        bare, is_unique, ours = (median(timed[k]) for k in ("bare", "is_unique", "ours"))
        ratios[order] = ours / bare
        print(f"ids {order}:")
        print(f"  bare pandas.read_parquet:                       {bare:6.3f} s {spread(timed['bare'])}")
        print(f"  ours read_catalog + find_problems(no files):    {ours:6.3f} s {spread(timed['ours'])}")
        print(
            f"  reference, read + pandas Index(id_str).is_unique: {is_unique:.3f} s "
            f"{spread(timed['is_unique'])} ({is_unique / bare:.2f}x the bare read)"
        )
    print(f"find_problems(check_files=True), ids in order (once): {with_files:.2f} s")
    memory = "not measured (--samples 0)"
    if args.samples:
        workers = worker_memory(df, schema.label_cols, args.samples)
        print(
            f"loader: {WORKERS} workers, batch {BATCH}, {workers[0]['samples']:,} samples in "
            f"{workers[0]['seconds']:.1f} s"
        )
        for w in workers:
            print(
                f"  worker {w['pid']}: RSS {w['rss0']:.0f} -> {w['rss1']:.0f} MB "
                f"(peak {w['rss_peak']:.0f}), growth "
                f"{w['rss1'] - w['rss0']:+.1f} MB; private {w['priv0']:.0f} -> {w['priv1']:.0f} MB"
            )
        growth = max(w["rss1"] - w["rss0"] for w in workers)
        memory = f"{growth:.1f} MB (target <50: {'met' if growth < 50 else 'NOT met'})"
    print(
        f"RATIOS memory: max per-worker RSS growth {memory}; "
        f"catalog load+validation / read_parquet {ratios['in order']:.2f}x "
        f"(target <3: {'met' if ratios['in order'] < 3 else 'NOT met'}; "
        f"with the rows shuffled {ratios['shuffled']:.2f}x)"
    )


if __name__ == "__main__":
    main()
