"""Catalogs: one row per galaxy with `id_str`, `file_loc` and integer vote counts per label column.

Everything here runs before a model is built, so a bad row costs seconds, not the hours a job waited
in the queue. Problems are collected, not raised one at a time: the error lists the first offending
rows of every kind and their total count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from zoobot_hpc.errors import InputError
from zoobot_hpc.schema import Schema

REQUIRED_COLUMNS = ("id_str", "file_loc")
SHOW_FIRST = 5


class CatalogError(InputError):
    """A catalog cannot be used; the message lists the offending rows, files or columns."""


CatalogLike = str | Path | pd.DataFrame


def read_catalog(catalog: CatalogLike) -> pd.DataFrame:
    """Read a CSV or Parquet catalog, or copy a DataFrame; `file_loc` is made absolute.

    Relative `file_loc` entries are relative to the catalog file's folder (or the working
    directory for a DataFrame).
    """
    if isinstance(catalog, pd.DataFrame):
        df, base = catalog.copy(), Path.cwd()
    else:
        path = Path(catalog)
        if not path.is_file():
            raise CatalogError(f"catalog file {path} does not exist")
        suffix = path.suffix.lower()
        try:
            if suffix == ".parquet":
                df = pd.read_parquet(path)
            elif suffix in (".csv", ".txt"):
                df = pd.read_csv(path, dtype={"id_str": str, "file_loc": str})
            else:
                raise CatalogError(
                    f"catalog {path}: use a .csv or .parquet file (got {suffix or 'no suffix'})"
                )
        except (ValueError, OSError) as err:
            if isinstance(err, CatalogError):
                raise
            raise CatalogError(f"catalog {path} could not be read: {err}") from err
        base = path.resolve().parent
    if "file_loc" in df.columns:
        df["file_loc"] = [_absolute(loc, base) for loc in df["file_loc"]]
    if "id_str" in df.columns:
        df["id_str"] = df["id_str"].astype(str)
    return df.reset_index(drop=True)


def _absolute(loc: object, base: Path) -> object:
    if not isinstance(loc, str) or not loc:
        return loc
    return loc if os.path.isabs(loc) else os.path.normpath(os.path.join(base, loc))


@dataclass
class Problems:
    """Problems found in one catalog, grouped by kind, each with its offending rows or files."""

    source: str
    kinds: dict[str, list[str]]

    def add(self, kind: str, items: Sequence[str]) -> None:
        if len(items):
            self.kinds.setdefault(kind, []).extend(items)

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def report(self) -> str:
        total = sum(len(items) for items in self.kinds.values())
        lines = [f"catalog {self.source}: {total} problem(s)"]
        for kind, items in self.kinds.items():
            shown = ", ".join(items[:SHOW_FIRST])
            more = f" ... and {len(items) - SHOW_FIRST} more" if len(items) > SHOW_FIRST else ""
            lines.append(f"  - {kind} ({len(items)}): {shown}{more}")
        return "\n".join(lines)


def find_problems(
    df: pd.DataFrame,
    schema: Schema,
    source: str,
    require_labels: bool = True,
    check_files: bool = True,
) -> Problems:
    """Every problem of a catalog at once: columns, votes, ids and image files (existence only)."""
    problems = Problems(source, {})
    needed = list(REQUIRED_COLUMNS) + (schema.label_cols if require_labels else [])
    missing = [c for c in needed if c not in df.columns]
    problems.add("missing columns (add them; vote columns are {question}_{answer})", missing)
    if len(df) == 0:
        problems.add("no rows", ["the catalog is empty"])
        return problems
    if "id_str" in df.columns:
        duplicated = df["id_str"][df["id_str"].duplicated(keep=False)]
        problems.add("duplicate id_str (ids must be unique)", _rows(duplicated.index, duplicated))
    if "file_loc" in df.columns:
        locs = df["file_loc"]
        empty = locs.isna() | (locs.astype(str).str.len() == 0)
        problems.add("empty file_loc", _rows(locs.index[empty]))
        if check_files:
            exists = np.fromiter((isinstance(p, str) and os.path.isfile(p) for p in locs), bool, len(locs))
            gone = ~exists & ~empty.to_numpy()
            problems.add(
                "image files that do not exist", [f"row {i}: {locs[i]}" for i in np.flatnonzero(gone)]
            )
    if require_labels:
        for column in (c for c in schema.label_cols if c in df.columns):
            _check_votes(df[column], column, problems)
    return problems


def _check_votes(values: pd.Series, column: str, problems: Problems) -> None:
    numeric = pd.to_numeric(values, errors="coerce")
    not_number = numeric.isna() & values.notna()
    problems.add(f"non-numeric votes in {column}", _rows(values.index[not_number], values[not_number]))
    problems.add(
        f"missing (NaN) votes in {column} (use 0 for a question not asked)",
        _rows(values.index[values.isna()]),
    )
    negative = numeric < 0
    problems.add(f"negative votes in {column}", _rows(values.index[negative], values[negative]))
    fractional = numeric.notna() & (numeric != np.floor(numeric))
    problems.add(
        f"non-integer votes in {column} (give counts, not fractions)",
        _rows(values.index[fractional], values[fractional]),
    )


def _rows(index: Sequence[int], values: Sequence[object] | None = None) -> list[str]:
    if values is None:
        return [f"row {i}" for i in index]
    return [f"row {i} ({v!r})" for i, v in zip(index, values, strict=True)]


def check_catalog(df: pd.DataFrame, schema: Schema, source: str, require_labels: bool = True) -> pd.DataFrame:
    """Raise `CatalogError` with every problem found, or return the catalog with integer votes."""
    problems = find_problems(df, schema, source, require_labels=require_labels)
    if problems:
        raise CatalogError(problems.report())
    if require_labels:
        df = df.copy()
        df[schema.label_cols] = df[schema.label_cols].apply(pd.to_numeric).astype(np.int64)
    return df


def split_catalog(
    df: pd.DataFrame, fractions: Sequence[float], random_state: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Shuffle with `random_state` and cut into train/val/test by `fractions` (summing to 1)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise CatalogError(f"split_fractions={tuple(fractions)}: give three fractions >= 0 that sum to 1")
    order = np.random.default_rng(random_state).permutation(len(df))
    n_train = round(fractions[0] * len(df))
    n_val = round(fractions[1] * len(df))
    shuffled = df.iloc[order].reset_index(drop=True)
    return (
        shuffled.iloc[:n_train].reset_index(drop=True),
        shuffled.iloc[n_train : n_train + n_val].reset_index(drop=True),
        shuffled.iloc[n_train + n_val :].reset_index(drop=True),
    )


@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def load_splits(
    schema: Schema,
    catalog: CatalogLike | None = None,
    train_catalog: CatalogLike | None = None,
    val_catalog: CatalogLike | None = None,
    test_catalog: CatalogLike | None = None,
    split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
    random_state: int = 42,
) -> Splits:
    """One catalog split by `random_state`, or the three splits as given; checked before use."""
    given = [c is not None for c in (train_catalog, val_catalog, test_catalog)]
    if catalog is not None and any(given):
        raise CatalogError(
            "give either catalog (split automatically) or train_catalog/val_catalog/test_catalog, not both"
        )
    if catalog is None and not all(given):
        if any(given):
            absent = [
                n
                for n, g in zip(("train_catalog", "val_catalog", "test_catalog"), given, strict=True)
                if not g
            ]
            raise CatalogError(f"pre-split catalogs need all three: {', '.join(absent)} missing")
        raise CatalogError("no catalog: give catalog=..., or train_catalog, val_catalog and test_catalog")
    if catalog is not None:
        df = check_catalog(read_catalog(catalog), schema, _name(catalog))
        parts = split_catalog(df, split_fractions, random_state)
    else:
        parts = tuple(
            check_catalog(read_catalog(c), schema, _name(c))
            for c in (train_catalog, val_catalog, test_catalog)
        )
        _check_disjoint(parts)
    for split, part in zip(("train", "val"), parts[:2], strict=True):
        if len(part) == 0:
            raise CatalogError(f"the {split} split is empty: give more galaxies or change split_fractions")
    return Splits(*parts)


def _check_disjoint(parts: Sequence[pd.DataFrame]) -> None:
    names = ("train", "val", "test")
    for i in range(3):
        for j in range(i + 1, 3):
            shared = np.intersect1d(parts[i]["id_str"].to_numpy(), parts[j]["id_str"].to_numpy())
            if len(shared):
                raise CatalogError(
                    f"{len(shared)} id_str appear in both the {names[i]} and {names[j]} catalogs "
                    f"(first: {', '.join(shared[:SHOW_FIRST])}); a galaxy must be in one split only"
                )


def _name(catalog: CatalogLike) -> str:
    return "(DataFrame)" if isinstance(catalog, pd.DataFrame) else str(catalog)
