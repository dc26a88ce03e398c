"""Real faults during training: unreadable images, non-finite losses, hanging reads, kills while a
checkpoint is being written, a full disk, SIGTERM at a time limit, and resume that is exact."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import yaml

from zoobot_hpc import GalaxyZooModel, train
from zoobot_hpc.atomic import CheckpointWriteError
from zoobot_hpc.catalog import read_catalog
from zoobot_hpc.cli import main
from zoobot_hpc.data import GalaxyDataModule, ImageError, LoaderSettings
from zoobot_hpc.galaxy_model import NonFiniteLossError
from zoobot_hpc.schema import load_schema

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
TINY = {"gpus": 0, "num_workers": 0, "resize_size": 32, "batch_size": 8, "trainer_kwargs": QUIET}


def _splits(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {"train_catalog": frame[:24], "val_catalog": frame[24:32], "test_catalog": frame[32:40]}


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


# -- unreadable images -------------------------------------------------------------------------------


def test_unreadable_training_image_stops_the_run_naming_it(tmp_path, demo_copy):
    frame = read_catalog(demo_copy).iloc[:40]
    _truncate(frame["file_loc"].iat[5])
    with pytest.raises(ImageError) as err:
        train(tmp_path / "run", "decals_rings", epochs=1, **_splits(frame), **TINY)
    assert frame["file_loc"].iat[5] in str(err.value) and "on_bad_image='skip'" in str(err.value)


def test_unreadable_image_on_one_ddp_rank_stops_every_rank_naming_it(tmp_path, demo_copy):
    """Two gloo ranks; the truncated image is in rank 1's first batch. Rank 0, whose message the user
    sees, must stop with the same error naming the file, not die on a closed connection (gloo) or
    wait for the process-group timeout (NCCL)."""
    frame = read_catalog(demo_copy).iloc[:40]
    order = torch.randperm(24, generator=torch.Generator().manual_seed(42))  # DistributedSampler's
    bad = frame["file_loc"].iat[int(order[1])]  # rank 1 takes order[1::2]
    _truncate(bad)
    splits = {}
    for name, part in _splits(frame).items():
        part.to_parquet(tmp_path / f"{name}.parquet")
        splits[name] = str(tmp_path / f"{name}.parquet")
    config = _config(tmp_path, frame, tmp_path / "run", epochs=1, catalog=None, batch_size=4, gpus=2,
                     accelerator="cpu", **splits)  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "zoobot_hpc", "train", "--config", str(config)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"zoobot-hpc train: error: image {bad} cannot be decoded" in result.stderr
        and "on_bad_image='skip'" in result.stderr
    )
    assert "Traceback" not in result.stderr and "Connection closed" not in result.stderr


def test_skipped_images_are_listed_counted_and_training_finishes(tmp_path, demo_copy):
    frame = read_catalog(demo_copy).iloc[:40]
    _truncate(frame["file_loc"].iat[5])  # train split
    Path(frame["file_loc"].iat[26]).write_text("not a JPEG")  # val split
    save_dir = tmp_path / "run"
    train(save_dir, "decals_rings", epochs=2, on_bad_image="skip", **_splits(frame), **TINY)
    listed = (save_dir / "skipped_images.txt").read_text().splitlines()[1:]
    assert sorted(line.split("\t")[0] for line in listed) == sorted(frame["id_str"].iloc[[5, 26]])
    assert all("cannot be decoded" in line for line in listed)
    assert yaml.safe_load((save_dir / "results.yaml").read_text())["skipped_images"] == 2


def test_validate_check_images_lists_every_unreadable_file(tmp_path, demo_copy, capsys):
    frame = read_catalog(demo_copy).iloc[:40]
    for row in (3, 17, 33):
        _truncate(frame["file_loc"].iat[row])
    catalog = tmp_path / "catalog.csv"
    frame.to_csv(catalog, index=False)
    settings = ["--set", f"catalog={catalog}", "--set", "schema=decals_rings", "--set", "gpus=0",
                "--set", f"save_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(["validate", *settings]) == 0  # the cheap checks do not open images
    assert main(["validate", *settings, "--check-images", "--workers", "2"]) == 2
    out = capsys.readouterr().out
    assert "3 of 40 images cannot be decoded" in out
    assert all(frame["file_loc"].iat[row] in out for row in (3, 17, 33))


def test_hanging_image_read_stops_the_run_with_a_clear_message(tmp_path, demo_copy):
    """A read that never returns, as from a stalled network filesystem: mid-run, one training image
    is replaced by a FIFO, whose open() blocks forever in the DataLoader worker. The run must end
    after `loader_timeout`, saying what to check, and leave no worker behind; before that, the hang
    report shows where the main process waits."""
    frame = read_catalog(demo_copy).iloc[:300]
    save_dir = tmp_path / "run"
    config = _config(tmp_path, frame, save_dir, epochs=50, rows=300)
    command = [sys.executable, "-m", "zoobot_hpc", "train", "--config", str(config),
               "--set", "num_workers=1", "--set", "loader_timeout=5",
               "--set", "hang_report_after=2"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (save_dir / "checkpoints" / "last.ckpt").exists():  # the workers have read every image
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no epoch finished in 300 s"
            time.sleep(0.2)
        image = Path(pd.read_parquet(save_dir / "splits" / "train.parquet")["file_loc"].iat[0])
        fifo = image.with_suffix(".fifo")
        os.mkfifo(fifo)
        os.replace(fifo, image)
        _, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 1, stderr[-3000:]
    assert "no batch arrived from the DataLoader workers for 5 s" in stderr, stderr[-3000:]
    assert "validate --check-images" in stderr and "Traceback" not in stderr
    # the hang report, every 2 s while no batch finishes: the main thread waits for the workers' batch
    before_the_stop = stderr[: stderr.index("no batch arrived")]
    report = before_the_stop[before_the_stop.rindex("Timeout (0:00:02)!") :]
    assert "_try_get_data" in report, before_the_stop[-3000:]


LOADING_SCRIPT = """
import sys, torch
from zoobot_hpc.data import GalaxyDataset, LoaderSettings
torch.set_num_threads(int(sys.argv[1]))  # 2: the workers start threads before worker_init_fn runs
dataset = GalaxyDataset(sys.argv[3:], None, color=False, size=(64, 64))
loader = LoaderSettings(batch_size=2, num_workers=2, prefetch_factor=2).loader(dataset)
for epoch in range(2):
    for batch in loader:
        if sys.argv[2] == "raise":
            raise RuntimeError("an error while the loader workers run")
