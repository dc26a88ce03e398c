"""The run report: a real PNG from a real tiny run, and the numbers behind its panels."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_prediction import trained_run

from zoobot_hpc.cli import main
from zoobot_hpc.prediction import load_model, predict_inputs, prediction_columns
from zoobot_hpc.report import (
    ReportError,
    draw_report,
    learning_curves,
    question_panels,
    read_report_metadata,
    report_after_training,
    report_data,
    write_report,
)
from zoobot_hpc.schema import load_schema
from zoobot_hpc.training import read_splits


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_frame):
    return trained_run(tmp_path_factory, demo_frame)


def test_report_png_with_curves_and_one_panel_per_question(run, tmp_path):
    target = write_report(run, output=tmp_path / "report.png")
    with Image.open(target) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 300
    stored = read_report_metadata(target)
    schema = load_schema("decals_rings")
    test = read_splits(run)["test"]
    assert stored["test_galaxies"] == len(test) and stored["epochs"] == 2
    for question in schema.questions:  # only galaxies where the question was asked
        asked = int((test[question.label_cols].sum(axis=1) > 0).sum())
        assert stored["galaxies_asked"][question.name] == asked
    assert set(stored["correlation"]) == set(schema.question_names)

    data = report_data(run)
    assert list(data.curves["epoch"]) == [0, 1]
    assert data.curves[["train_loss", "val_loss"]].notna().all().all()
    assert {f"val_loss/{q}" for q in schema.question_names} <= set(data.curves.columns)
    fig = draw_report(data)
    assert len(fig.axes) == 2 + len(schema.questions)
    titles = [ax.get_title() for ax in fig.axes[2:]]
    assert [t.split(":")[0] for t in titles] == schema.question_names


def test_default_location_and_cli(run, capsys):
    assert main(["report", str(run)]) == 0
    assert (run / "report.png").is_file() and str(run / "report.png") in capsys.readouterr().out


def test_panel_correlations_use_only_asked_galaxies(run):
    """Predictions built from the volunteers' fractions: the panels' r values follow by construction."""
    schema = load_schema("decals_rings")
    test = read_splits(run)["test"].copy()
    question = schema.questions[1]  # asked only after the featured answer: some galaxies were not asked
    test.loc[test.index[:3], question.label_cols] = 0
    rng = np.random.default_rng(0)
    predictions = {"id_str": test["id_str"]}
    for q in schema.questions:
        votes = test[q.label_cols].to_numpy(dtype=float)
        total = np.maximum(votes.sum(axis=1, keepdims=True), 1)
        noisy = votes / total + rng.normal(0, 0.05, votes.shape)
        for j, col in enumerate(q.label_cols):
            predictions[f"{col}_fraction"] = noisy[:, j]
    panels = question_panels(pd.DataFrame(predictions), test, schema)
    panel = panels[1]
    assert panel.galaxies == len(test) - 3
    votes = test[question.label_cols].to_numpy(dtype=float)[3:]
    np.testing.assert_allclose(panel.observed, votes / votes.sum(axis=1, keepdims=True))
    expected = [np.corrcoef(panel.predicted[:, j], panel.observed[:, j])[0, 1] for j in range(2)]
    np.testing.assert_allclose(panel.answer_correlations, expected)
    assert math.isclose(panel.correlation, float(np.mean(expected)))
    assert panel.correlation > 0.5


def test_catalog_fraction_columns_are_not_taken_for_predictions(run, tmp_path):
    """Real GZ catalogs carry `{question}_{answer}_fraction` columns; the panels must plot the model's
    predictions, not the catalog's own fractions (which match the volunteers by construction)."""
    save_dir = tmp_path / "run"
    shutil.copytree(run / "csv", save_dir / "csv")
    shutil.copy(run / "results.yaml", save_dir / "results.yaml")
    schema = load_schema("decals_rings")
    test = read_splits(run)["test"]
    for question in schema.questions:
        votes = test[question.label_cols].to_numpy(dtype=float)
        fractions = votes / np.maximum(votes.sum(axis=1, keepdims=True), 1)
        for j, col in enumerate(question.label_cols):
            test[f"{col}_fraction"] = fractions[:, j]
    (save_dir / "splits").mkdir()
    test.to_parquet(save_dir / "splits" / "test.parquet")

    data = report_data(save_dir)
    pred = predict_inputs(load_model(data.checkpoint), test, dropout=False, progress=False)
    model_fractions = pd.DataFrame(prediction_columns(pred.samples, schema), index=pred.ids)
    for panel, question in zip(data.panels, schema.questions, strict=True):
        asked = test.loc[test[question.label_cols].sum(axis=1) > 0, "id_str"]
        expected = model_fractions.loc[asked, [f"{c}_fraction" for c in question.label_cols]]
        np.testing.assert_allclose(panel.predicted, expected.to_numpy(), rtol=1e-5)
        assert not np.allclose(panel.predicted, panel.observed)


def test_missing_run_files_are_named(tmp_path):
    with pytest.raises(ReportError, match=r"metrics\.csv"):
        learning_curves(tmp_path)
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_text("epoch,step,val_loss\n0,1,3.0\n")
    with pytest.raises(ReportError, match=r"results\.yaml"):
        write_report(tmp_path)


def test_report_after_training_warns_instead_of_failing(run, tmp_path, caplog):
    assert report_after_training(run) == run / "report.png"
    assert report_after_training(tmp_path) is None
    assert f"zoobot-hpc report {tmp_path}" in caplog.text
