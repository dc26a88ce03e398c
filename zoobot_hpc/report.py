"""The one picture to look at after a run: learning curves, and predictions against volunteers.

`write_report(save_dir)` reads `csv/version_*/metrics.csv` (train/val loss per epoch, val loss per question),
predicts the test split with the best checkpoint (dropout off: the deterministic mean model), and
plots, per question, the predicted expected vote fraction against the volunteers' vote fraction,
only for galaxies where the question was asked (votes > 0), with the correlation in the title.
The figures behind the panels are returned by `report_data` and stored in the PNG's text metadata.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from zoobot_hpc.atomic import atomic_path
from zoobot_hpc.errors import InputError

REPORT_FILE = "report.png"
METADATA_KEY = "zoobot_hpc_report"
MAX_TEST_GALAXIES = 2000  # the report is a first look; predicting a huge test split on CPU takes too long


class ReportError(InputError):
    """A run folder lacks what the report needs; the message names the file."""


@dataclass
class QuestionPanel:
    """Predicted and volunteer vote fractions of one question's answers, for galaxies where it was asked."""

    question: str
    answers: list[str]
    predicted: np.ndarray  # (galaxies asked, answers)
    observed: np.ndarray  # (galaxies asked, answers)

    @property
    def galaxies(self) -> int:
        return len(self.predicted)

    @property
    def answer_correlations(self) -> list[float]:
        """Pearson r of each answer's predicted and volunteer fractions (NaN where either barely varies)."""
        return [_pearson(self.predicted[:, j], self.observed[:, j]) for j in range(len(self.answers))]

    @property
    def correlation(self) -> float:
        """Mean of the answers' correlations.

        Per answer, not pooled: pooling the answers' points rewards a constant predictor that
        merely knows each answer's typical fraction.
        """
        values = [r for r in self.answer_correlations if not math.isnan(r)]
        return float(np.mean(values)) if values else math.nan


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) < 1e-6 or np.std(y) < 1e-6:  # float noise is not a correlation
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


@dataclass
class ReportData:
    curves: pd.DataFrame  # one row per epoch: train_loss, val_loss, val_loss/{question}
    questions: list[str]
    panels: list[QuestionPanel] = field(default_factory=list)
    checkpoint: str | None = None
    test_galaxies: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "test_galaxies": self.test_galaxies,
            "epochs": len(self.curves),
            "correlation": {p.question: _json_number(p.correlation) for p in self.panels},
            "answer_correlation": {
                f"{p.question}_{a}": _json_number(r)
                for p in self.panels
                for a, r in zip(p.answers, p.answer_correlations, strict=True)
            },
            "galaxies_asked": {p.question: p.galaxies for p in self.panels},
        }


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


# ----------------------------------------------------------------------------------------- data
def learning_curves(save_dir: Path) -> pd.DataFrame:
    """Per-epoch train loss, val loss and per-question val losses from Lightning's CSV logs."""
    from zoobot_hpc.training import read_metrics

    metrics = read_metrics(save_dir)
    if metrics.empty:
        raise ReportError(
            f"no {save_dir / 'csv' / 'version_*' / 'metrics.csv'}; "
            "the report reads the CSV logs that train() writes"
        )
    wanted = [
        c for c in metrics.columns if c == "train_loss_epoch" or c == "val_loss" or c.startswith("val_loss/")
    ]
    if "epoch" not in metrics.columns or not wanted:
        return pd.DataFrame(columns=["epoch"])
    per_epoch = metrics.groupby("epoch")[wanted].last().dropna(how="all")  # one value per epoch and column
    return per_epoch.rename(columns={"train_loss_epoch": "train_loss"}).reset_index()


def question_panels(predictions: pd.DataFrame, catalog: pd.DataFrame, schema: Any) -> list[QuestionPanel]:
    """Pair predicted expected fractions with volunteer fractions, per question, where it was asked.

    Only `id_str` and the vote counts are taken from the catalog: real catalogs also carry
    `{question}_{answer}_fraction` columns, which would otherwise stand in for the predictions.
    """
    votes_only = catalog[["id_str", *schema.label_cols]]
    merged = votes_only.merge(predictions, on="id_str", how="inner")
    panels = []
    for question in schema.questions:
        votes = merged[question.label_cols].to_numpy(dtype=np.float64)
        total = votes.sum(axis=1)
        asked = total > 0
        observed = votes[asked] / total[asked, None]
        predicted = merged[[f"{c}_fraction" for c in question.label_cols]].to_numpy(dtype=np.float64)[asked]
        panels.append(QuestionPanel(question.name, list(question.answers), predicted, observed))
    return panels


def report_data(
    save_dir: str | Path,
    device: str | None = None,
    max_galaxies: int = MAX_TEST_GALAXIES,
    num_workers: int = 0,
) -> ReportData:
    """Everything the report plots; predicts (up to `max_galaxies` of) the test split on `device`."""
    save_dir = Path(save_dir)
    curves = learning_curves(save_dir)
    checkpoint = _best_checkpoint(save_dir)
    from zoobot_hpc.prediction import load_model, predict_inputs, prediction_columns

    model = load_model(checkpoint)
    schema = model.schema
    data = ReportData(curves, schema.question_names, checkpoint=str(checkpoint))
    test = _test_split(save_dir, max_galaxies)
    if test is None or not len(test):
        return data
    device = device or ("cuda" if _cuda() else "cpu")
    pred = predict_inputs(
        model,
        test,
        dropout=False,
        batch_size=64,
        num_workers=num_workers,
        device=device,
        on_bad_image="skip",
        progress=False,
    )
    frame = pd.DataFrame({"id_str": pred.ids, **prediction_columns(pred.samples, schema)})
    data.panels = question_panels(frame, test, schema)
    data.test_galaxies = len(frame)
    return data


