"""Prediction with a real (tiny) trained model on real demo galaxies: outputs, MC dropout, shards, kills."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from zoobot_hpc import train
from zoobot_hpc.cli import main
from zoobot_hpc.data import ImageError, load_image
from zoobot_hpc.galaxy_model import GalaxyZooModel
from zoobot_hpc.prediction import (
    CheckpointError,
    PredictionError,
    full_pass_samples,
    load_model,
    load_predictions,
    merge_parts,
    part_name,
    predict,
    predict_inputs,
    resolve_inputs,
    sample_concentrations,
)

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
N_IMAGES = 24
_RUNS: dict[str, Path] = {}


def trained_run(tmp_path_factory: pytest.TempPathFactory, demo_frame: pd.DataFrame) -> Path:
    """save_dir of one tiny run per session (2 epochs, 32 px), shared by the prediction and report tests."""
    if "run" not in _RUNS:
        save_dir = tmp_path_factory.mktemp("predict_run")
        train(
            save_dir,
            "decals_rings",
            catalog=demo_frame.iloc[:64],
            epochs=2,
            gpus=0,
            num_workers=0,
            resize_size=32,
            batch_size=16,
            dropout_rate=0.5,
            trainer_kwargs=QUIET,
        )
        _RUNS["run"] = save_dir
    return _RUNS["run"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_frame) -> Path:
    return trained_run(tmp_path_factory, demo_frame) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, demo_frame) -> Path:
    """N_IMAGES real demo galaxies in a folder with one subfolder (recursive search)."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    for i, loc in enumerate(demo_frame["file_loc"].iloc[:N_IMAGES]):
        shutil.copy(loc, folder / ("sub" if i % 3 == 0 else "") / Path(loc).name)
    return folder


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory, checkpoint) -> Path:
    """The trained run's checkpoint with a freshly initialised ResNet in it: its outputs follow the
    pixels, where those of the tiny trained EfficientNet (or of a fresh one) hardly move, so tests
    that match predictions to images can fail."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=False)
    content["hyper_parameters"]["model_architecture"] = "resnet_detectron"
    torch.manual_seed(0)
    content["state_dict"] = GalaxyZooModel(**content["hyper_parameters"]).state_dict()
    path = tmp_path_factory.mktemp("resnet") / "resnet.ckpt"
    torch.save(content, path)
    return path


def concentrations_of(model, paths: list[str], grey: str) -> np.ndarray:
    """The model applied directly to the images, one batch, no dropout: what prediction must give."""
    pixels = torch.stack([load_image(p, color=False, grey=grey) for p in paths])
    with torch.no_grad():
        return model(model.augment(pixels, train=False), dropout=False).numpy()


FAST = {"batch_size": 8, "num_workers": 0, "progress": False}


def _answers(model) -> list[str]:
    return model.schema.label_cols


def _check_output(df: pd.DataFrame, ids: list[str], answers: list[str], n_samples: int) -> None:
    assert sorted(df["id_str"]) == sorted(ids) and df["id_str"].is_unique
    for answer in answers:
        samples = np.stack(df[f"{answer}_samples"].to_numpy())
        assert samples.shape == (len(ids), n_samples)
        assert ((samples > 1) & (samples < 101)).all()
        np.testing.assert_allclose(df[f"{answer}_concentration"], samples.mean(axis=1), rtol=1e-5)
        assert ((df[f"{answer}_fraction"] > 0) & (df[f"{answer}_fraction"] < 1)).all()


def test_folder_to_parquet_and_catalog_to_csv(tmp_path, checkpoint, model, image_folder, demo_frame):
    answers = _answers(model)
    out = predict(checkpoint, image_folder, tmp_path / "folder.parquet", n_samples=3, **FAST)
    folder_df = load_predictions(out)
    stems = sorted(p.stem for p in image_folder.rglob("*.jpg"))
    _check_output(folder_df, stems, answers, 3)
    meta = folder_df.attrs["zoobot_hpc"]
    assert meta["checkpoint"] == str(checkpoint.resolve()) and meta["n_samples"] == 3
    assert meta["schema"] == model.schema.to_dict() and meta["package_version"] and meta["skipped"] == []
    for question in model.schema.question_names:
        assert folder_df[f"{question}_reach"].between(0, 1).all()
    fractions = folder_df[[f"{a}_fraction" for a in answers[:3]]].sum(axis=1)
    np.testing.assert_allclose(fractions, 1.0, rtol=1e-5)  # smooth-or-featured's answers share its votes

    catalog = tmp_path / "catalog.csv"
    demo_frame.iloc[:N_IMAGES].to_csv(catalog, index=False)  # vote columns present and ignored
    out_csv = predict(checkpoint, catalog, tmp_path / "catalog.csv.out.csv", n_samples=4, **FAST)
    raw = pd.read_csv(out_csv)
    assert {f"{a}_s{i}" for a in answers for i in range(4)} <= set(raw.columns)
    csv_df = load_predictions(out_csv)
    _check_output(csv_df, list(demo_frame["id_str"].iloc[:N_IMAGES]), answers, 4)
    assert csv_df.attrs["zoobot_hpc"]["n_samples"] == 4
    assert list(csv_df["file_loc"]) == list(demo_frame["file_loc"].iloc[:N_IMAGES])


def test_inputs_order_ids_and_duplicate_stems(tmp_path, image_folder, demo_frame):
    first = resolve_inputs(image_folder)
    assert list(first["file_loc"]) == list(resolve_inputs(image_folder)["file_loc"])  # stable
    assert len(first) == N_IMAGES
    shutil.copytree(image_folder, tmp_path / "copy")
    twin = next((tmp_path / "copy" / "sub").glob("*.jpg"))
    shutil.copy(twin, tmp_path / "copy" / twin.name)  # same stem in two folders
    ids = resolve_inputs(tmp_path / "copy")["id_str"]
    assert ids.is_unique and {twin.stem, f"sub/{twin.stem}"} <= set(ids)
    with pytest.raises(PredictionError, match="listed twice"):
        resolve_inputs([twin, twin])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictionError, match="no images in"):
        resolve_inputs(tmp_path / "empty")


def test_encoder_once_equals_full_passes(model, demo_frame):
    """Seeded: each head sample equals the full pass with the same dropout mask; unseeded: same statistics."""
    images = torch.stack([load_image(p, color=False) for p in demo_frame["file_loc"].iloc[:3]])
    model.eval()
    with torch.inference_mode():
        for seed in range(3):
            torch.manual_seed(seed)
            once = sample_concentrations(model, images, 1)
            torch.manual_seed(seed)
            full = full_pass_samples(model, images, 1)
            torch.testing.assert_close(once, full, rtol=1e-5, atol=1e-4)

        n = 250
        once = sample_concentrations(model, images, n).double()
        # n full passes, batched: each row of the repeated batch draws its own dropout mask
        full = full_pass_samples(model, images.repeat(n, 1, 1, 1), 1).reshape(n, len(images), -1)
        full = full.transpose(0, 1).double()
    std_once, std_full = once.std(dim=1), full.std(dim=1)
    assert (std_once > 0).all(), "dropout must make the samples differ"
    standard_error = torch.sqrt((std_once**2 + std_full**2) / n)
    assert ((once.mean(dim=1) - full.mean(dim=1)).abs() <= 5 * standard_error).all()
    ratio = std_once / std_full  # sampling error of a std with n=250 is ~4.5%
    assert ((ratio > 0.75) & (ratio < 1.33)).all(), ratio


def test_a_model_trained_contiguous_predicts_channels_last_on_the_cpu(tmp_path, checkpoint, demo_frame):
    """A checkpoint from a full-precision GPU run (contiguous encoder) predicts on the CPU channels-last,
    which is faster there, with the concentrations the contiguous encoder gives."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=False)
    content["hyper_parameters"]["channels_last"] = False
    contiguous = tmp_path / "contiguous.ckpt"
    torch.save(content, contiguous)
    reference, model = load_model(contiguous), load_model(contiguous)
    assert reference.hparams.channels_last is False
    paths = list(demo_frame["file_loc"].iloc[:6])
    inputs = pd.DataFrame({"id_str": [f"g{i}" for i in range(len(paths))], "file_loc": paths})
    stem = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    layouts = []
    stem.register_forward_hook(
        lambda module, args, output: layouts.append(output.is_contiguous(memory_format=torch.channels_last))
    )
    samples = predict_inputs(model, inputs, dropout=False, **FAST).samples[:, 0]
    assert layouts and all(layouts) and not model.encoder.training
    expected = concentrations_of(reference, paths, grey=reference.hparams.grey)
    np.testing.assert_allclose(samples, expected, rtol=1e-4, atol=1e-5)


