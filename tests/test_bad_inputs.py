"""Bad inputs as a new user makes them, each a real file given to the entry point a user calls.

Every case asserts the error's type (an `InputError` subclass where the input is the user's) and that
its message names the file, row or setting and says what to do. Cases that should work are run to
the end. Training inputs are refused in seconds, before any model exists (no config.yaml is written);
damaged images are met by the loader and by `predict` (training's bad-image policy is tested in
test_faults.py). One tiny real colour run provides the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from zoobot_hpc import train
from zoobot_hpc.augment import AugmentationError
from zoobot_hpc.catalog import CatalogError, load_splits, read_catalog
from zoobot_hpc.checkpoint import CheckpointError
from zoobot_hpc.cli import main
from zoobot_hpc.config import ConfigError, load_config
from zoobot_hpc.data import GalaxyDataset, ImageError, LoaderSettings, load_image
from zoobot_hpc.demo import demo_catalog
from zoobot_hpc.errors import InputError, InputWarning
from zoobot_hpc.hardware import HardwareError
from zoobot_hpc.models import ModelError
from zoobot_hpc.prediction import PredictionError, load_predictions, predict
from zoobot_hpc.schema import SchemaError, load_schema
from zoobot_hpc.training import SaveDirError

SCHEMA = load_schema("decals_rings")
VOTES = SCHEMA.label_cols
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
TINY = {"gpus": 0, "num_workers": 0, "resize_size": 32, "batch_size": 8, "trainer_kwargs": QUIET}
FAST = {"batch_size": 4, "num_workers": 0, "n_samples": 1, "progress": False}
FIX_ROWS = "(or remove those rows) and run again"


@contextlib.contextmanager
def refused(error: type[Exception], *fragments: str):
    """pytest.raises that also requires each fragment (what is wrong, where, what to do) in the message."""
    with pytest.raises(error) as info:
        yield info
    absent = [f for f in fragments if f not in str(info.value)]
    assert not absent, f"{absent} not in the message:\n{info.value}"


def cli_refuses(args: list[str], capsys: pytest.CaptureFixture, *fragments: str) -> None:
    """The CLI exits with status 2 and one message, without a traceback."""
    assert main(args) == 2
    err = capsys.readouterr().err
    absent = [f for f in fragments if f not in err]
    assert not absent and "Traceback" not in err, f"{absent} not in:\n{err}"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A copy of the demo catalog and its images: bad catalogs are written next to it."""
    target = tmp_path_factory.mktemp("bad_inputs") / "demo"
    shutil.copytree(demo_catalog().parent, target)
    return target


@pytest.fixture(scope="module")
def demo_csv(demo_dir) -> pd.DataFrame:
    """The demo catalog as written (relative file_loc), to damage copies of."""
    return pd.read_csv(demo_dir / "catalog.csv")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, demo_dir) -> tuple[Path, list[warnings.WarningMessage]]:
    """One real colour run (save_dir, warnings): 24 galaxies, 1 epoch, resized to 144 px > the 128 px images.

    Its train split (17 galaxies) is smaller than one batch (32): it must train, with a warning.
    """
    save_dir = tmp_path_factory.mktemp("tiny_run")
    frame = read_catalog(demo_dir / "catalog.csv").iloc[:24]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(
            save_dir, "decals_rings", catalog=frame, epochs=1, color=True,
            **{**TINY, "resize_size": 144, "batch_size": 32},
        )  # fmt: skip
    return save_dir, caught


@pytest.fixture(scope="module")
def checkpoint(tiny_run) -> Path:
    return tiny_run[0] / "checkpoints" / "last.ckpt"


