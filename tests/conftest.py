"""Shared fixtures: the bundled demo galaxies and the 370 real 424-px galaxies in ../shared."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from zoobot_hpc.catalog import read_catalog
from zoobot_hpc.demo import demo_catalog

REPO = Path(__file__).resolve().parents[1]
SHARED_RINGS = Path(os.environ.get("ZOOBOT_SHARED_DATA", REPO.parent / "shared" / "data")) / "decals_rings"


@pytest.fixture(scope="session")
def demo_frame() -> pd.DataFrame:
    """The bundled demo catalog with absolute file_loc (370 galaxies, 128 px, schema decals_rings)."""
    return read_catalog(demo_catalog())


@pytest.fixture(scope="session")
def shared_catalog() -> Path:
    """The 370 real 424-px DECaLS galaxies from ../shared (read-only)."""
    path = SHARED_RINGS / "catalog.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found: set ZOOBOT_SHARED_DATA to the folder holding decals_rings/")
    return path


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    """A writable copy of the demo catalog and its images, for tests that damage files."""
    target = tmp_path / "demo"
    shutil.copytree(demo_catalog().parent, target)
    return target / "catalog.csv"


def rank_correlation(a, b) -> float:
    import numpy as np

    def ranks(x):
        return np.argsort(np.argsort(np.asarray(x)))

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])
