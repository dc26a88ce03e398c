import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from zoobot_hpc.catalog import CatalogError, find_problems, load_splits, read_catalog, split_catalog
from zoobot_hpc.demo import demo_catalog
from zoobot_hpc.schema import load_schema

SCHEMA = load_schema("decals_rings")


def test_relative_file_loc_is_resolved_against_the_catalog_folder(demo_copy):
    df = read_catalog(demo_copy)
    assert df["file_loc"].iloc[0].startswith(str(demo_copy.parent))
    assert all(pd.Series(df["file_loc"]).map(lambda p: p.endswith(".jpg")))


def test_parquet_and_csv_read_the_same(demo_copy):
    parquet = demo_copy.with_suffix(".parquet")
    pd.read_csv(demo_copy).to_parquet(parquet)
    pd.testing.assert_frame_equal(read_catalog(demo_copy), read_catalog(parquet))


def test_split_is_deterministic_and_complete(demo_frame):
    a = split_catalog(demo_frame, (0.7, 0.1, 0.2), random_state=1)
    b = split_catalog(demo_frame, (0.7, 0.1, 0.2), random_state=1)
    c = split_catalog(demo_frame, (0.7, 0.1, 0.2), random_state=2)
    for x, y in zip(a, b, strict=True):
        pd.testing.assert_frame_equal(x, y)
    assert not a[0]["id_str"].equals(c[0]["id_str"])
    ids = np.concatenate([part["id_str"].to_numpy() for part in a])
    assert sorted(ids) == sorted(demo_frame["id_str"]) and [len(p) for p in a] == [259, 37, 74]


def test_configurable_fractions(demo_frame):
    splits = load_splits(SCHEMA, catalog=demo_frame, split_fractions=(0.5, 0.25, 0.25))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (185, 92, 93)


def test_both_or_neither_is_an_error(demo_frame):
    with pytest.raises(CatalogError, match="not both"):
        load_splits(SCHEMA, catalog=demo_frame, train_catalog=demo_frame)
    with pytest.raises(CatalogError, match="no catalog"):
        load_splits(SCHEMA)
    with pytest.raises(CatalogError, match="test_catalog missing"):
        load_splits(SCHEMA, train_catalog=demo_frame, val_catalog=demo_frame)


def test_overlapping_pre_split_catalogs_are_refused(demo_frame):
    with pytest.raises(CatalogError, match="both the train and val"):
        load_splits(
            SCHEMA,
            train_catalog=demo_frame[:50],
            val_catalog=demo_frame[40:60],
            test_catalog=demo_frame[60:80],
        )


def test_every_problem_is_reported_at_once(demo_copy):
    df = pd.read_csv(demo_copy)
    df = df.astype({c: float for c in SCHEMA.label_cols})
    df.loc[3, "smooth-or-featured_smooth"] = np.nan
    df.loc[4, "disk-edge-on_yes"] = -2
    df.loc[5, "has-spiral-arms_no"] = 2.5
    df["has-spiral-arms_yes"] = df["has-spiral-arms_yes"].astype(object)
    df.loc[6, "has-spiral-arms_yes"] = "many"
    df.loc[7, "id_str"] = df.loc[8, "id_str"]
    df.loc[9, "file_loc"] = "images/not-there.jpg"
    df["extra_unknown_column"] = 1  # ignored
    bad = demo_copy.parent / "bad.csv"
    df.to_csv(bad, index=False)
    with pytest.raises(CatalogError) as info:
        load_splits(SCHEMA, catalog=bad)
    message = str(info.value)
    assert str(bad) in message and "7 problem(s)" in message
    for expected in (
        "missing (NaN) votes in smooth-or-featured_smooth (use 0 for a question not asked) (1): row 3",
        "negative votes in disk-edge-on_yes (1): row 4 (-2",
        "non-integer votes in has-spiral-arms_no",
        "row 5 (2.5)",
        "non-numeric votes in has-spiral-arms_yes (1): row 6 ('many')",
        "duplicate id_str (ids must be unique) (2): row 7",
        "image files that do not exist (1): row 9:",
        "not-there.jpg",
    ):
        assert expected in message
    assert "extra_unknown_column" not in message