print("loaded")
"""


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ending", ["raise", "return"])
def test_a_process_with_loader_workers_running_ends(demo_frame, threads, ending):
    """The workers ignore the job's SIGTERM, but not the one Python's exit sends them (the loader still
    referenced: its persistent workers alive, after an uncaught error or a normal end): the process
    ends instead of waiting for them forever. With `torch.set_num_threads(2)` before the loader it
    waited, every time, until the workers were forked with SIGTERM blocked."""
    paths = list(demo_frame["file_loc"].iloc[:20])
    result = subprocess.run(
        [sys.executable, "-c", LOADING_SCRIPT, str(threads), ending, *paths],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if ending == "raise":
        assert result.returncode == 1 and "an error while the loader workers run" in result.stderr, (
            result.stderr
        )
    else:
        assert result.returncode == 0 and result.stdout == "loaded\n", result.stderr


# -- non-finite losses -------------------------------------------------------------------------------


class _CorruptOneBatch(pl.Callback):
    """A vote count that slipped past every check (-1) in the third batch: the loss is not finite."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            batch["votes"][0, 0] = -1
            self.ids = trainer.datamodule.ids("train", batch["index"][:1])
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 2:
            self.after = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _fit_with_corrupt_batch(demo_frame, policy: str) -> tuple[GalaxyZooModel, pl.Trainer, _CorruptOneBatch]:
    schema = load_schema("decals_rings")
    frame = demo_frame.iloc[:48]
    datamodule = GalaxyDataModule(
        frame[:32], frame[32:40], frame[40:48], schema.label_cols, False, LoaderSettings(8, 0, 2)
    )
    model = GalaxyZooModel(schema.to_dict(), resize_size=32, on_nonfinite_loss=policy)
    corrupt = _CorruptOneBatch()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[corrupt],
        **QUIET,
    )
    trainer.fit(model, datamodule=datamodule)
    return model, trainer, corrupt


