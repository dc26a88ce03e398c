"""Predict from a checkpoint: MC-dropout posteriors for folders, catalogs or lists of images.

Dropout lives only in the head, so each image goes through the encoder once and the head
`n_samples` times with dropout on: the same posterior as `n_samples` full forward passes (the
encoder is deterministic in eval mode) for about 1/n of the encoder cost.

Everything the model needs (schema, channels, eval transform) comes from the checkpoint.

Outputs are written to a temporary name and renamed (`zoobot_hpc.atomic`), so a killed run never
leaves half a file under a final name. With `num_shards`, `save_path` is a folder of
`part-{k:05d}-of-{n:05d}.parquet` files (contiguous blocks of the inputs in their stable order);
a complete part is skipped on rerun, and `merge_parts` joins them after checking the set.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from zoobot_hpc import __version__
from zoobot_hpc.atomic import atomic_path, remove_stale_temporaries, write_text
from zoobot_hpc.bad_images import check_policy, write_skip_list
from zoobot_hpc.catalog import CatalogError, find_problems, read_catalog
from zoobot_hpc.checkpoint import CheckpointError
from zoobot_hpc.data import (
    IMAGE_SUFFIXES,
    GalaxyDataset,
    ImageError,
    LoaderSettings,
    common_image_size,
    loader_errors_explained,
)
from zoobot_hpc.errors import InputError, check_whole
from zoobot_hpc.hardware import channels_last_suits
from zoobot_hpc.schema import Schema

log = logging.getLogger(__name__)

METADATA_KEY = b"zoobot_hpc"
OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv"}  # the suffixes catalogs take too
PART_PATTERN = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")
# metadata that must agree between parts of one prediction run
RUN_KEYS = ("checkpoint_sha256", "schema", "n_samples", "dropout", "inputs", "inputs_sha256", "num_shards")

ImagesLike = str | Path | pd.DataFrame | Sequence[str | Path]


class PredictionError(InputError):
    """Prediction inputs, outputs or parts cannot be used; the message names the file or shard."""


# ---------------------------------------------------------------------------------------------- model
def load_model(checkpoint: str | Path) -> Any:
    """The `GalaxyZooModel` of a checkpoint on the CPU in eval mode, or a `CheckpointError` naming it."""
    from zoobot_hpc.galaxy_model import GalaxyZooModel

    path = Path(checkpoint).expanduser()
    if path.is_dir():  # often a run's save_dir
        found = sorted([*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")])[:3]
        raise CheckpointError(
            f"checkpoint {path} is a folder; give the path of one .ckpt file"
            + (f", e.g. {', '.join(map(str, found))}" if found else "")
        )
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; give the path of a .ckpt file from training"
        )
    try:
        model = GalaxyZooModel.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:  # torch/pickle/zip errors differ by corruption; all mean the same here
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded as a zoobot-hpc model ({type(err).__name__}: {err}); "
            "it is corrupt, truncated or not a checkpoint written by zoobot-hpc train"
        ) from err
    return model.eval()


def file_sha256(path: Path) -> str:
    """sha256 of a file: identifies a checkpoint wherever it was copied, and a CSV to its metadata."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_concentrations(
    model: Any, images: torch.Tensor, n_samples: int, dropout: bool = True
) -> torch.Tensor:
    """(B, n_samples, answers) concentrations of uint8 images: the encoder once, the head n times.

    With `dropout=False` the head runs once without dropout and the result has one sample.
    """
    features = model.encode(model.augment(images, train=False))
    if not dropout:
        return model.head(features, dropout=False).unsqueeze(1)
    return torch.stack([model.head(features, dropout=True) for _ in range(n_samples)], dim=1)