def test_dropout_off_is_deterministic(tmp_path, checkpoint, image_folder):
    paths = [
        predict(checkpoint, image_folder, tmp_path / f"{i}.parquet", dropout=False, **FAST) for i in range(2)
    ]
    first, second = (load_predictions(p) for p in paths)
    assert first.attrs["zoobot_hpc"]["n_samples"] == 1 and not first.attrs["zoobot_hpc"]["dropout"]
    pd.testing.assert_frame_equal(first, second)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def test_shards_rerun_keeps_complete_parts_and_merge(tmp_path, checkpoint, image_folder, capsys):
    out = tmp_path / "parts"
    predict(checkpoint, image_folder, out, n_samples=2, num_shards=3, **{**FAST, "progress": True})
    names = [part_name(k, 3) for k in range(3)]
    assert sorted(p.name for p in out.iterdir()) == names
    stamps = {n: _stamp(out / n) for n in names}
    (out / names[1]).unlink()
    capsys.readouterr()
    predict(checkpoint, image_folder, out, n_samples=2, num_shards=3, **{**FAST, "progress": True})
    err = capsys.readouterr().err
    assert "complete; skipping shard 0" in err and "complete; skipping shard 2" in err
    assert "skipping shard 1" not in err and "images/s" in err
    assert _stamp(out / names[0]) == stamps[names[0]] and _stamp(out / names[2]) == stamps[names[2]]
    merged = load_predictions(merge_parts(out, tmp_path / "all.parquet", images=image_folder))
    assert sorted(merged["id_str"]) == sorted(resolve_inputs(image_folder)["id_str"])
    assert merged.attrs["zoobot_hpc"]["merged_from"] == names