def test_nonfinite_loss_stops_naming_the_galaxies_of_the_batch(demo_frame):
    with pytest.raises(NonFiniteLossError, match="on_nonfinite_loss='skip'") as err:
        _fit_with_corrupt_batch(demo_frame, "error")
    assert "at step 2" in str(err.value)


def test_nonfinite_loss_skipped_leaves_the_weights_untouched_and_is_counted(demo_frame):
    model, trainer, corrupt = _fit_with_corrupt_batch(demo_frame, "skip")
    assert model.skipped_steps == 1
    optimizer = trainer.optimizers[0]
    assert {int(state["step"]) for state in optimizer.state.values()} == {3}  # 4 batches, 3 updates
    unchanged = [k for k in corrupt.before if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(corrupt.before[k], corrupt.after[k]) for k in unchanged)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- kills, full disks and signals -------------------------------------------------------------------


def _config(
    tmp_path: Path, demo_frame: pd.DataFrame, save_dir: Path, epochs: int, rows: int = 96, **overrides: object
) -> Path:
    catalog = tmp_path / "catalog.parquet"
    demo_frame.iloc[:rows].to_parquet(catalog)
    config = tmp_path / "config.yaml"
    settings = {"save_dir": str(save_dir), "schema": "decals_rings", "catalog": str(catalog),
                "epochs": epochs, "gpus": 0, "num_workers": 0, "resize_size": 32, "batch_size": 16,
                "patience": 100, **overrides}  # fmt: skip
    config.write_text(yaml.safe_dump(settings))
    return config


def _train_process(config: Path) -> subprocess.Popen:
    """`zoobot-hpc train` in its own process group, which `os.killpg` signals as Slurm signals a step."""
    command = [sys.executable, "-m", "zoobot_hpc", "train", "--config", str(config)]
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _load_all(folder: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, map_location="cpu", weights_only=False) for p in folder.glob("*.ckpt")}