def full_pass_samples(model: Any, images: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Reference for tests and benchmarks: n complete forward passes with dropout (what Zoobot does)."""
    return torch.stack(
        [model(model.augment(images, train=False), dropout=True) for _ in range(n_samples)], dim=1
    )


def resolve_device(gpus: int = 0, device: str | None = None) -> torch.device:
    """One device per prediction process; more GPUs are used by running more shards."""
    if device is not None:
        return torch.device(device)
    if not isinstance(gpus, int) or gpus < 0:
        raise PredictionError(f"gpus={gpus!r}: use 0 (CPU) or 1")
    if gpus > 1:
        raise PredictionError(
            f"gpus={gpus}: prediction runs on one device per process; to use {gpus} GPUs run {gpus} shards "
            f"at once (e.g. a Slurm job array with --num-shards {gpus} --shard-index $SLURM_ARRAY_TASK_ID)"
        )
    if gpus == 1:
        if not torch.cuda.is_available():
            raise PredictionError("gpus=1 but no CUDA device is visible; use gpus=0 to predict on the CPU")
        return torch.device("cuda")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------- inputs
def resolve_inputs(images: ImagesLike) -> pd.DataFrame:
    """`id_str` and absolute `file_loc` of every input, in a stable order.

    A folder is searched recursively for .png/.jpg/.jpeg files, sorted by relative path; a list
    (or one image file) keeps its order. Their ids are file stems, made unique by `_unique_ids`.
    A catalog (CSV/Parquet path or DataFrame) gives its own `id_str`; vote columns are ignored.
    """
    if isinstance(images, pd.DataFrame) or (
        isinstance(images, str | Path) and Path(images).suffix.lower() in (".csv", ".parquet")
    ):
        return _catalog_inputs(images)
    if isinstance(images, str | Path):
        folder = Path(images).expanduser()
        if not folder.exists():
            raise PredictionError(
                f"images {folder} do not exist; give a folder, a catalog or a list of files"
            )
        if folder.is_file() and folder.suffix.lower() in IMAGE_SUFFIXES:
            return _list_inputs([folder.resolve()])
        if folder.is_file():
            raise PredictionError(
                f"images {folder}: a single file is neither a catalog nor an image; use a .csv or .parquet "
                f"catalog, a folder, a list of image paths or one {'/'.join(IMAGE_SUFFIXES)} image"
            )
        return _folder_inputs(folder.resolve())
    return _list_inputs([Path(p).expanduser().resolve() for p in images])


def _folder_inputs(folder: Path) -> pd.DataFrame:
    files = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        others = sorted({p.suffix.lower() or p.name for p in folder.rglob("*") if p.is_file()})
        found = f"; it holds {', '.join(others[:5])} files" if others else ""
        raise PredictionError(
            f"no images in {folder} (searched recursively for {', '.join(IMAGE_SUFFIXES)}){found}. Give a "
            "folder of PNG/JPEG images, or a catalog (CSV/Parquet with id_str, file_loc) or a list of "
            "image files"
        )
    names = [p.relative_to(folder).as_posix() for p in files]
    return _frame(files, names)


def _list_inputs(files: list[Path]) -> pd.DataFrame:
    if not files:
        raise PredictionError("the list of images is empty")
    seen: dict[Path, int] = {}
    for i, path in enumerate(files):
        if path in seen:
            raise PredictionError(f"image {path} is listed twice (items {seen[path]} and {i}); list it once")
        seen[path] = i
    return _frame(files, [p.as_posix() for p in files])


def _frame(files: list[Path], names: list[str]) -> pd.DataFrame:
    ids = _unique_ids(files, names)
    renamed = [i for i, p in zip(ids, files, strict=True) if i != p.stem]
    if renamed:
        log.warning(
            "%d images share a file stem; their id_str is the path without suffix, or with it where "
            "that still repeats (e.g. %s)",
            len(renamed),
            renamed[0],
        )
    return pd.DataFrame({"id_str": ids, "file_loc": [str(p) for p in files]})


def _unique_ids(files: list[Path], names: list[str]) -> list[str]:
    """File stems; each clashing id steps to the path without suffix, then to the path, until none clash.

    One pass is not enough: a longer id can equal another file's stem (`a.jpg`, `a.png` and
    `a.jpg.png`). The paths (`names`) are unique, so the loop ends.
    """
    forms = [(p.stem, str(Path(n).with_suffix("")), n) for p, n in zip(files, names, strict=True)]
    level = np.zeros(len(forms), dtype=int)
    while True:
        ids = pd.Series([form[k] for form, k in zip(forms, level, strict=True)])
        clash = ids.duplicated(keep=False).to_numpy() & (level < 2)
        if not clash.any():
            return list(ids)
        level += clash


def _catalog_inputs(catalog: str | Path | pd.DataFrame) -> pd.DataFrame:
    source = "(DataFrame)" if isinstance(catalog, pd.DataFrame) else str(catalog)
    df = read_catalog(catalog)
    no_votes = Schema({"q": ["a"]}, {"q": None})  # vote columns are ignored: only ids and paths matter
    problems = find_problems(df, no_votes, source, require_labels=False, check_files=False)
    if problems:
        raise CatalogError(problems.report())
    return df[["id_str", "file_loc"]].astype(str).reset_index(drop=True)


def check_files_exist(inputs: pd.DataFrame) -> None:
    """Every missing image at once, before any model work (the `error` policy)."""
    missing = [loc for loc in inputs["file_loc"] if not Path(loc).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ImageError(
            f"{len(missing)} image file(s) do not exist: {shown}; fix the paths, or pass "
            "on_bad_image='skip' (--on-bad-image skip) to predict the others and list these"
        )


def shard_bounds(n_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """[start, end) of each shard: contiguous blocks differing in size by at most one row."""
    edges = np.linspace(0, n_rows, num_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def part_name(shard_index: int, num_shards: int) -> str:
    return f"part-{shard_index:05d}-of-{num_shards:05d}.parquet"


def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


# --------------------------------------------------------------------------------------- predicting
@dataclass
class Predictions:
    """Samples of one run over some inputs, and the inputs it skipped."""

    ids: pd.Series  # text, indexed 0..n-1 like `samples` (no fixed-width copy: 4 bytes per character)
    file_locs: pd.Series
    samples: np.ndarray  # (galaxies, samples, answers) float32 concentrations
    skipped: list[dict[str, str]] = field(default_factory=list)


def predict_inputs(
    model: Any,
    inputs: pd.DataFrame,
    n_samples: int = 5,
    dropout: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    on_bad_image: str = "error",
    progress: bool = True,
    description: str = "predicting",
) -> Predictions:
    """Concentration samples of every input row (in memory; `predict` writes them to files)."""
    device = torch.device(device)
    model = model.to(device).eval()
    # (prediction runs in full precision)
    model.use_channels_last(channels_last_suits(device.type == "cpu", mixed_precision=False))
    color = model.hparams.channels == 3
    size = common_image_size(inputs["file_loc"].array, fallback=model.hparams.resize_size)
    dataset = GalaxyDataset(inputs["file_loc"], None, color, size, model.hparams.grey)  # as trained
    settings = LoaderSettings(batch_size, num_workers, 2, pin_memory=device.type == "cuda", timeout_s=600)
    samples_per_image = n_samples if dropout else 1
    out = np.zeros((len(inputs), samples_per_image, len(model.schema.label_cols)), dtype=np.float32)
    ok = np.zeros(len(inputs), dtype=bool)
    skipped: list[dict[str, str]] = []
    with (
        _progress_bar(len(inputs), progress, description) as bar,
        torch.inference_mode(),
        loader_errors_explained(settings),
    ):
        for batch in settings.loader(dataset, shuffle=False):
            index = batch["index"].numpy()
            good = batch["ok"].numpy().astype(bool)
            for i in np.flatnonzero(~good):
                skipped.append(_bad_image(inputs, int(index[i]), batch["error"][i], on_bad_image))
            if good.any():
                images = batch["image"][torch.from_numpy(good)].to(device, non_blocking=True)
                out[index[good]] = (
                    sample_concentrations(model, images, n_samples, dropout).float().cpu().numpy()
                )
                ok[index[good]] = True
            bar.update(len(index))
    kept = inputs[ok].reset_index(drop=True)
    return Predictions(kept["id_str"], kept["file_loc"], out[ok], skipped)


def _bad_image(inputs: pd.DataFrame, row: int, message: str, policy: str) -> dict[str, str]:
    if policy == "error":
        raise ImageError(f"{message} (or pass on_bad_image='skip' to predict the other images)")
    log.warning("skipped: %s", message)
    return {
        "id_str": str(inputs["id_str"].iat[row]),
        "file_loc": str(inputs["file_loc"].iat[row]),
        "reason": message,
    }


class _progress_bar:
    """tqdm over images on stderr, or nothing."""

    def __init__(self, total: int, enabled: bool, description: str) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", desc=description, file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> _progress_bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)


# ------------------------------------------------------------------------------------------ columns
def prediction_columns(samples: np.ndarray, schema: Schema) -> dict[str, np.ndarray]:
    """Per answer: mean concentration, expected vote fraction; per question: probability of reaching it.

    The expected vote fraction is the posterior mean of the answer's share of its question's votes
    (the Dirichlet mean, averaged over the samples); the reach probability multiplies the expected
    fractions of the answers that lead to the question.
    """
    groups = schema.answer_to_question_matrix.numpy().astype(np.float64)
    conc = samples.astype(np.float64)
    fractions = (conc / ((conc @ groups) @ groups.T)).mean(axis=1) if len(conc) else conc.mean(axis=1)
    reach = schema.reach_probability(fractions) if len(conc) else np.zeros((0, len(schema.questions)))
    columns: dict[str, np.ndarray] = {}
    for j, col in enumerate(schema.label_cols):
        columns[f"{col}_concentration"] = samples[:, :, j].mean(axis=1).astype(np.float32)
        columns[f"{col}_fraction"] = fractions[:, j].astype(np.float32)
    for j, question in enumerate(schema.question_names):
        columns[f"{question}_reach"] = reach[:, j].astype(np.float32)
    return columns


def _arrow_table(pred: Predictions, schema: Schema, metadata: dict[str, Any]) -> pa.Table:
    n_samples = pred.samples.shape[1]
    columns: dict[str, pa.Array] = {
        "id_str": pa.array(pred.ids, pa.string()),
        "file_loc": pa.array(pred.file_locs, pa.string()),
    }
    derived = prediction_columns(pred.samples, schema)
    for j, col in enumerate(schema.label_cols):
        flat = pa.array(np.ascontiguousarray(pred.samples[:, :, j]).reshape(-1), pa.float32())
        columns[f"{col}_concentration"] = pa.array(derived[f"{col}_concentration"])
        columns[f"{col}_samples"] = pa.FixedSizeListArray.from_arrays(flat, n_samples)
        columns[f"{col}_fraction"] = pa.array(derived[f"{col}_fraction"])
    for question in schema.question_names:
        columns[f"{question}_reach"] = pa.array(derived[f"{question}_reach"])
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})


def _csv_frame(pred: Predictions, schema: Schema) -> pd.DataFrame:
    derived = prediction_columns(pred.samples, schema)
    columns: dict[str, Any] = {"id_str": pred.ids, "file_loc": pred.file_locs}
    for j, col in enumerate(schema.label_cols):
        columns[f"{col}_concentration"] = derived[f"{col}_concentration"]
        for s in range(pred.samples.shape[1]):
            columns[f"{col}_s{s}"] = pred.samples[:, s, j]
        columns[f"{col}_fraction"] = derived[f"{col}_fraction"]
    for question in schema.question_names:
        columns[f"{question}_reach"] = derived[f"{question}_reach"]
    return pd.DataFrame(columns)


def output_format(path: Path) -> str:
    if path.suffix.lower() in OUTPUT_FORMATS:
        return OUTPUT_FORMATS[path.suffix.lower()]
    raise PredictionError(f"output {path}: use a .parquet (recommended) or .csv file name")


def write_predictions(pred: Predictions, schema: Schema, path: Path, metadata: dict[str, Any]) -> None:
    """Parquet (metadata inside) or CSV (metadata in `<path>.meta.json`), each written atomically.

    Skipped images are listed in `<path>.skipped.txt` (removed when nothing was skipped).
    """
    metadata = {**metadata, "skipped": pred.skipped}
    if output_format(path) == "parquet":
        with atomic_path(path) as tmp:
            pq.write_table(_arrow_table(pred, schema, metadata), tmp)
    else:
        _write_csv_pair(pred, schema, path, metadata)
    write_skip_list(skip_list_path(path), pred.skipped)


def _write_csv_pair(pred: Predictions, schema: Schema, path: Path, metadata: dict[str, Any]) -> None:
    """The CSV first, then `<path>.meta.json` holding the CSV's sha256 (`csv_sha256`).

    No rename replaces two files at once. In this order a kill while the (long) CSV is written
    keeps the old pair, and a kill between the two renames leaves the new CSV with the old metadata,
    which `read_metadata` refuses by the digest. A digest of the whole file, not of its ids, so a
    rerun over the same galaxies with other settings cannot pass either.
    """
    with atomic_path(path) as tmp:
        _csv_frame(pred, schema).to_csv(tmp, index=False)
        digest = file_sha256(tmp)
    write_text(_meta_path(path), json.dumps({**metadata, "csv_sha256": digest}, indent=1))


def _remove_stale_outputs(path: Path) -> None:
    """Delete the temporaries a killed writer of `path` (and of its metadata and skip list) left."""
    for target in (path, _meta_path(path), skip_list_path(path)):
        remove_stale_temporaries(target)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def skip_list_path(path: Path) -> Path:
    return path.with_name(path.name + ".skipped.txt")


# ---------------------------------------------------------------------------------------- reading
def read_metadata(path: str | Path) -> dict[str, Any]:
    """The zoobot-hpc metadata of a prediction file (Parquet footer, or the CSV's .meta.json)."""
    path = Path(path)
    if output_format(path) == "csv":
        return _csv_metadata(path)
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as err:
        raise PredictionError(f"prediction file {path} cannot be read ({err})") from err
    return json.loads(raw[METADATA_KEY]) if METADATA_KEY in raw else {}


def _csv_metadata(path: Path) -> dict[str, Any]:
    """The CSV's .meta.json, refused if it records another CSV's sha256 (see `_write_csv_pair`;
    metadata written before that check records none)."""
    meta = _meta_path(path)
    if not meta.is_file():
        return {}
    metadata = json.loads(meta.read_text())
    expected = metadata.get("csv_sha256")
    if expected is not None and expected != file_sha256(path):
        raise PredictionError(
            f"{meta} does not describe {path}: its csv_sha256 differs (a run was killed between writing "
            f"the two, or one of them was edited or copied alone); predict again, or delete {meta.name} "
            "to read the CSV without metadata"
        )
    return metadata


def load_predictions(path: str | Path) -> pd.DataFrame:
    """Predictions as a DataFrame; samples as arrays in `{answer}_samples`, metadata in `.attrs`.

    Reads Parquet and CSV alike (CSV's `{answer}_s{i}` columns are gathered back into arrays).
    """
    path = Path(path)
    if path.is_dir():
        raise PredictionError(
            f"{path} is a folder of parts; join them first with merge_parts / zoobot-hpc merge"
        )
    if not path.is_file():
        raise PredictionError(f"prediction file {path} does not exist")
    metadata = read_metadata(path)
    if output_format(path) == "parquet":
        df = pq.read_table(path).to_pandas()
    else:
        df = _gather_csv_samples(pd.read_csv(path, dtype={"id_str": str, "file_loc": str}))
    df.attrs["zoobot_hpc"] = metadata
    return df


def _gather_csv_samples(df: pd.DataFrame) -> pd.DataFrame:
    sample_cols: dict[str, list[str]] = {}
    for col in df.columns:
        match = re.match(r"^(.*)_s(\d+)$", col)
        if match:
            sample_cols.setdefault(match.group(1), []).append(col)
    out = df.drop(columns=[c for cols in sample_cols.values() for c in cols])
    for answer, cols in sample_cols.items():
        values = df[sorted(cols, key=lambda c: int(c.rsplit("_s", 1)[1]))].to_numpy(dtype=np.float32)
        position = out.columns.get_loc(f"{answer}_concentration") + 1
        out.insert(position, f"{answer}_samples", list(values))
    return out


# ------------------------------------------------------------------------------------ the public API
def predict(
    checkpoint: str | Path,
    images: ImagesLike,
    save_path: str | Path,
    n_samples: int = 5,
    batch_size: int = 64,
    num_workers: int = 4,
    gpus: int = 0,
    shard_index: int | None = None,
    num_shards: int | None = None,
    on_bad_image: str = "error",
    dropout: bool = True,
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """Predict vote-fraction posteriors for `images` with the model in `checkpoint`; returns the output path.

    `images`: a folder (png/jpg/jpeg, recursive), a catalog (CSV/Parquet or DataFrame with
    `id_str`, `file_loc`) or a list of image paths. `save_path`: a `.parquet` or `.csv` file; with
    `num_shards`, a folder of `part-{k:05d}-of-{n:05d}.parquet` files: shard `shard_index` only,
    or every shard in turn when `shard_index` is None (complete parts are kept). `n_samples`
    MC-dropout samples per image; `dropout=False` gives one deterministic sample. `gpus` is 0 or 1
    (or name a `device`); scale out with shards. `on_bad_image='skip'` predicts the readable
    images and lists the others in `<output>.skipped.txt`.
    """
    _check_arguments(n_samples, batch_size, num_workers, on_bad_image, shard_index, num_shards)
    torch_device = resolve_device(gpus, device)
    checkpoint, save_path = Path(checkpoint).expanduser(), Path(save_path).expanduser()
    if num_shards is None:
        output_format(save_path)
    elif save_path.suffix.lower() in OUTPUT_FORMATS:
        raise PredictionError(f"save_path {save_path}: with num_shards it is a folder for the part files")
    _check_writable(save_path if num_shards else save_path.parent)
    inputs = resolve_inputs(images)  # a wrong path fails in seconds, before the model loads
    model = load_model(checkpoint)
    run_metadata = _run_metadata(checkpoint, model, inputs, n_samples, dropout, num_shards)
    settings = dict(
        n_samples=n_samples,
        dropout=dropout,
        batch_size=batch_size,
        num_workers=num_workers,
        device=torch_device,
        on_bad_image=on_bad_image,
        progress=progress,
    )
    if num_shards is None:
        _remove_stale_outputs(save_path)
        _predict_and_write(model, inputs, save_path, run_metadata, settings)
        return save_path
    bounds = shard_bounds(len(inputs), num_shards)
    for k in range(num_shards) if shard_index is None else [shard_index]:
        start, end = bounds[k]
        part = save_path / part_name(k, num_shards)
        shard_inputs = inputs.iloc[start:end].reset_index(drop=True)
        if part_is_complete(part, shard_inputs, run_metadata):
            _say(f"{part} is complete; skipping shard {k}", progress)
            continue
        _remove_stale_outputs(part)  # only this part's: other shards may be running
        metadata = {**run_metadata, "shard_index": k, "shard_rows": [start, end]}
        _predict_and_write(model, shard_inputs, part, metadata, settings, f"shard {k + 1}/{num_shards}")
    return save_path


def _check_writable(folder: Path) -> None:
    """Create the output folder and write a file there now, not after hours of prediction."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PredictionError(
            f"the output cannot be written to {folder} ({err.strerror or err}); choose a folder you can "
            "write to"
        ) from err


def _check_arguments(
    n_samples: int,
    batch_size: int,
    num_workers: int,
    on_bad_image: str,
    shard_index: int | None,
    num_shards: int | None,
) -> None:
    check_whole(1, PredictionError, n_samples=n_samples, batch_size=batch_size)
    check_whole(0, PredictionError, num_workers=num_workers)
    check_policy("on_bad_image", on_bad_image)
    if num_shards is None:
        if shard_index is not None:
            raise PredictionError(f"shard_index={shard_index} needs num_shards")
        return
    if not isinstance(num_shards, int) or num_shards < 1:
        raise PredictionError(f"num_shards={num_shards!r}: must be a whole number >= 1")
    if shard_index is not None and not (isinstance(shard_index, int) and 0 <= shard_index < num_shards):
        raise PredictionError(f"shard_index={shard_index!r}: must be in 0..{num_shards - 1}")


def _run_metadata(
    checkpoint: Path,
    model: Any,
    inputs: pd.DataFrame,
    n_samples: int,
    dropout: bool,
    num_shards: int | None,
) -> dict[str, Any]:
    hp = model.hparams
    return {
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": file_sha256(checkpoint),
        "schema": model.schema.to_dict(),
        "model_architecture": hp.model_architecture,
        "channels": int(hp.channels),
        "resize_size": int(hp.resize_size),
        "n_samples": n_samples if dropout else 1,
        "dropout": bool(dropout),
        "inputs": len(inputs),
        "inputs_sha256": ids_digest(list(inputs["id_str"])),
        "num_shards": num_shards,
        "package_version": __version__,
        "trained_with_version": hp.get("package_version", ""),
    }


def _predict_and_write(
    model: Any,
    inputs: pd.DataFrame,
    path: Path,
    metadata: dict[str, Any],
    settings: dict[str, Any],
    description: str = "predicting",
) -> None:
    if settings["on_bad_image"] == "error":  # only this shard's files: other array tasks check theirs
        check_files_exist(inputs)
    start = time.perf_counter()
    pred = predict_inputs(model, inputs, description=description, **settings)
    seconds = time.perf_counter() - start
    write_predictions(pred, model.schema, path, {**metadata, "seconds": round(seconds, 3)})
    rate = len(inputs) / seconds if seconds > 0 else float("inf")
    skipped = f", {len(pred.skipped)} skipped (listed in {skip_list_path(path)})" if pred.skipped else ""
    _say(
        f"predicted {len(pred.ids)} of {len(inputs)} images{skipped} in {seconds:.1f} s "
        f"({rate:.1f} images/s, {metadata['n_samples']} samples each) -> {path}",
        settings["progress"],
    )


def _say(message: str, progress: bool) -> None:
    """Print the line where the progress bar is; log it (INFO) when there is none."""
    if progress:
        print(message, file=sys.stderr, flush=True)
    else:
        log.info(message)


def part_is_complete(part: Path, shard_inputs: pd.DataFrame, run_metadata: dict[str, Any]) -> bool:
    """True if `part` is readable and holds exactly this shard's ids from the same checkpoint and settings."""
    if not part.is_file():
        return False
    try:
        metadata = read_metadata(part)
        ids = pq.read_table(part, columns=["id_str"]).column("id_str").to_pylist()
    except (PredictionError, OSError, pa.ArrowException, json.JSONDecodeError, KeyError) as err:
        log.warning("%s is unreadable (%s); predicting it again", part, err)
        return False
    differs = [k for k in RUN_KEYS if metadata.get(k) != run_metadata.get(k)]
    if differs:
        log.warning("%s was made with other %s; predicting it again", part, ", ".join(differs))
        return False
    done = ids + [s["id_str"] for s in metadata.get("skipped", [])]
    if len(done) != len(shard_inputs) or set(done) != set(shard_inputs["id_str"]):
        log.warning("%s does not hold this shard's galaxies; predicting it again", part)
        return False
    return True


# ------------------------------------------------------------------------------------------ merging
def merge_parts(folder: str | Path, output: str | Path, images: ImagesLike | None = None) -> Path:
    """Join the part files of a sharded run into one Parquet or CSV file, after checking the set.

    Refuses unexpected file names, missing shards, two files for one shard, parts from different
    checkpoints, schemas, settings or input lists, and any id that appears twice; every input
    appears exactly once (predicted or skipped). With `images`, the ids must also be exactly its ids.
    """
    folder, output = Path(folder), Path(output)
    output_format(output)
    parts = _find_parts(folder)
    metas = {k: _part_metadata(path, k) for k, path in parts.items()}
    first = min(metas)
    reference = metas[first]
    _check_same_run(parts, metas, first)
    num_shards = reference["num_shards"]
    missing = [part_name(k, num_shards) for k in range(num_shards) if k not in parts]
    if missing:
        raise PredictionError(
            f"{folder}: {len(missing)} of {num_shards} shards are missing: {', '.join(missing[:10])}; "
            "rerun predict with the same arguments to complete them"
        )
    tables = [pq.read_table(parts[k]) for k in range(num_shards)]
    table = pa.concat_tables(tables)
    skipped = [s for k in range(num_shards) for s in metas[k].get("skipped", [])]
    _check_ids_once(tables, parts, metas, reference["inputs"])
    if images is not None:
        _check_against_inputs(table, skipped, images)
    merged_meta = {
        key: value for key, value in reference.items() if key not in ("shard_index", "shard_rows", "seconds")
    }
    merged_meta["merged_from"] = [p.name for _, p in sorted(parts.items())]
    schema = Schema.from_dict(reference["schema"])
    pred = Predictions(
        table.column("id_str").to_pandas(),
        table.column("file_loc").to_pandas(),
        _samples_from_table(table, schema, reference["n_samples"]),
        skipped,
    )
    write_predictions(pred, schema, output, merged_meta)
    return output


def _find_parts(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        raise PredictionError(f"{folder} is not a folder of prediction parts")
    files = sorted(folder.glob("part-*"))
    parts: dict[int, Path] = {}
    totals: dict[int, list[str]] = {}
    for path in files:
        if path.name.endswith(".skipped.txt"):
            continue
        match = PART_PATTERN.match(path.name)
        if not match:
            raise PredictionError(
                f"{path}: unexpected file among the parts (they are part-KKKKK-of-NNNNN.parquet); move it"
            )
        parts[int(match.group(1))] = path
        totals.setdefault(int(match.group(2)), []).append(path.name)
    if not parts:
        raise PredictionError(f"{folder}: no part-*.parquet files; run predict with num_shards first")
    if len(totals) > 1:
        described = "; ".join(f"of-{n:05d}: {', '.join(names[:3])}" for n, names in sorted(totals.items()))
        raise PredictionError(f"{folder} mixes parts of differently sharded runs ({described}); keep one set")
    (total,) = totals
    beyond = [parts[k].name for k in parts if k >= total]
    if beyond:
        raise PredictionError(f"{folder}: {', '.join(beyond)} has a shard index beyond its count")
    return parts


def _part_metadata(path: Path, k: int) -> dict[str, Any]:
    metadata = read_metadata(path)
    if not metadata:
        raise PredictionError(f"{path.name} has no zoobot-hpc metadata; it was not written by predict")
    if metadata.get("shard_index") != k or metadata.get("num_shards") != int(
        PART_PATTERN.match(path.name)[2]
    ):
        raise PredictionError(
            f"{path.name} holds shard {metadata.get('shard_index')} of {metadata.get('num_shards')} "
            "(a renamed copy of another part: a duplicate shard); remove it and rerun predict for this shard"
        )
    return metadata


def _check_same_run(parts: dict[int, Path], metas: dict[int, dict[str, Any]], first: int) -> None:
    reference = metas[first]
    for k, metadata in sorted(metas.items()):
        differs = [key for key in RUN_KEYS if metadata.get(key) != reference.get(key)]
        if differs:
            detail = ""
            if "checkpoint_sha256" in differs:
                detail = f" (checkpoint {metadata.get('checkpoint')} vs {reference.get('checkpoint')})"
            raise PredictionError(
                f"{parts[k].name} differs from {parts[first].name} in {', '.join(differs)}{detail}: "
                "the parts come from different runs; predict the odd shard again with the same arguments"
            )


def _check_ids_once(
    tables: list[pa.Table], parts: dict[int, Path], metas: dict[int, dict[str, Any]], total: int
) -> None:
    """Every id in exactly one part (predicted or skipped), and as many as the run had inputs."""
    owners: dict[str, str] = {}
    for k, path in sorted(parts.items()):
        ids = tables[k].column("id_str").to_pylist() + [s["id_str"] for s in metas[k].get("skipped", [])]
        for galaxy in ids:
            if galaxy in owners:
                raise PredictionError(f"id {galaxy!r} appears in both {owners[galaxy]} and {path.name}")
            owners[galaxy] = path.name
    if len(owners) != total:
        raise PredictionError(
            f"the parts hold {len(owners)} galaxies (predicted or skipped) but the input had {total}; "
            "some part is incomplete: rerun predict with the same arguments"
        )


def _check_against_inputs(table: pa.Table, skipped: list[dict[str, str]], images: ImagesLike) -> None:
    expected = set(resolve_inputs(images)["id_str"])
    found = set(table.column("id_str").to_pylist()) | {s["id_str"] for s in skipped}
    absent, extra = sorted(expected - found), sorted(found - expected)
    if absent or extra:
        raise PredictionError(
            f"the parts do not match the inputs: {len(absent)} input ids missing (e.g. {absent[:3]}), "
            f"{len(extra)} ids not in the inputs (e.g. {extra[:3]})"
        )


def _samples_from_table(table: pa.Table, schema: Schema, n_samples: int) -> np.ndarray:
    columns = [
        np.asarray(table.column(f"{col}_samples").combine_chunks().flatten(), dtype=np.float32).reshape(
            -1, n_samples
        )
        for col in schema.label_cols
    ]
    if not columns:
        return np.zeros((table.num_rows, n_samples, 0), dtype=np.float32)
    return np.stack(columns, axis=2)