def test_merge_refuses_incomplete_mixed_and_duplicate_sets(tmp_path, checkpoint, image_folder):
    out = tmp_path / "parts"
    predict(checkpoint, image_folder, out, n_samples=2, num_shards=3, **FAST)
    names = [part_name(k, 3) for k in range(3)]

    def refuses(match: str) -> None:
        with pytest.raises(PredictionError, match=match):
            merge_parts(out, tmp_path / "merged.parquet")

    shutil.move(out / names[2], tmp_path / "kept")
    refuses(f"missing: {names[2]}")
    shutil.copy(out / names[0], out / names[2])  # a renamed copy: shard 0 twice
    refuses(f"{names[2]} holds shard 0 .* duplicate shard")
    shutil.move(tmp_path / "kept", out / names[2])

    other = tmp_path / "other.ckpt"  # the same model with one weight changed: another checkpoint
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["state_dict"]["head.linear.bias"] += 1.0
    torch.save(state, other)
    predict(other, image_folder, out, n_samples=2, num_shards=3, shard_index=1, **FAST)
    refuses(f"{names[1]} differs from {names[0]} in checkpoint_sha256 .*{other.name}")
    predict(checkpoint, image_folder, out, n_samples=3, num_shards=3, shard_index=1, **FAST)
    refuses(f"{names[1]} differs from {names[0]} in n_samples")
    predict(checkpoint, image_folder, out, n_samples=2, num_shards=3, shard_index=1, **FAST)
    merge_parts(out, tmp_path / "merged.parquet")  # the set is whole again

    predict(checkpoint, image_folder, out, n_samples=2, num_shards=4, shard_index=0, **FAST)
    refuses("mixes parts of differently sharded runs")
    (out / part_name(0, 4)).unlink()
    (out / "part-notes.txt").write_text("x")
    refuses("part-notes.txt: unexpected file")


