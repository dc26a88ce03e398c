"""Catalogs: one row per galaxy with `id_str`, `file_loc` and integer vote counts per label column.

Everything here runs before a model is built, so a bad row costs seconds, not the hours a job waited
in the queue. Problems are collected, not raised one at a time: the error lists the first offending
rows of every kind and their total count.

A catalog may have millions of rows, so no check loops over rows in Python: votes are checked as
numpy arrays, paths as Arrow string arrays, and per-path work (listing a folder to see which images
exist) is done once per distinct folder, not once per row.
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from zoobot_hpc.errors import InputError, InputWarning
from zoobot_hpc.schema import Schema, builtin_schema_names, load_schema

REQUIRED_COLUMNS = ("id_str", "file_loc")
SHOW_FIRST = 5
MAX_VOTES = np.iinfo(np.int32).max  # the data loader holds votes as int32


class CatalogError(InputError):
    """A catalog cannot be used; the message lists the offending rows, files or columns."""


CatalogLike = str | Path | pd.DataFrame


# ------------------------------------------------------------------------------------------ reading
def read_catalog(catalog: CatalogLike) -> pd.DataFrame:
    """Read a CSV or Parquet catalog, or copy a DataFrame; `file_loc` is made absolute.

    Relative `file_loc` entries are relative to the catalog file's folder (or the working
    directory for a DataFrame). Missing ids and paths stay missing (NaN), for `find_problems`.
    """
    if isinstance(catalog, pd.DataFrame):
        df, base = catalog, Path.cwd()
    else:
        path = Path(catalog)
        df, base = _read_file(path), path.resolve().parent
    df = df.reset_index(drop=True)  # a copy: rows are numbered from 0 in every message
    if "file_loc" in df.columns:
        df["file_loc"] = absolute_paths(df["file_loc"], base)
    if "id_str" in df.columns and not isinstance(df["id_str"].dtype, pd.StringDtype):
        df["id_str"] = df["id_str"].astype(str).where(df["id_str"].notna())
    return df


def _read_file(path: Path) -> pd.DataFrame:
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise CatalogError(f"catalog file {path} does not exist{where}; check the path")
    if path.is_dir():
        raise CatalogError(f"catalog {path} is a folder; give the .csv or .parquet file in it")
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv", ".txt"):
        raise CatalogError(f"catalog {path}: use a .csv or .parquet file (got {suffix or 'no suffix'})")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        df = pd.read_csv(path, dtype=_text_columns(path), skipinitialspace=True)
    except pd.errors.EmptyDataError as err:
        raise CatalogError(
            f"catalog {path} is empty; it needs a header line (id_str,file_loc,<vote columns>) "
            "and one line per galaxy"
        ) from err
    except (ValueError, OSError) as err:
        raise CatalogError(f"catalog {path} could not be read ({err}); {_format_hint(path)}") from err
    df.columns = [str(c).strip() for c in df.columns]  # "id_str, file_loc" headers are common
    return df


def _text_columns(path: Path) -> dict[str, type]:
    """dtype=str for id_str and file_loc under their names as written ("id_str ", say): ids like
    00042 must not be read as numbers, and pandas matches dtype before the names are stripped."""
    header = pd.read_csv(path, nrows=0, skipinitialspace=True).columns
    return {name: str for name in header if str(name).strip() in ("id_str", "file_loc")}


def _format_hint(path: Path) -> str:
    """What to do when a catalog does not parse: most often its suffix names the other format."""
    with open(path, "rb") as f:
        head = f.read(4)
    is_parquet, named_parquet = head == b"PAR1", path.suffix.lower() == ".parquet"
    if named_parquet != is_parquet:
        return (
            "it is a Parquet file: name it .parquet"
            if is_parquet
            else "it is not a Parquet file (CSV? name it .csv)"
        )
    return "check that it is complete (write it again)"


def absolute_paths(paths: pd.Series, base: Path) -> pd.Series:
    """Relative entries joined to `base`; absolute ones unchanged.

    Not normalised: a "../" is resolved by the operating system when the file is opened, as for any
    path (`normpath` would change what a path through a symbolic link means), and a million rows
    cost one Arrow prepend (a third of the time of Arrow's element-wise join).
    """
    text = arrow_strings(paths)
    relative = np.asarray(pc.invert(pc.starts_with(text, "/")).fill_null(False)) & _non_empty(text)
    if relative.any():
        joined = pc.binary_replace_slice(text, 0, 0, str(base).rstrip("/") + "/")
        text = joined if relative.all() else pc.if_else(pa.array(relative), joined, text)
    dtype = paths.dtype if isinstance(paths.dtype, pd.StringDtype) else None
    return text.to_pandas(types_mapper=lambda _: dtype).set_axis(paths.index)


def _non_empty(text: pa.Array) -> np.ndarray:
    return np.asarray(pc.greater(pc.binary_length(text), 0).fill_null(False))


def arrow_strings(values: pd.Series) -> pa.Array:
    """The values as one Arrow large_string array, nulls kept (zero-copy for pandas' Arrow strings).

    Also how the data loader holds its paths: one buffer, no per-row Python objects."""
    if not isinstance(values.dtype, pd.StringDtype):
        values = values.astype(str).where(values.notna(), None)  # Path objects, numbers
    text = pa.array(values, from_pandas=True)
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    return text.cast(pa.large_string())


def _split_folders(paths: pa.Array) -> tuple[pa.DictionaryArray, pa.Array]:
    """(folder, name) of paths that all contain "/", folders dictionary-encoded (a few distinct ones)."""
    parts = pc.split_pattern(paths, "/", max_splits=1, reverse=True)
    return pc.dictionary_encode(pc.list_element(parts, 0)), pc.list_element(parts, 1)


# ------------------------------------------------------------------------------------------ checking
@dataclass
class Problems:
    """Problems found in one catalog, grouped by kind, each with its offending rows or files."""

    source: str
    kinds: dict[str, list[str]]
    advice: list[str] = field(default_factory=list)

    def add(self, kind: str, items: Sequence[str], advice: str = "") -> None:
        if len(items):
            self.kinds.setdefault(kind, []).extend(items)
            if advice and advice not in self.advice:
                self.advice.append(advice)

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def report(self) -> str:
        total = sum(len(items) for items in self.kinds.values())
        lines = [f"catalog {self.source}: {total} problem(s)"]
        for kind, items in self.kinds.items():
            shown = ", ".join(items[:SHOW_FIRST])
            more = f" ... and {len(items) - SHOW_FIRST} more" if len(items) > SHOW_FIRST else ""
            lines.append(f"  - {kind} ({len(items)}): {shown}{more}")
        fix = f"Fix these in {self.source} (or remove those rows) and run again."
        if any(item.startswith("row ") for items in self.kinds.values() for item in items[:1]):
            fix += " Rows count from 0, the header excluded."
        return "\n".join([*lines, " ".join([fix, *self.advice])])


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
    kind = "missing columns (add them; vote columns are {question}_{answer})"
    fits = _fitting_schema(df, schema) if set(missing) & set(schema.label_cols) else None
    if fits:
        problems.add(f"{kind}; the columns fit the built-in schema {fits!r}: use schema={fits}", missing)
    else:
        problems.add(kind, _with_close_names(missing, df.columns))
    if len(df) == 0:
        problems.add("no rows (add one line per galaxy)", ["the catalog is empty"])
        return problems
    if "id_str" in df.columns:
        _check_ids(df["id_str"], problems)
    if "file_loc" in df.columns:
        _check_paths(df["file_loc"], check_files, problems)
    if require_labels:
        counts = [_check_votes(df[c], c, problems) for c in schema.label_cols if c in df.columns]
        if not missing and not any(np.nan_to_num(c, nan=1).any() for c in counts):
            problems.add(
                "no votes at all (the model would learn nothing; are these the vote count columns?)",
                ["every row has 0 votes in every vote column"],
            )
    return problems


def _fitting_schema(df: pd.DataFrame, schema: Schema) -> str | None:
    """A built-in schema other than `schema` whose vote columns the catalog has: the likely mix-up."""
    for name in builtin_schema_names():
        if name != schema.name and set(load_schema(name).label_cols) <= set(df.columns):
            return name
    return None


def _with_close_names(missing: list[str], columns: Sequence[object]) -> list[str]:
    """Missing column names, each with the catalog's column it was probably meant to be."""
    present = [str(c) for c in columns]
    items = []
    for name in missing:
        close = difflib.get_close_matches(name, present, n=1, cutoff=0.75)
        items.append(f"{name} (rename {close[0]!r}?)" if close else name)
    return items


def _check_ids(ids: pd.Series, problems: Problems) -> None:
    text = arrow_strings(ids)
    empty = ~_non_empty(text)
    problems.add("empty id_str (give every galaxy an id)", _rows(np.flatnonzero(empty)))
    if _all_distinct(text):  # the common case, proved without naming the rows that repeat
        return
    duplicated = _duplicated(text) & ~empty
    problems.add("duplicate id_str (ids must be unique)", _rows(*_where(duplicated, ids)))


def _all_distinct(values: pa.Array) -> bool:
    """Whether no value occurs twice (null counts as a value).

    Catalogs are often written sorted by id: one comparison of neighbours proves those distinct
    (a million ids in milliseconds). Otherwise one Arrow hash pass counts the distinct values.
    """
    if len(values) < 2 or pc.all(pc.less(values[:-1], values[1:]), skip_nulls=False).as_py():
        return True
    return len(pc.unique(values)) == len(values)


def _duplicated(values: pa.Array) -> np.ndarray:
    """Rows whose value occurs more than once: one hash pass (Arrow) and a count per value (numpy)."""
    encoded = pc.dictionary_encode(values, null_encoding="encode")
    codes = encoded.indices.to_numpy()
    return np.bincount(codes, minlength=len(encoded.dictionary))[codes] > 1


def _check_paths(locs: pd.Series, check_files: bool, problems: Problems) -> None:
    text = arrow_strings(locs)
    empty = ~_non_empty(text)
    problems.add("empty file_loc", _rows(np.flatnonzero(empty)))
    if check_files:
        gone = np.flatnonzero(~empty & ~files_exist(text, ~empty))
        problems.add(
            "image files that do not exist",
            [
                f"row {i}: {locs.iat[i]}{_not_a_file(locs.iat[i]) if n < SHOW_FIRST else ''}"
                for n, i in enumerate(gone)
            ],
            advice="A relative file_loc is read from the catalog file's folder (from the working "
            "directory for a DataFrame).",
        )


def _not_a_file(path: str) -> str:
    """Why a path is no image file: not a regular file, or behind a folder this user cannot enter
    (empty if it simply does not exist)."""
    if os.path.isdir(path):
        return " (a folder, not an image file)"
    if os.path.exists(path):
        return " (exists but is not a regular file: a FIFO, socket or device)"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):  # the nearest folder above it that this user can see
        folder = os.path.dirname(folder)
    if not os.access(folder, os.X_OK):
        return f" (this user cannot enter {folder}: check its permissions)"
    return ""


def files_exist(paths: pa.Array, candidates: np.ndarray) -> np.ndarray:
    """Which `paths` (where `candidates`) are existing files, listing each folder once.

    One `os.scandir` per distinct folder replaces a stat per row; a folder far larger than the rows
    that use it (a survey's image store behind a small catalog) is not listed: its rows are stat'ed.
    """
    exists = np.zeros(len(paths), dtype=bool)
    has_folder = candidates & np.asarray(pc.match_substring(paths, "/").fill_null(False))
    rows = np.flatnonzero(has_folder)
    full = paths.take(pa.array(rows))
    folders, _ = _split_folders(full)
    codes = folders.indices.to_numpy()
    uses = np.bincount(codes, minlength=len(folders.dictionary))
    listed: list[str] = []
    stat_codes = []
    for code, folder in enumerate(folders.dictionary.to_pylist()):
        files = _files_in(folder or "/", budget=8 * int(uses[code]) + 64)
        if files is None:
            stat_codes.append(code)
        else:
            listed.extend(f"{folder}/{name}" for name in files)
    exists[rows] = np.asarray(pc.is_in(full, value_set=pa.array(listed, pa.large_string())))
    to_stat = np.concatenate([rows[np.isin(codes, stat_codes)], np.flatnonzero(candidates & ~has_folder)])
    for i in to_stat:
        exists[i] = os.path.isfile(paths[int(i)].as_py())
    return exists


def _files_in(folder: str, budget: int) -> list[str] | None:
    """Names of the files in `folder` ([] if it does not exist), or None (stat each file instead)
    past `budget` entries or if it may be entered but not listed (mode 711)."""
    names = []
    try:
        with os.scandir(folder) as entries:
            for count, entry in enumerate(entries):
                if count >= budget:
                    return None
                if entry.is_file():
                    names.append(entry.name)
    except PermissionError:
        return None
    except OSError:
        return []
    return names


def _check_votes(values: pd.Series, column: str, problems: Problems) -> np.ndarray:
    """Record the problems of one vote column; return its counts as numbers (NaN where unusable)."""
    if isinstance(values.dtype, np.dtype) and values.dtype.kind in "iu":  # Parquet, clean CSV: no NaN
        counts = values.to_numpy()
    else:
        counts = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        present = values.notna().to_numpy()
        not_number = np.isnan(counts) & present
        problems.add(f"non-numeric votes in {column}", _rows(*_where(not_number, values)))
        problems.add(
            f"missing (NaN) votes in {column} (use 0 for a question not asked)",
            _rows(np.flatnonzero(~present)),
        )
        fractional = ~np.isnan(counts) & ~(np.isfinite(counts) & (counts == np.floor(counts)))
        problems.add(
            f"non-integer votes in {column} (give counts, not fractions)", _rows(*_where(fractional, values))
        )
    problems.add(f"negative votes in {column}", _rows(*_where(counts < 0, values)))
    too_large = counts > MAX_VOTES
    problems.add(f"votes in {column} too large for counts (> {MAX_VOTES})", _rows(*_where(too_large, values)))
    return counts


def _where(mask: np.ndarray, values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    rows = np.flatnonzero(mask)
    return rows, values.iloc[rows].to_numpy()


def _rows(rows: np.ndarray, values: Sequence[object] | None = None) -> list[str]:
    if values is None:
        return [f"row {i}" for i in rows]
    return [f"row {i} ({_plain(v)!r})" for i, v in zip(rows, values, strict=True)]


def _plain(value: object) -> object:
    """numpy scalars as Python numbers, so that messages read `row 4 (-2)`."""
    return value.item() if isinstance(value, np.generic) else value


def check_catalog(df: pd.DataFrame, schema: Schema, source: str, require_labels: bool = True) -> pd.DataFrame:
    """Raise `CatalogError` with every problem found, or return the catalog with integer votes."""
    problems = find_problems(df, schema, source, require_labels=require_labels)
    if problems:
        raise CatalogError(problems.report())
    if require_labels:
        df = df.copy()
        df[schema.label_cols] = df[schema.label_cols].apply(pd.to_numeric).astype(np.int64)
    return df


# ------------------------------------------------------------------------------------------ splitting
def split_catalog(
    df: pd.DataFrame, fractions: Sequence[float], random_state: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Shuffle with `random_state` and cut into train/val/test by `fractions` (summing to 1)."""
    fractions = check_fractions(fractions)
    order = np.random.default_rng(random_state).permutation(len(df))
    n_train = round(fractions[0] * len(df))
    n_val = round(fractions[1] * len(df))
    shuffled = df.iloc[order].reset_index(drop=True)
    return (
        shuffled.iloc[:n_train].reset_index(drop=True),
        shuffled.iloc[n_train : n_train + n_val].reset_index(drop=True),
        shuffled.iloc[n_train + n_val :].reset_index(drop=True),
    )


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """Three train/val/test fractions >= 0 summing to 1, or a `CatalogError` that says so."""
    try:
        values = () if isinstance(fractions, str) else tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(v >= 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise CatalogError(
            f"split_fractions={fractions!r}: give three fractions >= 0 that sum to 1, e.g. [0.7, 0.1, 0.2]"
        )
    return values


@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame

    def check_batches(self, batch_size: int, ranks: int) -> None:
        """Refuse a train split that gives a rank batches of one galaxy; warn when it is under one batch.

        A batch of one galaxy fails in BatchNorm ("Expected more than 1 value per channel") once
        training has started; a split smaller than `batch_size` trains on one partial batch per epoch.
        """
        per_rank = math.ceil(len(self.train) / ranks)
        if per_rank < 2:
            raise CatalogError(
                f"the train split has {len(self.train)} galaxy(ies) for {ranks} rank(s): every training "
                "batch needs at least 2 galaxies per rank; give more galaxies or change split_fractions"
            )
        if per_rank < batch_size:
            warnings.warn(
                f"the train split ({len(self.train)} galaxies) is smaller than one batch (batch_size="
                f"{batch_size} x {ranks} rank(s)): each epoch is one partial batch of {per_rank}; lower "
                "batch_size or give more galaxies",
                InputWarning,
                stacklevel=2,
            )


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
        check_fractions(split_fractions)  # before a large catalog is read
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