def test_sigkill_while_a_checkpoint_is_written_leaves_loadable_checkpoints(tmp_path, demo_frame):
    """Kill while the second checkpoint file of an attempt is being written (last.ckpt follows the
    top-k file), at its first moment and a little later; three attempts, then a clean rerun."""
    save_dir = tmp_path / "run"
    config = _config(tmp_path, demo_frame, save_dir, epochs=5)
    folder = save_dir / "checkpoints"
    for delay in (0.0, 0.02, 0.08):
        process = _train_process(config)
        deadline = time.monotonic() + 300
        seen: set[str] = set()
        while len(seen) < 2:
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint write seen in 300 s"
            seen.update(p.name for p in folder.glob(".*.ckpt.*.tmp"))
            time.sleep(0.002)
        time.sleep(delay)
        process.kill()
        process.wait()
        assert _load_all(folder)  # every file under a final name is whole (torch.load would fail)
    rerun = subprocess.run(
        [sys.executable, "-m", "zoobot_hpc", "train", "--config", str(config)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list(folder.glob(".*.tmp"))  # the killed attempts' temporaries were cleaned up
    assert _load_all(folder)["last.ckpt"]["epoch"] == 4


@pytest.mark.parametrize(
    ("ranks", "workers", "whole_group"),
    [(1, 0, False), (2, 0, False), (1, 2, True)],
    ids=["one-rank", "two-ranks-rank0-only", "loader-workers-signalled-too"],
)
def test_sigterm_mid_epoch_saves_a_full_state_checkpoint(tmp_path, demo_frame, ranks, workers, whole_group):
    """What Slurm sends at the time limit (and on scancel/preemption) before SIGKILL. With two DDP
    ranks only rank 0 is signalled here: the ranks agree at the next step and both stop there. Slurm
    signals every process of the step, loader workers included: they must survive it."""
    save_dir = tmp_path / "run"
    hardware = {"gpus": ranks, "accelerator": "cpu"} if ranks > 1 else {}
    config = _config(
        tmp_path, demo_frame, save_dir, epochs=4, rows=200, num_workers=workers, prefetch_factor=2, **hardware
    )
    last = save_dir / "checkpoints" / "last.ckpt"
    process = _train_process(config)
    epoch_ends = _wait_for_rewrites(last, process, count=2)  # epochs 0 and 1
    epoch_end = torch.load(last, map_location="cpu", weights_only=False)
    steps_per_epoch = epoch_end["global_step"] // (epoch_end["epoch"] + 1)
    time.sleep(0.3 * (epoch_ends[1] - epoch_ends[0]))  # into epoch 2's training, however fast the machine
    if whole_group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert process.returncode == 1 and "stopped by SIGTERM at epoch" in stderr, stderr[-3000:]
    assert 2 * steps_per_epoch <= saved["global_step"] < 4 * steps_per_epoch  # mid-run, not the end
    assert saved["optimizer_states"] and saved["loops"]["fit_loop"]  # full state: a rerun resumes it
    rerun = subprocess.run(
        [sys.executable, "-m", "zoobot_hpc", "train", "--config", str(config)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["epoch"] == 3 and final["global_step"] == 4 * steps_per_epoch  # none lost or repeated


def _wait_for_rewrites(path: Path, process: subprocess.Popen, count: int) -> list[float]:
    """When `path` was written (atomically: a new inode each time) its first `count` times."""
    seen, times = None, []
    deadline = time.monotonic() + 300
    while len(times) < count:
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} written {len(times)} times in 300 s, not {count}"
        with contextlib.suppress(FileNotFoundError):
            status = path.stat()
            identity = (status.st_ino, status.st_mtime_ns)
            if identity != seen:
                seen = identity
                times.append(time.monotonic())
        time.sleep(0.01)
    return times


@pytest.fixture
def small_disk(tmp_path):
    """A 150 MB tmpfs: room for two checkpoints of the tiny model with its optimizer state, not four."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mount_point)])
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, demo_frame, small_disk):
    save_dir = small_disk / "run"
    with pytest.raises(CheckpointWriteError, match=r"MB free in .*choose another save_dir") as err:
        train(save_dir, "decals_rings", catalog=demo_frame.iloc[:64], epochs=6, patience=100,
              **{**TINY, "batch_size": 16})  # fmt: skip
    assert str(save_dir) in str(err.value)
    remaining = _load_all(save_dir / "checkpoints")
    assert remaining and all(c["state_dict"] for c in remaining.values())
    assert not list((save_dir / "checkpoints").glob(".*.tmp"))


# -- exact resume -------------------------------------------------------------------------------------


def test_resume_after_an_epoch_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, demo_frame):
    settings = {"schema": "decals_rings", "catalog": demo_frame.iloc[:64], "patience": 100, **TINY}
    train(tmp_path / "straight", epochs=2, **settings)
    train(tmp_path / "resumed", epochs=1, **settings)
    train(tmp_path / "resumed", epochs=2, **settings)
    straight, resumed = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for run in ("straight", "resumed")
    )
    assert straight["global_step"] == resumed["global_step"] > 0
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
