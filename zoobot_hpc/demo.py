"""The bundled demo: 370 real DECaLS galaxies (128 px) with GZ DECaLS votes, trained briefly on CPU."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

DEMO_SCHEMA = "decals_rings"
DEMO_SETTINGS: dict[str, Any] = {
    "model_architecture": "efficientnet",
    "batch_size": 32,
    "resize_size": 64,
    "gpus": 0,
    "num_workers": 1,
    "prefetch_factor": 2,
    "patience": 3,
}


def demo_catalog() -> Path:
    """Path of the bundled demo catalog (CSV; `file_loc` relative to it)."""
    return Path(str(resources.files("zoobot_hpc") / "demo_data" / "catalog.csv"))


def run_demo(save_dir: str | Path, epochs: int = 3, **overrides: Any) -> dict[str, Any]:
    """Train on the demo for a few epochs and print a one-screen summary; returns its figures."""
    from zoobot_hpc.training import read_splits, train

    settings = {**DEMO_SETTINGS, **overrides}
    start = time.perf_counter()
    model, trainer = train(save_dir, DEMO_SCHEMA, catalog=demo_catalog(), epochs=epochs, **settings)
    elapsed = time.perf_counter() - start
    splits = read_splits(save_dir)
    save_dir = Path(save_dir).resolve()
    checkpoint = trainer.checkpoint_callback
    summary = {
        "galaxies": {split: len(frame) for split, frame in splits.items()},
        "epochs": trainer.current_epoch,
        "best_val_loss": float(checkpoint.best_model_score),
        "best_checkpoint": checkpoint.best_model_path,
        "seconds": elapsed,
    }
    lines = [
        "",
        "zoobot-hpc demo: done",
        f"  galaxies      train {summary['galaxies']['train']}, val {summary['galaxies']['val']}, "
        f"test {summary['galaxies']['test']} (schema {DEMO_SCHEMA}, {len(model.schema.label_cols)} answers)",
        f"  trained       {summary['epochs']} epochs of {settings['model_architecture']} at "
        f"{settings['resize_size']} px on CPU in {elapsed:.0f} s",
        f"  best val loss {summary['best_val_loss']:.3f} (Dirichlet-Multinomial NLL per galaxy)",
        f"  checkpoint    {summary['best_checkpoint']}",
        f"  resume from   {save_dir / 'checkpoints' / 'last.ckpt'}",
        f"  config        {save_dir / 'config.yaml'}",
        f"  logs          tensorboard --logdir {save_dir / 'tensorboard'}",
    ]
    print("\n".join(lines))
    return summary
