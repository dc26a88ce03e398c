"""Throughput telemetry: logged on a real run; the loader-bound warning names the cause and the cure."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from zoobot_hpc import train
from zoobot_hpc.telemetry import ThroughputMonitor
from zoobot_hpc.training import read_metrics


def test_a_real_run_logs_images_per_second_and_the_data_wait_fraction(tmp_path, demo_frame):
    frame = demo_frame.iloc[:40]
    splits = {"train_catalog": frame[:32], "val_catalog": frame[32:36], "test_catalog": frame[36:40]}
    train(tmp_path / "run", "decals_rings", epochs=1, gpus=0, num_workers=0, resize_size=16, batch_size=4,
          trainer_kwargs={"enable_progress_bar": False}, **splits)  # fmt: skip
    metrics = read_metrics(tmp_path / "run")
    images_per_s = metrics["perf/images_per_s"].dropna()
    fraction = metrics["perf/data_wait_fraction"].dropna()
    assert len(images_per_s) and (images_per_s > 0).all()
    assert len(fraction) and ((fraction > 0) & (fraction < 1)).all()


def test_loader_bound_advice_names_the_cures_that_apply():
    png_run = ThroughputMonitor(num_workers=1, file_locs=np.array(["a.png", "b.png", "c.jpg"]))
    png_run.waits, png_run.steps, png_run.images = [3.0], [1.0], 64
    advice = png_run.advice(0.75)
    assert "75% of each step is spent waiting for images (16 images/s on this rank)" in advice
    assert "store the images as JPEG" in advice and "node-local disk" in advice
    jpeg_run = ThroughputMonitor(num_workers=10_000, file_locs=np.array(["a.jpg"]))
    jpeg_run.waits, jpeg_run.steps, jpeg_run.images = [1.0], [1.0], 10
    assert "JPEG" not in jpeg_run.advice(0.5) and "num_workers" not in jpeg_run.advice(0.5)
    assert "grey='luma'" not in jpeg_run.advice(0.5)
    zoobot_grey_run = ThroughputMonitor(num_workers=10_000, file_locs=np.array(["a.jpg"]), grey_from_rgb=True)
    zoobot_grey_run.waits, zoobot_grey_run.steps, zoobot_grey_run.images = [1.0], [1.0], 10
    assert "train with grey='luma'" in zoobot_grey_run.advice(0.5)


STARVED_RANK_1 = """
import sys, time
import pytorch_lightning as pl
from zoobot_hpc import train
from zoobot_hpc.catalog import read_catalog

# after each step rank 1 waits, as for a slow loader (ThroughputMonitor has noted the step's end);
# rank 0 meanwhile waits for it at the start of the next step, where the ranks agree on signals
class StarveRank1(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_rank == 1:
            time.sleep(0.25)

original = pl.Trainer.__init__
def init(self, *args, callbacks=(), **kwargs):
    original(self, *args, callbacks=[*callbacks, StarveRank1()], **kwargs)
pl.Trainer.__init__ = init
train(sys.argv[1], "decals_rings", catalog=read_catalog(sys.argv[2]).iloc[:80], epochs=1, gpus=2,
      accelerator="cpu", num_workers=0, resize_size=16, batch_size=4,
      trainer_kwargs={"enable_progress_bar": False})
"""


def test_a_starved_rank_in_ddp_makes_rank_0_warn(tmp_path):
    """Two CPU DDP ranks; only rank 1 waits for data. Rank 0, which warns, must see that wait too: the
    ranks synchronise between steps (where they agree on signals), so rank 0 waits for rank 1 before
    its next step starts (measured: 0.26 s waits on both ranks)."""
    from zoobot_hpc.demo import demo_catalog

    script = tmp_path / "starved.py"
    script.write_text(STARVED_RANK_1)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), str(demo_catalog())],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training is loader-bound" in result.stderr, result.stderr[-3000:]