def test_sigkill_midway_then_rerun_completes_only_missing_shards(tmp_path, checkpoint, image_folder, capsys):
    out = tmp_path / "parts"
    args = [str(checkpoint), str(image_folder), str(out), "--num-shards", "6", "--n-samples", "2"]
    args += ["--batch-size", "4", "--num-workers", "0", "--no-progress"]
    process = subprocess.Popen(
        [sys.executable, "-m", "zoobot_hpc", "predict", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 300
    while not list(out.glob("part-*.parquet")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    output = process.communicate()[0].decode()
    assert process.returncode == -signal.SIGKILL, output[-2000:]
    finished = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 1 <= len(finished) < 6, finished
    for name in finished:  # whatever has a final name is whole
        assert len(load_predictions(out / name)) == 4
    stamps = {name: _stamp(out / name) for name in finished}

    capsys.readouterr()
    assert main(["predict", *args[:-1]]) == 0  # the same command again, in this process, with progress
    rerun = capsys.readouterr().err
    skipped = {int(k) for k in re.findall(r"complete; skipping shard (\d+)", rerun)}
    assert skipped == {int(name[5:10]) for name in finished}
    assert {name: _stamp(out / name) for name in finished} == stamps
    assert rerun.count("images/s") == 6 - len(finished)
    merged = load_predictions(merge_parts(out, tmp_path / "merged.csv", images=image_folder))
    assert sorted(merged["id_str"]) == sorted(resolve_inputs(image_folder)["id_str"])
    assert not list(out.glob(".*.tmp"))  # the killed shard's temporary file was cleaned up on rerun


def _damage(folder: Path, kind: str, which: int = 1) -> Path:
    victim = sorted(folder.glob("*.jpg"))[which]
    if kind == "missing":
        victim.unlink()
    elif kind == "zero-byte":
        victim.write_bytes(b"")
    elif kind == "truncated":
        victim.write_bytes(victim.read_bytes()[:300])
    elif kind == "text":
        victim.write_text("this is not a galaxy\n")
    return victim


BAD_KINDS = ("missing", "zero-byte", "truncated", "text")


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_image_error_names_the_file(tmp_path, checkpoint, image_folder, kind):
    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    catalog = resolve_inputs(folder)  # listed before the damage, as in a catalog
    victim = _damage(folder, kind)
    with pytest.raises(ImageError, match=str(victim)):
        predict(checkpoint, catalog, tmp_path / "out.parquet", **FAST)
    assert not (tmp_path / "out.parquet").exists()


def test_bad_images_skipped_are_listed_and_counted(tmp_path, checkpoint, image_folder, capsys):
    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    catalog = resolve_inputs(folder)
    victims = [_damage(folder, kind, i) for i, kind in enumerate(BAD_KINDS)]
    assert len(set(victims)) == len(BAD_KINDS)
    out = predict(
        checkpoint, catalog, tmp_path / "out.parquet", on_bad_image="skip", **{**FAST, "progress": True}
    )
    df = load_predictions(out)
    assert len(df) == N_IMAGES - len(victims)
    assert not set(df["file_loc"]) & {str(v) for v in victims}
    listed = (tmp_path / "out.parquet.skipped.txt").read_text()
    assert all(str(v) in listed for v in victims)
    assert len(df.attrs["zoobot_hpc"]["skipped"]) == len(victims)
    assert f"predicted {N_IMAGES - 4} of {N_IMAGES} images, 4 skipped" in capsys.readouterr().err


def test_corrupt_or_foreign_checkpoint_names_the_file(tmp_path, checkpoint, image_folder, capsys):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    for bad in (truncated, text, foreign, tmp_path / "absent.ckpt"):
        with pytest.raises(CheckpointError, match=str(bad)):
            predict(bad, image_folder, tmp_path / "out.parquet", **FAST)
    assert main(["predict", str(text), str(image_folder), str(tmp_path / "o.parquet")]) == 2
    assert "notes.ckpt cannot be loaded" in capsys.readouterr().err


def test_inputs_are_checked_before_the_model_is_loaded(tmp_path):
    """A mistyped images path costs seconds, not a model load (minutes for a large checkpoint on a
    busy filesystem): with an unloadable checkpoint too, the images are what is reported."""
    unloadable = tmp_path / "model.ckpt"
    unloadable.write_text("not a checkpoint")
    with pytest.raises(PredictionError, match=r"images .*typo do not exist"):
        predict(unloadable, tmp_path / "typo", tmp_path / "out.parquet", **FAST)


def test_cli_predict_and_merge(tmp_path, checkpoint, image_folder, capsys):
    args = [str(checkpoint), str(image_folder), str(tmp_path / "parts"), "--num-shards", "2"]
    args += ["--n-samples", "2", "--num-workers", "0", "--no-progress"]
    assert main(["predict", *args, "--shard-index", "1"]) == 0
    assert main(["merge", str(tmp_path / "parts"), str(tmp_path / "m.parquet")]) == 2
    assert "part-00000-of-00002.parquet" in capsys.readouterr().err
    assert main(["predict", *args, "--shard-index", "0"]) == 0
    assert main(["merge", str(tmp_path / "parts"), str(tmp_path / "m.parquet")]) == 0
    assert f"{N_IMAGES} galaxies, 0 skipped" in capsys.readouterr().out
    assert main(["predict", *args[:2], str(tmp_path / "x.txt")]) == 2
    assert main(["predict", *args, "--gpus", "2"]) == 2
    assert "one device per process" in capsys.readouterr().err


def test_each_prediction_belongs_to_its_image_through_shards_and_merge(
    tmp_path, resnet_checkpoint, image_folder
):
    out = tmp_path / "parts"
    predict(resnet_checkpoint, image_folder, out, dropout=False, num_shards=3, **{**FAST, "batch_size": 5})
    merged = load_predictions(merge_parts(out, tmp_path / "all.parquet", images=image_folder))
    inputs = resolve_inputs(image_folder).set_index("id_str")
    paths = list(inputs.loc[merged["id_str"], "file_loc"])
    model = load_model(resnet_checkpoint)
    expected = concentrations_of(model, paths, "luma")
    assert np.abs(expected - expected.mean(axis=0)).max() > 1.0  # the galaxies' outputs differ
    columns = [f"{c}_concentration" for c in model.schema.label_cols]
    np.testing.assert_allclose(merged[columns].to_numpy(), expected, rtol=1e-4)


def test_a_checkpoint_from_before_grey_was_recorded_predicts_with_the_mean(
    tmp_path, resnet_checkpoint, demo_frame
):
    """Such checkpoints were trained on Zoobot's mean grey: prediction must decode them the same way.
    The galaxies are tinted (red up, blue down), where luma and mean differ by tens of levels."""
    content = torch.load(resnet_checkpoint, map_location="cpu", weights_only=False)
    assert content["hyper_parameters"].pop("grey") == "luma"  # trained with the defaults
    old = tmp_path / "old.ckpt"
    torch.save(content, old)
    paths = []
    for source in demo_frame["file_loc"].iloc[:3]:
        with Image.open(source) as im:
            rgb = np.asarray(im.convert("RGB")) * np.array([1.8, 1.0, 0.3])
        paths.append(str(tmp_path / f"{Path(source).stem}.png"))
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(paths[-1])
    model = load_model(old)
    assert model.hparams.grey == "mean"
    out = predict(old, paths, tmp_path / "p.parquet", dropout=False, **FAST)
    predicted = load_predictions(out).set_index("id_str").loc[[Path(p).stem for p in paths]]
    expected = {grey: concentrations_of(model, paths, grey) for grey in ("mean", "luma")}
    assert not np.allclose(expected["mean"], expected["luma"], rtol=1e-5)
    columns = [f"{c}_concentration" for c in model.schema.label_cols]
    assert np.allclose(predicted[columns].to_numpy(), expected["mean"], rtol=1e-5)


def test_ids_stay_unique_when_a_longer_id_equals_another_stem(tmp_path, image_folder):
    """a.jpg and a.png share a stem; their paths (a.jpg, a.png) then clash with a.jpg.png's stem."""
    source = next(image_folder.glob("*.jpg"))
    for name in ("a.jpg", "a.png", "a.jpg.png", "sub/a.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(source, tmp_path / name)
    inputs = resolve_inputs(tmp_path)
    assert inputs["id_str"].is_unique, list(inputs["id_str"])
    assert dict(zip(inputs["file_loc"], inputs["id_str"], strict=True)) == {
        str(tmp_path / "a.jpg"): "a.jpg",
        str(tmp_path / "a.jpg.png"): "a.jpg.png",
        str(tmp_path / "a.png"): "a.png",
        str(tmp_path / "sub/a.jpg"): "sub/a",
    }


def test_cli_predicts_one_image_file(tmp_path, checkpoint, image_folder):
    image = next(image_folder.glob("*.jpg"))
    args = ["--n-samples", "2", "--num-workers", "0", "--no-progress"]
    assert main(["predict", str(checkpoint), str(image), str(tmp_path / "one.csv"), *args]) == 0
    assert list(load_predictions(tmp_path / "one.csv")["id_str"]) == [image.stem]


def test_checkpoint_path_with_tilde(tmp_path, checkpoint, image_folder, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(checkpoint, tmp_path / "model.ckpt")
    out = predict("~/model.ckpt", image_folder, tmp_path / "out.parquet", n_samples=2, **FAST)
    assert load_predictions(out).attrs["zoobot_hpc"]["checkpoint"] == str(tmp_path / "model.ckpt")


def test_pq_is_neither_an_input_nor_an_output_name(tmp_path, checkpoint, image_folder):
    """Catalogs are .csv or .parquet; outputs take the same names, so a .pq output could not be read back."""
    with pytest.raises(PredictionError, match=r"out\.pq: use a \.parquet"):
        predict(checkpoint, image_folder, tmp_path / "out.pq", **FAST)


def test_unsharded_rerun_removes_the_temporaries_of_a_killed_run(tmp_path, checkpoint, image_folder):
    stale = [tmp_path / f".out.csv{kind}.x1y2.tmp" for kind in ("", ".meta.json", ".skipped.txt")]
    for path in stale:
        path.write_text("left by a killed run")
    predict(checkpoint, image_folder, tmp_path / "out.csv", n_samples=2, **FAST)
    assert not [p for p in stale if p.exists()]


def test_csv_and_its_metadata_stay_a_pair_when_a_write_is_killed(
    tmp_path, checkpoint, image_folder, monkeypatch
):
    """A kill while the CSV is built keeps the old pair; one between CSV and metadata is refused on load."""
    import zoobot_hpc.prediction as prediction

    out = predict(checkpoint, image_folder, tmp_path / "out.csv", n_samples=2, **FAST)
    three = sorted(image_folder.glob("*.jpg"))[:3]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(prediction, "_csv_frame", killed)
    with pytest.raises(KeyboardInterrupt):
        predict(checkpoint, three, out, n_samples=3, **FAST)
    monkeypatch.undo()
    old = load_predictions(out)
    assert len(old) == N_IMAGES and old.attrs["zoobot_hpc"]["n_samples"] == 2

    monkeypatch.setattr(prediction, "write_text", killed)  # the CSV is renamed, its metadata is not
    with pytest.raises(KeyboardInterrupt):
        predict(checkpoint, three, out, n_samples=3, **FAST)
    monkeypatch.undo()
    with pytest.raises(PredictionError, match=r"out\.csv\.meta\.json does not describe .*out\.csv"):
        load_predictions(out)
