"""Real Lightning training on real galaxy images (a few CPU steps each)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image

from zoobot_hpc import GalaxyZooModel, train
from zoobot_hpc.catalog import read_catalog
from zoobot_hpc.checkpoint import CheckpointError
from zoobot_hpc.config import load_config
from zoobot_hpc.data import GalaxyDataModule, LoaderSettings, load_image
from zoobot_hpc.errors import InputError
from zoobot_hpc.interruptions import Interrupted
from zoobot_hpc.prediction import load_model, load_predictions, predict
from zoobot_hpc.training import read_metrics, read_splits

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
TINY = {"gpus": 0, "num_workers": 0, "resize_size": 32, "batch_size": 16, "trainer_kwargs": QUIET}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, demo_frame):
    save_dir = tmp_path_factory.mktemp("tiny_run")
    model, trainer = train(save_dir, "decals_rings", catalog=demo_frame.iloc[:120], epochs=2, **TINY)
    return save_dir, model, trainer


def test_returns_the_best_checkpoint_not_the_last(tiny_run):
    save_dir, model, trainer = tiny_run
    results = yaml.safe_load((save_dir / "results.yaml").read_text())
    best = trainer.checkpoint_callback.best_model_path
    assert results["best_checkpoint"] == best and Path(best).is_file()
    reloaded = GalaxyZooModel.load_from_checkpoint(best, map_location="cpu")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert (save_dir / "checkpoints" / "last.ckpt").is_file()
    assert results["epochs_completed"] == 2 and "test_loss" in results["test"]


def test_checkpoint_alone_is_enough_to_reload(tiny_run):
    _, _, trainer = tiny_run
    checkpoint = torch.load(
        trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=False
    )
    hparams = checkpoint["hyper_parameters"]
    assert hparams["schema"]["name"] == "decals_rings"
    assert hparams["model_architecture"] == "efficientnet" and hparams["channels"] == 1
    assert hparams["resize_size"] == 32 and tuple(hparams["crop_scale_bounds"]) == (0.7, 0.8)
    assert hparams["package_version"]
    assert hparams["channels_last"] is True  # channels_last="auto" on the CPU
    model = GalaxyZooModel.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert model.schema.label_cols[0] == "smooth-or-featured_smooth"
    stem = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    outputs = []
    stem.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    model.encode(torch.rand(2, 1, 32, 32))
    assert outputs[0].is_contiguous(memory_format=torch.channels_last) and not outputs[0].is_contiguous()


def test_resolved_config_reruns_and_logs_exist(tiny_run):
    save_dir, _, _ = tiny_run
    config = load_config(save_dir / "config.yaml")  # every key is a train() argument
    assert config["train_catalog"].endswith("train.parquet") and config["epochs"] == 2
    splits = read_splits(save_dir)
    assert sum(len(s) for s in splits.values()) == 120
    assert list((save_dir / "tensorboard").glob("events.out.tfevents.*"))
    metrics = read_metrics(save_dir)
    assert {"val_loss/smooth-or-featured", "val_loss/has-spiral-arms"} <= set(metrics.columns)
    assert metrics.dropna(subset=["val_loss"])["epoch"].tolist() == [0, 1]


def test_metrics_of_an_attempt_killed_while_writing_them_are_left_out(tmp_path):
    """SIGKILL can land while Lightning writes metrics.csv: an empty file, or a last line cut short."""
    attempts = {
        0: "",  # killed between creating the file and writing its header
        1: "epoch,step,val_loss\r\n0,5,1.25\r\n",
        2: "epoch,step,val_loss\r\n1,10,0.875\r\n2,15,0.7",  # cut short: 0.7 may have been 0.71875
    }
    for version, text in attempts.items():
        folder = tmp_path / "csv" / f"version_{version}"
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text(text)
    metrics = read_metrics(tmp_path)
    assert metrics[["epoch", "val_loss"]].values.tolist() == [[0, 1.25], [1, 0.875]]


def test_numpy_settings_train_and_are_recorded_as_plain_yaml(tmp_path, demo_frame):
    settings = {**TINY, "batch_size": np.int64(16), "crop_scale_bounds": np.array([0.7, 0.8])}
    model, _ = train(tmp_path, "decals_rings", catalog=demo_frame.iloc[:60], epochs=np.int64(1), **settings)
    text = (tmp_path / "config.yaml").read_text()
    assert "!!python" not in text
    config = yaml.safe_load(text)
    assert config["batch_size"] == 16 and config["crop_scale_bounds"] == [0.7, 0.8]
    assert type(model.hparams.crop_scale_bounds[0]) is float


def add_trainer_callback(monkeypatch, callback: pl.Callback, first: bool = False) -> None:
    """One more callback in the Trainer that train() builds (train() owns its callback list), after
    train()'s own or (`first`) before them."""
    original = pl.Trainer.__init__

    def init(self, *args, callbacks=(), **kwargs):
        original(self, *args, callbacks=[callback, *callbacks] if first else [*callbacks, callback], **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", init)


class _Seeds(pl.Callback):
    """The seed each training batch's augmentation and dropout were drawn from."""

    def __init__(self) -> None:
        self.seeds: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seeds.append(torch.initial_seed())


def test_accumulated_batches_draw_their_own_augmentations(tmp_path, demo_frame, monkeypatch):
    """Two batches per optimizer step (accumulate_grad_batches=2): each batch gets its own seed."""
    seeds = _Seeds()
    add_trainer_callback(monkeypatch, seeds)
    kwargs = {**QUIET, "accumulate_grad_batches": 2, "limit_val_batches": 1}
    train(
        tmp_path, "decals_rings", catalog=demo_frame.iloc[:90], epochs=2, **{**TINY, "trainer_kwargs": kwargs}
    )
    assert len(seeds.seeds) == 6  # 3 batches of 16 per epoch (63 training galaxies, the rest dropped) x 2
    assert len(set(seeds.seeds)) == len(seeds.seeds)


class _SigtermAtSanityCheck(pl.Callback):
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler is in place: it ends the stage


def test_sigterm_before_training_starts_is_an_interruption_not_a_success(tmp_path, demo_frame, monkeypatch):
    """Lightning ends a stage that SIGTERM reaches with a SystemExit that exits 0; a job killed before
    its first step must not look finished."""
    add_trainer_callback(monkeypatch, _SigtermAtSanityCheck())
    settings = {**TINY, "batch_size": 4}  # 12 validation galaxies: the signal lands before the last batch
    with pytest.raises(Interrupted, match="stopped by SIGTERM before training"):
        train(tmp_path, "decals_rings", catalog=demo_frame.iloc[:120], epochs=1, **settings)


class _SigtermInLastValidation(pl.Callback):
    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == trainer.max_epochs - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # after the last training step


def test_sigterm_in_the_last_validation_stops_before_the_test(tmp_path, demo_frame, monkeypatch):
    """Slurm's SIGTERM after the last step must not be lost (the test would start, and SIGKILL end it
    there): the run stops with the finished fit saved, and the rerun only tests it."""
    add_trainer_callback(monkeypatch, _SigtermInLastValidation())
    settings = {"schema": "decals_rings", "catalog": demo_frame.iloc[:90], "epochs": 2, **TINY}
    with pytest.raises(Interrupted, match="stopped by SIGTERM at the end of training, step 6; saved"):
        train(tmp_path, **settings)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (1, 6)
    assert not (tmp_path / "results.yaml").exists()
    monkeypatch.undo()
    train(tmp_path, **settings)
    results = yaml.safe_load((tmp_path / "results.yaml").read_text())
    assert results["test"] and results["epochs_completed"] == 2
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 6  # nothing trained again


class _NoImprovementThenSigterm(pl.Callback):
    """A validation loss that never improves (early stopping with patience 1 stops after epoch 1),
    and SIGTERM in epoch 1's validation. Runs before train()'s callbacks, so early stopping sees the
    constant."""

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_end(self, trainer, pl_module) -> None:
        trainer.callback_metrics["val_loss"] = torch.tensor(1.0)


def test_a_run_stopped_early_and_interrupted_there_does_not_train_again(tmp_path, demo_frame, monkeypatch):
    """Early stopping decides in the validation that SIGTERM interrupts: the rerun must go straight
    to the test, not train another epoch (Lightning checkpoints the counter, not the decision)."""
    add_trainer_callback(monkeypatch, _NoImprovementThenSigterm(), first=True)
    settings = {"schema": "decals_rings", "catalog": demo_frame.iloc[:90], **TINY, "epochs": 5, "patience": 1}
    with pytest.raises(Interrupted, match="stopped by SIGTERM at the end of training, step 6; saved"):
        train(tmp_path, **settings)
    monkeypatch.undo()
    train(tmp_path, **settings)
    results = yaml.safe_load((tmp_path / "results.yaml").read_text())
    assert results["stopped_early"] and results["epochs_completed"] == 2 and results["test"]
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 6  # nothing trained again


def test_set_fills_an_empty_slurm_section(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("schema: decals_rings\nslurm:\n")
    assert load_config(config, ["slurm.mem=32G"])["slurm"] == {"mem": "32G"}


class _TrainerCalled(Exception):
    pass


def test_trainer_kwargs_that_train_sets_are_refused_before_any_work(tmp_path, demo_frame, monkeypatch):
    """Every pl.Trainer argument train() sets itself, found by catching the call: a duplicate in
    trainer_kwargs is refused naming the train() argument to use (or saying the package sets it)."""
    passed: dict = {}

    def record(**kwargs):
        passed.update(kwargs)
        raise _TrainerCalled

    settings = {**TINY, "trainer_kwargs": None}
    with monkeypatch.context() as patch:
        patch.setattr("zoobot_hpc.training.pl.Trainer", record)
        with pytest.raises(_TrainerCalled):
            train(tmp_path / "probe", "decals_rings", catalog=demo_frame.iloc[:60], **settings)
    assert {"max_epochs", "callbacks", "log_every_n_steps", "precision", "devices"} <= set(passed)
    for key in passed:
        with pytest.raises(InputError, match=rf"trainer_kwargs\[{key!r}\]"):
            train(tmp_path / key, "decals_rings", catalog=demo_frame.iloc[:60],
                  **{**settings, "trainer_kwargs": {key: passed[key]}})  # fmt: skip
        assert not (tmp_path / key).exists()
    with pytest.raises(InputError, match="'epochs'"):
        train(tmp_path / "run", "decals_rings", catalog=demo_frame.iloc[:60],
              **{**settings, "trainer_kwargs": {"max_epochs": 3}})  # fmt: skip


def test_seed_style_call_on_the_370_real_galaxies_improves_validation_loss(tmp_path, shared_catalog):
    model, trainer = train(
        tmp_path, "decals_rings", catalog=str(shared_catalog), model_architecture="efficientnet",
        batch_size=32, epochs=2, patience=8, color=False, resize_size=48,
        crop_scale_bounds=(0.7, 0.8), crop_ratio_bounds=(0.9, 1.1), nodes=1, gpus=0,
        num_workers=2, prefetch_factor=2, mixed_precision=False, random_state=42, trainer_kwargs=QUIET,
    )  # fmt: skip
    datamodule = trainer.datamodule
    untrained = GalaxyZooModel(**{k: v for k, v in model.hparams.items()})
    validate = trainer.validate
    before = validate(untrained, datamodule=datamodule, verbose=False)[0]["val_loss"]
    after = validate(model, datamodule=datamodule, verbose=False)[0]["val_loss"]
    assert after < before - 1.0, (before, after)
    assert after == pytest.approx(trainer.checkpoint_callback.best_model_score.item(), rel=1e-4)


def test_colour_training_and_resnets(tmp_path, demo_frame):
    model, _ = train(
        tmp_path / "colour", "decals_rings", catalog=demo_frame.iloc[:60], epochs=1, color=True,
        model_architecture="resnet_detectron", **TINY,
    )  # fmt: skip
    assert model.hparams.channels == 3
    assert model.encoder.layer2[0].conv1.stride == (2, 2) and model.encoder.layer2[0].conv2.stride == (1, 1)


def test_grey_mode_is_trained_recorded_and_used_for_prediction(tmp_path, demo_frame):
    """The default grey is the JPEG's own luma channel; grey='mean' (Zoobot's) is recorded in the
    checkpoint, prediction decodes as trained, and resuming with the default grey is refused."""
    paths = list(demo_frame["file_loc"].iloc[:4])
    luma = torch.stack([load_image(p, color=False) for p in paths])
    mean = torch.stack([load_image(p, color=False, grey="mean") for p in paths])
    with Image.open(paths[0]) as im:  # the JPEG's luma vs Pillow's luma of the rounded RGB decode
        difference = (luma[0, 0].int() - torch.from_numpy(np.array(im.convert("L"))).int()).abs()
    assert difference.max() <= 2 and difference.float().mean() < 0.5
    with Image.open(paths[0]) as im:  # Zoobot's grey: the rounded mean of R, G and B
        rgb = torch.from_numpy(np.array(im.convert("RGB"))).double()
    assert torch.equal(mean[0, 0], (rgb.sum(dim=2) / 3).round().to(torch.uint8))
    assert not torch.equal(luma, mean)

    frame = demo_frame.iloc[:60]
    resnet = {**TINY, "model_architecture": "resnet_detectron"}  # its outputs follow the pixels
    trained, _ = train(tmp_path / "mean", "decals_rings", catalog=frame, epochs=1, grey="mean", **resnet)
    assert trained.hparams.grey == "mean"
    checkpoint = next((tmp_path / "mean" / "checkpoints").glob("epoch=*.ckpt"))
    out = predict(checkpoint, paths, tmp_path / "p.parquet", dropout=False, num_workers=0, progress=False)
    predicted = load_predictions(out).set_index("id_str").loc[[Path(p).stem for p in paths]]
    reloaded = load_model(checkpoint)
    with torch.no_grad():
        expected = reloaded(reloaded.augment(mean, train=False), dropout=False)
        from_luma = reloaded(reloaded.augment(luma, train=False), dropout=False)
    assert not torch.allclose(expected, from_luma, rtol=1e-5)  # so the comparison below can fail
    columns = [f"{c}_concentration" for c in reloaded.schema.label_cols]
    assert np.allclose(predicted[columns].to_numpy(), expected.numpy(), rtol=1e-5)

    with pytest.raises(
        CheckpointError, match=r"grey='mean' vs grey='luma' \(set grey='mean' to continue it\)"
    ):
        train(tmp_path / "mean", "decals_rings", catalog=frame, epochs=2, **resnet)


@pytest.mark.parametrize("architecture", ["efficientnet", "resnet_torchvision", "resnet_detectron"])
@pytest.mark.parametrize("channels", [1, 3])
def test_architectures_output_one_concentration_per_answer(architecture, channels):
    schema = {"name": "t", "questions": [{"question": "q", "answers": ["a", "b", "c"], "asked_after": None}]}
    model = GalaxyZooModel(schema, model_architecture=architecture, channels=channels, resize_size=32).eval()
    out = model(torch.rand(2, channels, 32, 32))
    assert out.shape == (2, 3) and bool(((out > 1) & (out < 101)).all())


def test_datamodule_batches_are_uint8_and_augmented_on_the_model(demo_frame):
    datamodule = GalaxyDataModule(
        demo_frame[:8], demo_frame[8:12], demo_frame[12:16], ["smooth-or-featured_smooth"], False,
        LoaderSettings(batch_size=4, num_workers=0),
    )  # fmt: skip
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 1, 128, 128)
    assert batch["votes"].shape == (4, 1)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "zoobot_hpc", *args]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_run_resumes_from_last_checkpoint_at_the_next_epoch(tmp_path, demo_frame):
    """SIGKILL a real training process after its first epoch; the rerun continues, not restarts."""
    catalog = tmp_path / "catalog.parquet"
    demo_frame.iloc[:96].to_parquet(catalog)
    save_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "save_dir": str(save_dir),
                "schema": "decals_rings",
                "catalog": str(catalog),
                "epochs": 3,
                "gpus": 0,
                "num_workers": 0,
                "resize_size": 32,
                "batch_size": 16,
                "patience": 10,
            }
        )
    )
    process = subprocess.Popen(
        _cli("train", "--config", str(config)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    last = save_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # (epoch 1 must not end before the kill, however fast the machine)
    assert last.exists(), process.stderr.read().decode()[-2000:] if process.poll() is not None else "timeout"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    first_epoch = torch.load(last, map_location="cpu", weights_only=False)
    assert first_epoch["epoch"] == 0
    steps_per_epoch = first_epoch["global_step"]
    epoch0_files = {p.name: _sha(p) for p in (save_dir / "checkpoints").glob("epoch=0-*.ckpt")}
    assert len(epoch0_files) == 1

    rerun = subprocess.run(
        _cli("train", "--config", str(config)), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr and str(last) in rerun.stderr
    assert {p.name: _sha(p) for p in (save_dir / "checkpoints").glob("epoch=0-*.ckpt")} == epoch0_files
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["epoch"] == 2 and final["global_step"] == 3 * steps_per_epoch
    adam_steps = {int(s["step"]) for s in final["optimizer_states"][0]["state"].values()}
    assert adam_steps == {3 * steps_per_epoch}  # the optimizer state carried on; a fresh one would say 2x
    epochs_logged = read_metrics(save_dir).dropna(subset=["val_loss"])["epoch"].tolist()
    assert epochs_logged == [0, 1, 2]  # both attempts' learning curves survive the restart


def test_cpu_ddp_two_ranks_through_the_cli(tmp_path, demo_frame):
    """Lightning launches a second rank itself (no Slurm); both ranks train and agree on the result."""
    catalog = tmp_path / "catalog.parquet"
    demo_frame.iloc[:64].to_parquet(catalog)
    result = subprocess.run(
        _cli("train", "--set", f"save_dir={tmp_path / 'run'}", "--set", "schema=decals_rings",
             "--set", f"catalog={catalog}", "--set", "epochs=1", "--set", "gpus=2",
             "--set", "accelerator=cpu", "--set", "num_workers=0", "--set", "resize_size=32",
             "--set", "batch_size=8"),
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "distributed_backend=gloo" in result.stderr
        and "All distributed processes registered" in result.stderr
    )
    assert "Starting with 2 processes" in result.stderr
    checkpoint = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    # 44 training galaxies (70 %) split over 2 ranks of batch 8, last partial batch dropped: 2 steps
    assert checkpoint["global_step"] == 2
    assert read_catalog(tmp_path / "run" / "splits" / "train.parquet").shape[0] == 45
