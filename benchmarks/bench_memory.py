"""Memory and catalog handling at scale: a 1,000,000-row Parquet catalog (rows reuse the 370 shared
images), 4 loader workers, 20,000 samples.

1. Per-worker memory growth while loading: RSS and private (unique) memory of each worker after its
   first batch and after 20,000 samples; target < 50 MB RSS growth per worker.
2. Catalog load + validation without opening images, `read_catalog` + `find_problems(...,
   check_files=False)`, against a bare `pandas.read_parquet` of the same file; target < 3x.
   Also timed: the package's `check_catalog` path (which stats every file), and a vectorised
   prototype of `read_catalog` (proposed change, not in the package).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from common import SHARED_RINGS, WORK, machine, median, spread

from zoobot_hpc.catalog import CatalogError, _absolute, find_problems, read_catalog
from zoobot_hpc.data import GalaxyDataset, LoaderSettings
from zoobot_hpc.schema import load_schema

ROWS, WORKERS, SAMPLES, BATCH = 1_000_000, 4, 20_000, 64


def make_catalog(path: Path, rows: int, label_cols: list[str]) -> None:
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
    frame.to_parquet(path, index=False)


def read_catalog_vectorised(path: Path) -> pd.DataFrame:
    """Prototype of the proposed `read_catalog` (same result, no per-row Python in the common cases):
    relative `file_loc` get the catalog's folder prepended with vectorised Arrow string kernels;
    leading "../" segments are resolved by counting them (one `normpath` per count); only
    entries with "." or ".." segments further in, or doubled slashes, take the per-row path."""
    df = pd.read_parquet(path)
    base = str(path.resolve().parent)
    locs = df["file_loc"]
    if locs.isna().any() or (locs.str.len() == 0).any():  # let the package's path report them
        df["file_loc"] = [_absolute(loc, Path(base)) for loc in locs]
    else:
        text = pa.array(locs.array, pa.large_string())
        if isinstance(text, pa.ChunkedArray):
            text = text.combine_chunks()
        relative = np.asarray(pc.invert(pc.starts_with(text, "/")), dtype=bool)
        ups = np.zeros(len(text), dtype=np.int64)  # number of leading "../" segments
        for level in range(1, 256):
            leading = np.asarray(pc.starts_with(text, "../" * level), dtype=bool)
            if not leading.any():
                break
            ups += leading
        joined = text
        empty = pa.scalar("", pa.large_string())
        for level in np.unique(ups[relative]):
            mask = relative & (ups == level)
            prefix = os.path.normpath(os.path.join(base, *[".."] * int(level))).rstrip("/") + "/"
            rest = pc.utf8_slice_codeunits(pc.filter(text, mask), 3 * int(level))
            joined = pc.replace_with_mask(
                joined, mask, pc.binary_join_element_wise(pa.scalar(prefix, pa.large_string()), rest, empty)
            )
        result = joined.to_pandas(types_mapper=lambda t: locs.dtype).set_axis(df.index)
        # "/." finds every "." or ".." segment left (and harmless hidden names: normpath keeps them)
        odd = np.asarray(pc.match_substring(joined, "/."), dtype=bool)
        odd |= np.asarray(pc.match_substring(joined, "//"), dtype=bool)
        if odd.any():
            result[odd] = [os.path.normpath(p) for p in result[odd]]
        df["file_loc"] = result
    if not pd.api.types.is_string_dtype(df["id_str"]):
        df["id_str"] = df["id_str"].astype(str)
    return df.reset_index(drop=True)


def memory_of(pid: int) -> tuple[float, float]:
    """(RSS, private = Private_Clean + Private_Dirty) in MB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        values[key] = int(value.split()[0]) / 1024
    return values["Rss"], values["Private_Clean"] + values["Private_Dirty"]


def worker_memory(catalog: pd.DataFrame, label_cols: list[str]) -> list[dict]:
    dataset = GalaxyDataset.from_catalog(catalog, label_cols, color=False, size=(424, 424))
    loader = LoaderSettings(batch_size=BATCH, num_workers=WORKERS, prefetch_factor=2).loader(
        dataset, shuffle=True
    )
    iterator = iter(loader)
    next(iterator)
    pids = [w.pid for w in iterator._workers]
    start = {pid: memory_of(pid) for pid in pids}
    peak = dict(start)
    seen = BATCH
    t0 = time.perf_counter()
    while seen < SAMPLES:
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    schema = load_schema("decals_rings")
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"catalog_{ROWS}.parquet"
    if not path.is_file():
        make_catalog(path, ROWS, schema.label_cols)

    times: dict[str, list[float]] = {"bare": [], "ours": [], "ours_stat": [], "proto": []}
    for _ in range(args.reps):  # interleaved
        t = time.perf_counter()
        pd.read_parquet(path)
        times["bare"].append(time.perf_counter() - t)

        t = time.perf_counter()
        df = read_catalog(path)
        problems = find_problems(df, schema, str(path), check_files=False)
        times["ours"].append(time.perf_counter() - t)
        assert not problems, problems.report()

        t = time.perf_counter()
        proto = read_catalog_vectorised(path)
        proto_problems = find_problems(proto, schema, str(path), check_files=False)
        times["proto"].append(time.perf_counter() - t)
        assert not proto_problems
    assert proto["file_loc"].equals(df["file_loc"]) and proto["id_str"].equals(df["id_str"])
    # the training path (check_catalog) also stats every file: once, for information
    t = time.perf_counter()
    try:
        stat_problems = find_problems(df, schema, str(path), check_files=True)
    except CatalogError:
        stat_problems = None
    times["ours_stat"].append(time.perf_counter() - t)

    workers = worker_memory(df, schema.label_cols)
    bare, ours, proto_t = median(times["bare"]), median(times["ours"]), median(times["proto"])
    print(f"machine: {machine()}")
    print(f"catalog: {path} ({ROWS:,} rows, {path.stat().st_size / 2**20:.0f} MiB, relative file_loc)")
    print(f"bare pandas.read_parquet:                          {bare:6.2f} s {spread(times['bare'])}")
    print(f"ours read_catalog + find_problems(check_files=False): {ours:6.2f} s {spread(times['ours'])}")
    print(f"prototype vectorised read_catalog + find_problems:  {proto_t:6.2f} s {spread(times['proto'])}")
    print(
        f"find_problems(check_files=True) (stats 1M files, once): {times['ours_stat'][0]:6.2f} s "
        f"({'no problems' if stat_problems is not None and not stat_problems else 'problems'})"
    )
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
    print(
        f"RATIOS memory: max per-worker RSS growth {growth:.1f} MB "
        f"(target <50: {'met' if growth < 50 else 'NOT met'}); "
        f"catalog load+validation / read_parquet {ours / bare:.2f}x "
        f"(target <3: {'met' if ours / bare < 3 else 'NOT met'}); "
        f"vectorised prototype {proto_t / bare:.2f}x"
    )


if __name__ == "__main__":
    main()