def _best_checkpoint(save_dir: Path) -> Path:
    results = save_dir / "results.yaml"
    if results.is_file():
        best = (yaml.safe_load(results.read_text()) or {}).get("best_checkpoint")
        if best and Path(best).is_file():
            return Path(best)
    last = save_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    raise ReportError(f"{save_dir}: no results.yaml with a best_checkpoint and no checkpoints/last.ckpt")


def _test_split(save_dir: Path, max_galaxies: int) -> pd.DataFrame | None:
    path = save_dir / "splits" / "test.parquet"
    if not path.is_file():
        return None
    test = pd.read_parquet(path)
    if len(test) > max_galaxies:
        test = test.sample(n=max_galaxies, random_state=0).sort_index()
    return test.reset_index(drop=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -------------------------------------------------------------------------------------- drawing
def draw_report(data: ReportData, title: str = "") -> Any:
    """A matplotlib Figure: two learning-curve panels, then one scatter panel per question."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n_scatter = len(data.panels)
    ncols = max(2, min(4, n_scatter))
    nrows = 1 + math.ceil(n_scatter / ncols)
    fig = Figure(figsize=(4 * ncols, 3.6 * nrows), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    half = ncols // 2
    _plot_losses(fig.add_subplot(grid[0, :half]), data.curves)
    _plot_question_losses(fig.add_subplot(grid[0, half:]), data.curves)
    for i, panel in enumerate(data.panels):
        _plot_panel(fig.add_subplot(grid[1 + i // ncols, i % ncols]), panel)
    fig.suptitle(title or f"zoobot-hpc report: {Path(data.checkpoint or '').name}")
    return fig


def _plot_losses(ax: Any, curves: pd.DataFrame) -> None:
    for column, label in (("train_loss", "train"), ("val_loss", "validation")):
        if column in curves:
            rows = curves[["epoch", column]].dropna()
            ax.plot(rows["epoch"], rows[column], marker="o", label=label)
    ax.set(title="loss per epoch", xlabel="epoch", ylabel="Dirichlet-Multinomial NLL")
    _integer_epochs(ax)
    ax.legend()


def _plot_question_losses(ax: Any, curves: pd.DataFrame) -> None:
    for column in (c for c in curves.columns if c.startswith("val_loss/")):
        rows = curves[["epoch", column]].dropna()
        ax.plot(rows["epoch"], rows[column], marker=".", label=column.split("/", 1)[1])
    ax.set(title="validation loss per question", xlabel="epoch", ylabel="NLL")
    _integer_epochs(ax)
    if len(ax.lines):
        ax.legend(fontsize="small")


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plot_panel(ax: Any, panel: QuestionPanel) -> None:
    for j, answer in enumerate(panel.answers):
        r = panel.answer_correlations[j]
        label = f"{answer} (r = {'n/a' if math.isnan(r) else f'{r:.2f}'})"
        ax.scatter(panel.observed[:, j], panel.predicted[:, j], s=8, alpha=0.6, label=label)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    r = "n/a" if math.isnan(panel.correlation) else f"{panel.correlation:.2f}"
    ax.set(
        title=f"{panel.question}: mean r = {r} ({panel.galaxies} asked)",
        xlabel="volunteer vote fraction",
        ylabel="predicted vote fraction",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.title.set_fontsize("small")
    ax.legend(fontsize="x-small")


def write_report(
    save_dir: str | Path,
    output: str | Path | None = None,
    device: str | None = None,
    max_galaxies: int = MAX_TEST_GALAXIES,
) -> Path:
    """Write the report PNG (default `save_dir/report.png`) atomically; its numbers go in the PNG metadata."""
    save_dir = Path(save_dir)
    data = report_data(save_dir, device=device, max_galaxies=max_galaxies)
    fig = draw_report(data, title=f"zoobot-hpc report: {save_dir.resolve().name}")
    target = Path(output) if output else save_dir / REPORT_FILE
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={METADATA_KEY: json.dumps(data.summary())})
    return target


def read_report_metadata(png: str | Path) -> dict[str, Any]:
    """The numbers stored in a report PNG (correlations, galaxies per panel, checkpoint)."""
    from PIL import Image

    with Image.open(png) as im:
        return json.loads(im.text[METADATA_KEY])


def report_after_training(save_dir: str | Path) -> Path | None:
    """`write_report` for the end of `train()`: global rank 0 only, and never fails the finished run.

    A day of training must not end in a traceback because a plot could not be made; the warning
    says why and how to retry.
    """
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return None
    try:
        return write_report(save_dir)
    except Exception as err:  # any failure: warn, the results stand
        logging.getLogger(__name__).warning(
            "the run report could not be written (%s: %s); retry with: zoobot-hpc report %s",
            type(err).__name__,
            err,
            save_dir,
        )
        return None