def test_a_repeated_id_is_found_behind_an_empty_one(demo_frame):
    """Ids in order apart from one repeat behind a missing id, which the order check cannot compare."""
    df = demo_frame.head(4).copy()
    df["id_str"] = ["G0", "G1", None, "G0"]
    problems = find_problems(read_catalog(df), SCHEMA, "frame", check_files=False)
    assert problems.kinds == {
        "empty id_str (give every galaxy an id)": ["row 2"],
        "duplicate id_str (ids must be unique)": ["row 0 ('G0')", "row 3 ('G0')"],
    }


def test_long_lists_are_cut_with_the_total(demo_frame):
    df = demo_frame.copy()
    df["file_loc"] = df["file_loc"] + ".missing"
    with pytest.raises(CatalogError, match=r"image files that do not exist \(370\).*and 365 more"):
        load_splits(SCHEMA, catalog=df)


@pytest.mark.parametrize("pad", ["{} ", " {} "])
def test_ids_and_paths_stay_text_whatever_spaces_surround_the_header(demo_copy, pad):
    """Numeric-looking ids keep their leading zeros (they name galaxies in splits and skip lists)."""
    df = pd.read_csv(demo_copy)
    df["id_str"] = [f"{i:05d}" for i in range(len(df))]
    (demo_copy.parent / df.loc[0, "file_loc"]).rename(demo_copy.parent / "0012")
    df.loc[0, "file_loc"] = "0012"
    lines = df.to_csv(index=False).splitlines()
    lines[0] = ",".join(pad.format(name) for name in lines[0].split(","))  # "id_str ,file_loc ,..."
    path = demo_copy.with_name("padded.csv")
    path.write_text("\n".join(lines) + "\n")
    read = read_catalog(path)
    assert read["id_str"].iloc[:3].tolist() == ["00000", "00001", "00002"]
    assert read["file_loc"].iloc[0] == f"{demo_copy.parent}/0012"
    assert sorted(load_splits(SCHEMA, catalog=path).train["id_str"].str.len().unique()) == [5]


AS_NOBODY = """
import os, sys
from zoobot_hpc.catalog import CatalogError, load_splits
from zoobot_hpc.schema import load_schema
schema = load_schema("decals_rings")
os.setgroups([]), os.setgid(65534), os.setuid(65534)  # after the imports: the interpreter may be under /root
try:
    print(len(load_splits(schema, catalog=sys.argv[1]).train))
except CatalogError as err:
    sys.exit(str(err))
"""


def _load_splits_as_nobody(images_mode: int) -> subprocess.CompletedProcess:
    """`load_splits` of a copy of the demo catalog as user 65534, its images folder in `images_mode`."""
    if os.geteuid() != 0:
        pytest.skip("checks as user 65534, which needs root to switch to (CI runs as root)")
    with tempfile.TemporaryDirectory() as tmp:  # not tmp_path: pytest's base folder is private to root
        Path(tmp).chmod(0o755)
        shutil.copytree(demo_catalog().parent, Path(tmp) / "demo")
        (Path(tmp) / "demo" / "images").chmod(images_mode)
        return subprocess.run(
            [sys.executable, "-c", AS_NOBODY, f"{tmp}/demo/catalog.csv", tmp],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip


def test_images_in_a_folder_that_can_be_entered_but_not_listed_exist():
    """Mode 711 (shared project folders): listing the folder fails, but its files open."""
    result = _load_splits_as_nobody(0o711)
    assert result.returncode == 0 and result.stdout.split()[-1] == "259", result.stderr[-2000:]


def test_images_in_a_folder_this_user_cannot_enter_are_reported_as_such():
    """Mode 700 of another user: the files are there but look missing; the error says why."""
    result = _load_splits_as_nobody(0o700)
    tmp = result.args[-1]
    assert result.returncode == 1, result.stdout
    assert "image files that do not exist (370)" in result.stderr, result.stderr[-2000:]
    assert f"(this user cannot enter {tmp}/demo/images: check its permissions)" in result.stderr
