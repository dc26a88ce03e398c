"""zoobot-hpc: train Galaxy Zoo morphology models from scratch, and predict with them, on Slurm clusters."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("zoobot-hpc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

_LAZY = {
    "train": "zoobot_hpc.training",
    "predict": "zoobot_hpc.prediction",
    "Schema": "zoobot_hpc.schema",
    "load_schema": "zoobot_hpc.schema",
    "GalaxyZooModel": "zoobot_hpc.galaxy_model",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import torch and Lightning only when the API that needs them is used (fast CLI start)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zoobot_hpc' has no attribute {name!r}")