def images(folder: Path, demo_dir: Path, count: int = 4) -> Path:
    """`count` real demo images copied into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted((demo_dir / "images").glob("*.jpg"))[:count]:
        shutil.copy(source, folder / source.name)
    return folder


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _config(tmp_path: Path, demo_dir: Path) -> dict:
    """A config that would train on the demo catalog (on the CPU, workers in the main process)."""
    return {
        "save_dir": str(tmp_path / "run"),
        "schema": "decals_rings",
        "catalog": str(demo_dir / "catalog.csv"),
        "gpus": 0,
        "num_workers": 0,
    }


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------- catalog contents
def _set(row: int, column: str, value: object):
    def mutate(df: pd.DataFrame) -> pd.DataFrame:
        df = df.astype({column: object})
        df.loc[row, column] = value
        return df

    return mutate


def _all_votes_zero(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(**{c: 0 for c in VOTES})


def _duplicate_id(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df.loc[7, "id_str"] = df.loc[8, "id_str"]
    return df


CATALOG_CASES = {
    "NaN votes": (
        _set(3, VOTES[0], np.nan),
        [f"missing (NaN) votes in {VOTES[0]}", "row 3", "use 0 for a question not asked"],
    ),
    "negative votes": (_set(4, VOTES[3], -2), [f"negative votes in {VOTES[3]}", "row 4 (-2)", FIX_ROWS]),
    "fractional votes": (
        _set(5, VOTES[5], 2.5),
        [f"non-integer votes in {VOTES[5]}", "row 5 (2.5)", "give counts, not fractions"],
    ),
    "string votes": (
        _set(6, VOTES[6], "many"),
        [f"non-numeric votes in {VOTES[6]}", "row 6 ('many')", FIX_ROWS],
    ),
    "infinite votes": (_set(7, VOTES[1], np.inf), [f"non-integer votes in {VOTES[1]}", "row 7 (inf)"]),
    "votes too large for the loader": (
        _set(8, VOTES[2], 2**40),
        [f"votes in {VOTES[2]} too large for counts", "row 8", FIX_ROWS],
    ),
    "missing label column": (
        lambda df: df.drop(columns=[VOTES[4]]),
        ["missing columns (add them; vote columns are {question}_{answer})", VOTES[4]],
    ),
    "file_loc column missing": (
        lambda df: df.rename(columns={"file_loc": "file_location"}),
        ["missing columns", "file_loc (rename 'file_location'?)"],
    ),
    "duplicate id_str": (_duplicate_id, ["duplicate id_str (ids must be unique) (2)", "row 7", "row 8"]),
    "missing id_str": (_set(2, "id_str", np.nan), ["empty id_str (give every galaxy an id)", "row 2"]),
    "empty file_loc": (_set(2, "file_loc", ""), ["empty file_loc", "row 2", FIX_ROWS]),
    "empty catalog": (lambda df: df.iloc[:0], ["no rows (add one line per galaxy)"]),
    "all votes zero for every question": (
        _all_votes_zero,
        ["no votes at all (the model would learn nothing; are these the vote count columns?)"],
    ),
    "missing image": (
        _set(9, "file_loc", "images/not-there.jpg"),
        ["image files that do not exist (1): row 9", "not-there.jpg", "read from the catalog file's folder"],
    ),
    "image path is a folder": (
        _set(9, "file_loc", "images"),
        ["image files that do not exist (1): row 9", "(a folder, not an image file)", FIX_ROWS],
    ),
}


@pytest.mark.parametrize("case", CATALOG_CASES)
def test_bad_catalog_contents(demo_dir, demo_csv, case):
    mutate, fragments = CATALOG_CASES[case]
    path = write_csv(mutate(demo_csv), demo_dir / f"{case.replace(' ', '_')}.csv")
    with refused(CatalogError, f"catalog {path}", *fragments):
        load_splits(SCHEMA, catalog=path)


def test_image_path_that_is_a_fifo_is_refused_not_read(demo_dir, demo_csv):
    """Reading a named pipe would block a loader worker forever: the catalog check refuses it."""
    fifo = demo_dir / "images" / "pipe.jpg"
    os.mkfifo(fifo)
    path = write_csv(_set(9, "file_loc", "images/pipe.jpg")(demo_csv), demo_dir / "fifo.csv")
    try:
        with refused(CatalogError, "image files that do not exist (1): row 9", "not a regular file: a FIFO"):
            load_splits(SCHEMA, catalog=path)
    finally:
        fifo.unlink()  # other tests of this module read the folder


def test_every_problem_is_counted_at_once_through_the_cli(tmp_path, demo_dir, demo_csv, capsys):
    df = _set(3, VOTES[0], np.nan)(_set(4, VOTES[3], -1)(demo_csv))
    catalog = write_csv(df, demo_dir / "two_problems.csv")
    config = write_yaml(
        tmp_path / "run.yaml",
        {"save_dir": str(tmp_path / "run"), "schema": "decals_rings", "catalog": str(catalog)},
    )
    cli_refuses(
        ["validate", "--config", str(config)], capsys, f"catalog {catalog}: 2 problem(s)", "row 3", "row 4"
    )


def test_a_catalog_of_another_schema_names_the_schema_that_fits(demo_dir):
    with refused(
        CatalogError, "missing columns", "fit the built-in schema 'decals_rings': use schema=decals_rings"
    ):
        load_splits(load_schema("gz_decals_dr5"), catalog=demo_dir / "catalog.csv")


def test_extra_unknown_columns_are_ignored(demo_dir, demo_csv):
    path = write_csv(
        demo_csv.assign(ra=1.5, notes="x", **{"smooth-or-featured_smooth_fraction": 0.5}),
        demo_dir / "extra.csv",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = load_splits(SCHEMA, catalog=path)
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(demo_csv)


# ---------------------------------------------------------------------------------- catalog files
def test_catalog_path_that_does_not_exist(tmp_path, monkeypatch):
    with refused(CatalogError, f"catalog file {tmp_path / 'nope.csv'} does not exist", "check the path"):
        load_splits(SCHEMA, catalog=tmp_path / "nope.csv")
    monkeypatch.chdir(tmp_path)
    with refused(CatalogError, "nope.csv does not exist", f"relative to the working directory {tmp_path}"):
        load_splits(SCHEMA, catalog="nope.csv")


def test_catalog_path_is_a_folder(demo_dir):
    with refused(CatalogError, f"catalog {demo_dir} is a folder", "give the .csv or .parquet file in it"):
        load_splits(SCHEMA, catalog=demo_dir)


def test_parquet_file_that_is_really_csv(demo_dir):
    fake = demo_dir / "catalog_csv.parquet"
    shutil.copy(demo_dir / "catalog.csv", fake)
    with refused(
        CatalogError, f"catalog {fake} could not be read", "it is not a Parquet file (CSV? name it .csv)"
    ):
        load_splits(SCHEMA, catalog=fake)


def test_csv_file_that_is_really_parquet(demo_dir, demo_csv):
    fake = demo_dir / "catalog_parquet.csv"
    demo_csv.to_parquet(fake)
    with refused(CatalogError, f"catalog {fake} could not be read", "it is a Parquet file: name it .parquet"):
        load_splits(SCHEMA, catalog=fake)


def test_truncated_parquet(demo_dir, demo_csv):
    path = demo_dir / "truncated.parquet"
    demo_csv.to_parquet(path)
    path.write_bytes(path.read_bytes()[:-100])
    with refused(
        CatalogError, f"catalog {path} could not be read", "check that it is complete (write it again)"
    ):
        load_splits(SCHEMA, catalog=path)


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("empty.csv", "", ["is empty; it needs a header line (id_str,file_loc,<vote columns>)"]),
        ("header_only.csv", "id_str,file_loc\n", ["no rows (add one line per galaxy)", "missing columns"]),
        ("catalog.xlsx", "not a spreadsheet", ["use a .csv or .parquet file (got .xlsx)"]),
    ],
)
def test_empty_or_unsupported_catalog_files(tmp_path, name, content, fragments):
    path = tmp_path / name
    path.write_text(content)
    with refused(CatalogError, str(path), *fragments):
        load_splits(SCHEMA, catalog=path)


def test_csv_with_a_byte_order_mark_and_spaces_in_the_header_works(demo_dir):
    lines = (demo_dir / "catalog.csv").read_text().splitlines()
    lines[0] = ", ".join(lines[0].split(","))  # "id_str, file_loc, ..." as spreadsheets write it
    path = demo_dir / "bom_spaces.csv"
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    splits = load_splits(SCHEMA, catalog=path)
    assert list(splits.train.columns[:2]) == ["id_str", "file_loc"] and len(splits.train) == 259


def test_relative_file_loc_is_resolved_against_the_catalog_folder_not_the_working_directory(
    tmp_path, demo_dir, demo_csv, monkeypatch
):
    nested = demo_dir / "catalogs" / "v1"
    nested.mkdir(parents=True, exist_ok=True)
    path = write_csv(demo_csv.assign(file_loc="../../" + demo_csv["file_loc"]), nested / "catalog.csv")
    monkeypatch.chdir(tmp_path)  # a working directory where no images are
    splits = load_splits(SCHEMA, catalog=path)
    # joined to the catalog's folder, not normalised: the file system resolves "..", as for symlinks
    locs = splits.train["file_loc"]
    assert locs.str.startswith(str(nested) + "/../../").all()
    assert {Path(loc).resolve().parent for loc in locs} == {(demo_dir / "images").resolve()}


# ------------------------------------------------------------------------------------------- splits
def test_split_fractions_not_summing_to_one_fail_before_the_catalog_is_read(tmp_path):
    with refused(CatalogError, "split_fractions=(0.7, 0.2, 0.2)", "three fractions >= 0 that sum to 1"):
        load_splits(SCHEMA, catalog=tmp_path / "never-read.csv", split_fractions=(0.7, 0.2, 0.2))


def test_split_fractions_as_text_from_the_command_line(tmp_path, demo_dir, capsys):
    cli_refuses(
        ["validate", "--set", f"save_dir={tmp_path}", "--set", "schema=decals_rings",
         "--set", f"catalog={demo_dir / 'catalog.csv'}", "--set", "split_fractions=0.7,0.1,0.2"],
        capsys, "split_fractions='0.7,0.1,0.2'", "e.g. [0.7, 0.1, 0.2]",
    )  # fmt: skip


def test_a_split_that_comes_out_empty(demo_dir):
    with refused(CatalogError, "the val split is empty", "give more galaxies or change split_fractions"):
        load_splits(SCHEMA, catalog=read_catalog(demo_dir / "catalog.csv").iloc[:3])


def test_a_train_split_of_one_galaxy_is_refused_before_the_model(tmp_path, demo_dir):
    frame = read_catalog(demo_dir / "catalog.csv").iloc[:5]
    with refused(
        CatalogError, "the train split has 1 galaxy", "at least 2 galaxies per rank", "split_fractions"
    ):
        train(tmp_path, "decals_rings", catalog=frame, split_fractions=(0.2, 0.4, 0.4), epochs=1, **TINY)
    assert not (tmp_path / "config.yaml").exists()


def test_a_split_smaller_than_one_batch_trains_with_a_warning(tiny_run):
    save_dir, caught = tiny_run
    messages = [str(w.message) for w in caught if issubclass(w.category, InputWarning)]
    assert any("smaller than one batch (batch_size=32" in m and "lower batch_size" in m for m in messages)
    assert (save_dir / "results.yaml").is_file()


# ------------------------------------------------------------------------------------------ schemas
SCHEMA_CASES = {
    "unknown parent answer": (
        "  - {question: a, answers: [x, y], asked_after: null}\n"
        "  - {question: b, answers: [p, q], asked_after: x}\n",
        [
            "question 'b' is asked after unknown answer 'x'",
            "it must be one of the label columns",
            "did you mean 'a_x'",
        ],
    ),
    "cycle": (
        "  - {question: a, answers: [x, y], asked_after: b_p}\n"
        "  - {question: b, answers: [p, q], asked_after: a_x}\n",
        ["the questions form a cycle: a -> b -> a", "change the asked_after of one of them"],
    ),
    "duplicate answer": (
        "  - {question: a, answers: [x, x], asked_after: null}\n",
        ["duplicate answer 'a_x' in question 'a'", "remove or rename one"],
    ),
    "question defined twice": (
        "  - {question: a, answers: [x], asked_after: null}\n"
        "  - {question: a, answers: [y], asked_after: null}\n",
        ["question 'a' is defined twice", "merge or rename"],
    ),
    "no answers": (
        "  - {question: a, answers: [], asked_after: null}\n",
        ["question 'a' has no answers; list them"],
    ),
    "misspelt key": (
        "  - {question: a, answers: [x, y], asked-after: null}\n",
        ["question 'a' has unknown key 'asked-after' (did you mean 'asked_after'?)", "its keys are"],
    ),
    "not YAML": ("  - {question: a, answers: [x, y\n", ["is not valid YAML"]),
}


@pytest.mark.parametrize("case", SCHEMA_CASES)
def test_bad_schema_yaml_names_the_entry(tmp_path, case):
    body, fragments = SCHEMA_CASES[case]
    path = tmp_path / "my_schema.yaml"
    path.write_text("name: mine\nquestions:\n" + body)
    with refused(SchemaError, *fragments):
        load_schema(path)


def test_bad_schema_through_the_cli(tmp_path, demo_dir, capsys):
    path = tmp_path / "my_schema.yaml"
    path.write_text("name: mine\nquestions:\n" + SCHEMA_CASES["cycle"][0])
    cli_refuses(
        ["validate", "--set", f"save_dir={tmp_path}", "--set", f"schema={path}",
         "--set", f"catalog={demo_dir / 'catalog.csv'}"],
        capsys, "schema mine: the questions form a cycle",
    )  # fmt: skip


def test_misspelt_schema_name_suggests_the_builtin():
    with refused(
        SchemaError, "'gz_decals_dr55' is neither a built-in schema", "(did you mean 'gz_decals_dr5'?)"
    ):
        load_schema("gz_decals_dr55")


# ----------------------------------------------------------------------------------- train settings
BAD_SETTINGS = [
    (
        {"model_architecture": "vit"},
        ModelError,
        ["model_architecture='vit' is unknown", "use one of efficientnet"],
    ),
    (
        {"crop_scale_bounds": (0.0, 0.5)},
        AugmentationError,
        ["crop_scale_bounds=(0.0, 0.5)", "e.g. (0.7, 0.8)"],
    ),
    (
        {"crop_scale_bounds": (0.5, 1.5)},
        AugmentationError,
        ["crop_scale_bounds=(0.5, 1.5)", "0 < low <= high <= 1"],
    ),
    (
        {"crop_scale_bounds": (0.8, 0.7)},
        AugmentationError,
        ["crop_scale_bounds=(0.8, 0.7)", "0 < low <= high <= 1"],
    ),
    (
        {"crop_ratio_bounds": (1.1, 0.9)},
        AugmentationError,
        ["crop_ratio_bounds=(1.1, 0.9)", "e.g. (0.9, 1.1)"],
    ),
    ({"batch_size": 0}, InputError, ["batch_size=0: must be a whole number >= 1"]),
    ({"patience": -1}, InputError, ["patience=-1: must be a whole number >= 0"]),
    ({"random_state": -1}, InputError, ["random_state=-1: must be a whole number >= 0"]),
    ({"epochs": "10"}, ConfigError, ["epochs='10' (str): must be a whole number", "(no quotes)"]),
    ({"color": "no"}, ConfigError, ["color='no' (str): must be true or false", "color: false"]),
    ({"learning_rate": "fast"}, ConfigError, ["learning_rate='fast' (str): must be a number", "0.001"]),
    ({"dropout_rate": 1.5}, ConfigError, ["dropout_rate=1.5: must be in [0, 1)", "e.g. 0.2"]),
    ({"gpus": -1}, HardwareError, ["gpus=-1: must be a whole number >= 0"]),
    ({"accelerator": "tpu"}, HardwareError, ["accelerator='tpu': use one of auto, cpu, gpu"]),
    ({"grey": "lumen"}, InputError, ["grey='lumen': use one of luma, mean"]),
]


@pytest.mark.parametrize(
    ("settings", "error", "fragments"),
    BAD_SETTINGS,
    ids=[" ".join(f"{k}={v}" for k, v in case[0].items()) for case in BAD_SETTINGS],
)
def test_bad_settings_fail_before_any_work(tmp_path, demo_dir, settings, error, fragments):
    with refused(error, *fragments):
        train(tmp_path, "decals_rings", catalog=demo_dir / "catalog.csv", **{**TINY, **settings})
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


def test_more_gpus_than_visible(tmp_path, demo_dir, capsys):
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    config = write_yaml(tmp_path / "gpus.yaml", {**_config(tmp_path, demo_dir), "gpus": visible + 1})
    cli_refuses(
        ["train", "--config", str(config)], capsys,
        f"gpus={visible + 1} but this machine shows {visible} GPU(s)", "gpus=0 to train on the CPU",
    )  # fmt: skip
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_more_loader_workers_than_cpus_warns(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    with (
        pytest.warns(
            InputWarning, match=rf"num_workers={cpus + 1} .* {cpus} CPU\(s\).*Set num_workers to at most"
        ),
        pytest.raises(CatalogError),
    ):  # stop right after the checks: no training needed to see it
        train(tmp_path, "decals_rings", catalog=tmp_path / "none.csv", **{**TINY, "num_workers": cpus + 1})


def test_unwritable_save_dir(tmp_path, demo_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with refused(
        SaveDirError, f"save_dir {blocker / 'run'} is not writable", "choose a folder you can write to"
    ):
        train(blocker / "run", "decals_rings", catalog=demo_dir / "catalog.csv", **TINY)


def test_resize_larger_than_the_images_works(tiny_run, checkpoint, demo_dir):
    save_dir, _ = tiny_run
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
    image = Image.open(next((demo_dir / "images").glob("*.jpg")))
    assert hparams["resize_size"] == 144 > max(image.size)
    assert yaml.safe_load((save_dir / "results.yaml").read_text())["test"]["test_loss"] > 0


# ------------------------------------------------------------------------------------------- configs
def test_unknown_config_key_suggests_the_closest(tmp_path, capsys):
    config = write_yaml(tmp_path / "cfg.yaml", {"save_dir": "x", "schema": "decals_rings", "epoch": 3})
    cli_refuses(
        ["validate", "--config", str(config)],
        capsys,
        f"unknown key 'epoch' in {config}",
        "Did you mean 'epochs'?",
    )
    config = write_yaml(tmp_path / "cfg.yaml", {"schema": "decals_rings", "slurm": {"partion": "gpu"}})
    cli_refuses(
        ["validate", "--config", str(config)], capsys, "unknown key 'partion'", "Did you mean 'partition'?"
    )


def test_config_without_save_dir_or_schema(tmp_path, demo_dir, capsys):
    config = write_yaml(tmp_path / "cfg.yaml", {"catalog": str(demo_dir / "catalog.csv"), "gpus": 0})
    cli_refuses(
        ["train", "--config", str(config)], capsys, "the config has no save_dir or schema", "--set save_dir="
    )


def test_quoted_numbers_in_yaml(tmp_path, demo_dir, capsys):
    config = write_yaml(tmp_path / "cfg.yaml", {**_config(tmp_path, demo_dir), "epochs": "10"})
    cli_refuses(
        ["train", "--config", str(config)],
        capsys,
        "epochs='10' (str): must be a whole number",
        "epochs: 1000",
    )


def test_float_settings_in_exponent_form_are_numbers(tmp_path):
    """PyYAML reads `1e-4` as a string (YAML 1.1); a config means the number."""
    config = tmp_path / "cfg.yaml"
    config.write_text("save_dir: run\nschema: decals_rings\nlearning_rate: 1e-4\n")
    assert load_config(config, ["weight_decay=5e-2"]) == {
        "save_dir": "run", "schema": "decals_rings", "learning_rate": 1e-4, "weight_decay": 0.05
    }  # fmt: skip


# ------------------------------------------------------------------------------------------- images
def _zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _truncated_jpeg(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _truncated_png(path: Path) -> Path:
    png = path.with_suffix(".png")
    Image.open(path).save(png)
    path.unlink()
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    return png


def _text_named_jpg(path: Path) -> Path:
    path.write_text("id_str,file_loc\nthis is a catalog, not a galaxy\n")
    return path


def _grey_tiff(path: Path, dtype: type) -> Path:
    """The image as a one-channel TIFF of `dtype` (float32: Pillow mode F, int32: mode I)."""
    tiff = path.with_suffix(".tif")
    Image.fromarray(np.asarray(Image.open(path).convert("L")).astype(dtype)).save(tiff)
    path.unlink()
    return tiff


def _float_tiff(path: Path) -> Path:
    return _grey_tiff(path, np.float32)


def _int32_tiff(path: Path) -> Path:
    return _grey_tiff(path, np.int32)


def _sixteen_bit_fits(path: Path) -> Path:
    """The image as a FITS of signed 16-bit integers (BITPIX = 16), as survey cutouts come."""
    grey = np.asarray(Image.open(path).convert("L"), dtype=">i2")
    cards = [
        "SIMPLE  = T",
        "BITPIX  = 16",
        "NAXIS   = 2",
        f"NAXIS1  = {grey.shape[1]}",
        f"NAXIS2  = {grey.shape[0]}",
    ]
    header = "".join(f"{card[:10]}{card[10:]:>20}".ljust(80) for card in cards) + "END".ljust(80)
    fits = path.with_suffix(".fits")
    fits.write_bytes(
        header.encode().ljust(2880) + grey.tobytes().ljust(-(-grey.nbytes // 2880) * 2880, b"\0")
    )
    path.unlink()
    return fits


IMAGE_DAMAGE = {
    "zero-byte image": (_zero_bytes, "is an empty file"),
    "truncated JPEG": (_truncated_jpeg, "cannot be decoded"),
    "truncated PNG": (_truncated_png, "cannot be decoded"),
    "text file named .jpg": (_text_named_jpg, "cannot be decoded: no image format that torchvision or"),
    # no standard 8-bit stretch: not clipped to 0-255 (black or white) without a word
    "float TIFF": (_float_tiff, "has 32-bit floating-point pixels (Pillow mode F)"),
    "32-bit integer TIFF": (_int32_tiff, "has 32-bit integer pixels (Pillow mode I)"),
    "16-bit FITS": (_sixteen_bit_fits, "has 16-bit integer FITS pixels (Pillow mode I;16)"),
}


@pytest.mark.parametrize("case", IMAGE_DAMAGE)
def test_unreadable_image_is_named_by_the_loader(tmp_path, demo_dir, case):
    damage, what = IMAGE_DAMAGE[case]
    bad = damage(next(images(tmp_path, demo_dir, 1).iterdir()))
    with refused(ImageError, f"image {bad} {what}", "replace it or remove its row from the catalog"):
        load_image(str(bad), color=False)


def test_missing_image_is_named_by_the_loader(tmp_path):
    with refused(ImageError, f"image {tmp_path / 'gone.jpg'} cannot be read", "fix the path in the catalog"):
        load_image(str(tmp_path / "gone.jpg"), color=False)


@pytest.mark.parametrize("case", [*IMAGE_DAMAGE, "missing image"])
def test_unreadable_image_stops_prediction_naming_it(tmp_path, demo_dir, checkpoint, case):
    folder = images(tmp_path / "in", demo_dir)
    catalog = pd.DataFrame({"id_str": [p.stem for p in sorted(folder.iterdir())],
                            "file_loc": [str(p) for p in sorted(folder.iterdir())]})  # fmt: skip
    victim = Path(catalog["file_loc"].iat[1])
    if case == "missing image":
        victim.unlink()
        fragments = [f"1 image file(s) do not exist: {victim}", "fix the paths, or pass on_bad_image='skip'"]
    else:
        bad = IMAGE_DAMAGE[case][0](victim)
        catalog.loc[1, "file_loc"] = str(bad)
        fragments = [f"image {bad}", "on_bad_image='skip'"]
    with refused(ImageError, *fragments):
        predict(checkpoint, catalog, tmp_path / "out.parquet", **FAST)
    assert not (tmp_path / "out.parquet").exists()


def _sixteen_bit_grey(source: Path, target: Path) -> np.ndarray:
    grey = np.array(Image.open(source).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(target)
    return grey


def test_sixteen_bit_and_palette_pngs_load_and_predict(tmp_path, demo_dir, checkpoint):
    sources = sorted((demo_dir / "images").glob("*.jpg"))[:2]
    folder = tmp_path / "pngs"
    folder.mkdir()
    grey = _sixteen_bit_grey(sources[0], folder / "sixteen.png")
    loaded = load_image(str(folder / "sixteen.png"), color=False)
    assert loaded.dtype == torch.uint8 and torch.equal(loaded[0], torch.from_numpy(grey))
    Image.open(sources[1]).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    assert load_image(str(folder / "palette.png"), color=True).shape == (3, 128, 128)
    out = load_predictions(predict(checkpoint, folder, tmp_path / "out.parquet", **FAST))
    assert sorted(out["id_str"]) == ["palette", "sixteen"]


@pytest.mark.parametrize("damage", [_float_tiff, _int32_tiff, _sixteen_bit_fits])
def test_deep_images_are_bad_images_not_black_ones(tmp_path, demo_dir, damage):
    """The loader hands them to the bad-image policy (skip or error), saying how to convert them."""
    good, victim = sorted(images(tmp_path, demo_dir, 2).iterdir())
    bad = damage(victim)
    dataset = GalaxyDataset(np.array([str(good), str(bad)]), None, color=False, size=(128, 128))
    batch = next(iter(LoaderSettings(batch_size=2, num_workers=0).loader(dataset)))
    assert batch["ok"].tolist() == [True, False]
    assert f"image {bad} has " in batch["error"][1]
    assert "convert it to an 8-bit PNG or JPEG with the stretch of your choice" in batch["error"][1]


def test_sixteen_bit_tiff_is_scaled_like_a_sixteen_bit_png(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (20, 30)).astype(np.uint16)
    for suffix in (".png", ".tif"):
        Image.fromarray(values).save(tmp_path / f"sixteen{suffix}")
    expected = torch.from_numpy(np.round(values / 257).astype(np.uint8))
    for color, grey in [(True, "luma"), (False, "luma"), (False, "mean")]:
        for suffix in (".png", ".tif"):
            loaded = load_image(str(tmp_path / f"sixteen{suffix}"), color, grey=grey)
            assert loaded.shape == (3 if color else 1, 20, 30), (suffix, color, grey)
            assert all(torch.equal(channel, expected) for channel in loaded), (suffix, color, grey)


def _converted(source: Path, target: Path, mode: str) -> Path:
    Image.open(source).convert(mode).save(target, **({"lossless": True} if target.suffix == ".webp" else {}))
    return target


@pytest.mark.parametrize(("color", "grey"), [(True, "luma"), (False, "luma"), (False, "mean")])
def test_webp_and_gif_batch_with_the_channels_asked_for(tmp_path, demo_dir, color, grey):
    """torchvision decodes WebP and GIF in colour (RGBA WebP in 4 channels) whatever mode is asked."""
    source = sorted((demo_dir / "images").glob("*.jpg"))[0]
    png = _converted(source, tmp_path / "rgb.png", "RGB")
    files = [png] + [
        _converted(source, tmp_path / f"{mode}{suffix}", mode)
        for mode in ("RGB", "RGBA")
        for suffix in (".webp", ".gif")
    ]
    dataset = GalaxyDataset(np.array([str(f) for f in files]), None, color, (128, 128), grey)
    batch = next(iter(LoaderSettings(batch_size=len(files), num_workers=0).loader(dataset)))
    assert batch["ok"].all() and batch["image"].shape == (5, 3 if color else 1, 128, 128)
    if color or grey == "mean":  # lossless WebP: the PNG's pixels exactly
        assert torch.equal(batch["image"][1], batch["image"][0])
    else:  # luma as documented: 0.299 R + 0.587 G + 0.114 B, as Pillow's "L"
        assert torch.equal(batch["image"][1, 0], torch.from_numpy(np.array(Image.open(png).convert("L"))))


def test_grey_images_with_a_colour_checkpoint_predict(tmp_path, demo_dir, checkpoint):
    folder = tmp_path / "grey"
    folder.mkdir()
    for source in sorted((demo_dir / "images").glob("*.jpg"))[:3]:
        Image.open(source).convert("L").save(folder / source.name)
    out = load_predictions(predict(checkpoint, folder, tmp_path / "out.csv", **FAST))
    assert len(out) == 3 and out.attrs["zoobot_hpc"]["channels"] == 3


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (
            {},
            [
                "no images in",
                "searched recursively for .jpg, .jpeg, .png",
                "Give a folder of PNG/JPEG images",
            ],
        ),
        (
            {"galaxy.fits": b"SIMPLE  =", "notes": b"x"},
            ["no images in", "it holds .fits, notes files", "a catalog"],
        ),
    ],
    ids=["empty folder", "FITS files only"],
)
def test_a_folder_without_images(tmp_path, checkpoint, content, fragments):
    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    for name, data in content.items():
        (folder / "sub" / name).write_bytes(data)
    with refused(PredictionError, str(folder), *fragments):
        predict(checkpoint, folder, tmp_path / "out.parquet", **FAST)


def test_unwritable_prediction_output_fails_before_the_model_loads(tmp_path, demo_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with refused(
        PredictionError, f"cannot be written to {blocker / 'out'}", "choose a folder you can write to"
    ):
        predict(tmp_path / "never-loaded.ckpt", demo_dir / "images", blocker / "out" / "p.parquet", **FAST)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_predict_on_a_gpu_that_is_not_there(tmp_path, demo_dir, checkpoint):
    with refused(PredictionError, "gpus=1 but no CUDA device is visible", "use gpus=0"):
        predict(checkpoint, demo_dir / "images", tmp_path / "out.parquet", **{**FAST, "gpus": 1})


# -------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    ("settings", "fragments"),
    [
        ({"schema": "gz_rings"}, ["schema 'decals_rings' (7 answers) vs 'gz_rings' (2 answers)"]),
        (
            {"model_architecture": "resnet_torchvision"},
            ["model_architecture 'efficientnet' vs 'resnet_torchvision'"],
        ),
        ({"color": False}, ["color=True vs color=False"]),
    ],
    ids=["other schema", "other architecture", "grey vs colour"],
)
def test_resuming_from_a_checkpoint_of_other_settings(tmp_path, demo_dir, checkpoint, settings, fragments):
    kwargs = {"schema": "decals_rings", "color": True, **settings}
    with refused(
        CheckpointError, f"cannot resume from {checkpoint}", *fragments, "new save_dir", "resume=False"
    ):
        train(tmp_path, catalog=demo_dir / "catalog.csv", resume=str(checkpoint), **TINY, **kwargs)
    assert not (tmp_path / "config.yaml").exists()


def test_rerun_in_the_same_save_dir_with_grey_images_is_refused(tmp_path, demo_dir, checkpoint):
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(checkpoint, tmp_path / "checkpoints" / "last.ckpt")  # resume='auto' finds it
    with refused(CheckpointError, "color=True vs color=False", "new save_dir"):
        train(tmp_path, "decals_rings", catalog=demo_dir / "catalog.csv", **TINY)


@pytest.mark.parametrize("corruption", ["truncated", "text", "foreign"])
def test_corrupt_checkpoint_is_refused_before_training(tmp_path, demo_dir, checkpoint, corruption):
    bad = tmp_path / "bad.ckpt"
    if corruption == "truncated":
        bad.write_bytes(checkpoint.read_bytes()[:5000])
    elif corruption == "text":
        bad.write_text("not a checkpoint")
    else:
        torch.save({"state_dict": {}}, bad)
    with refused(CheckpointError, f"checkpoint {bad}", "zoobot-hpc train"):
        train(
            tmp_path / "run",
            "decals_rings",
            catalog=demo_dir / "catalog.csv",
            resume=str(bad),
            color=True,
            **TINY,
        )


def test_checkpoint_of_another_architecture_is_refused_by_predict(tmp_path, demo_dir, checkpoint):
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["hyper_parameters"]["model_architecture"] = "resnet_detectron"  # weights are EfficientNet's
    other = tmp_path / "other.ckpt"
    torch.save(state, other)
    with refused(
        CheckpointError, f"checkpoint {other} cannot be loaded as a zoobot-hpc model", "zoobot-hpc train"
    ):
        predict(other, images(tmp_path / "in", demo_dir), tmp_path / "out.parquet", **FAST)


def test_a_run_folder_given_as_the_checkpoint(tmp_path, demo_dir, tiny_run, checkpoint):
    save_dir, _ = tiny_run
    with refused(
        CheckpointError, f"checkpoint {save_dir} is a folder", "give the path of one .ckpt file", "last.ckpt"
    ):
        predict(save_dir, images(tmp_path / "in", demo_dir), tmp_path / "out.parquet", **FAST)
