"""The whole gradient path works: a model trained on 32 real galaxies memorises their votes.

Real images, the real `train()` and Lightning trainer, no mocks. Memorising 32 galaxies is slower than
it sounds, for reasons that are properties of the recipe, not bugs:

- every training view is rotated by a random angle (that cannot be switched off), so the network
  must learn rotation-stable features before it can tell the galaxies apart. Crops are switched off
  (`crop_scale_bounds=(1, 1)`): random crops also shift the galaxy, which slows memorising further;
- the targets differ little: every galaxy of decals_rings has 24-33 of 40 volunteers answering
  featured, so predicting the population mean already costs only ~1 nat per galaxy more than
  memorising, and ranking the galaxies needs fractions right to ~0.01;
- predictions use BatchNorm running statistics, which trail the train-mode statistics by ~20-40
  steps while Adam still changes the weights quickly: early on, eval-mode predictions are almost
  the same for every galaxy although the train-mode ones already track the votes.

The recipe that memorises in ~100 steps on a CPU: ResNet-50 (efficientnet's stochastic depth and
depthwise layers learn this far more slowly at 32 px), colour (a galaxy's colour does not change
under rotation), no crops, no dropout, the default learning rate and weight decay, and 32 galaxies
spread evenly over the featured-fraction range, so that the rank correlation measures memorising
rather than ties between galaxies with the same vote counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from zoobot_hpc import train
from zoobot_hpc.catalog import read_catalog
from zoobot_hpc.data import load_image
from zoobot_hpc.loss import expected_vote_fractions

FEATURED = "smooth-or-featured_featured-or-disk"
ROOT_ANSWERS = ["smooth-or-featured_smooth", FEATURED, "smooth-or-featured_artifact"]
EPOCHS = 150  # one step each: the 32 galaxies are one batch


@pytest.fixture
def one_thread():
    """One intra-op thread: bit-reproducible whatever the core count, and no stalls on a busy machine.

    With two threads on two cores that other processes also use, each parallel region waits for
    a descheduled thread and a step costs several times more than with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spread_over_featured_fraction(catalog: pd.DataFrame, n: int) -> pd.DataFrame:
    """The n galaxies nearest to n evenly spaced values of the featured fraction, each used once."""
    fraction = catalog[FEATURED] / catalog[ROOT_ANSWERS].sum(axis=1)
    chosen: list[int] = []
    for value in np.linspace(fraction.min(), fraction.max(), n):
        chosen.append(int((fraction.drop(chosen) - value).abs().idxmin()))
    return catalog.loc[chosen]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation, ties given their mean rank (pandas' own needs scipy)."""
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


@pytest.mark.slow
def test_model_memorises_the_votes_of_32_real_galaxies(tmp_path, shared_catalog, one_thread):
    catalog = read_catalog(shared_catalog)
    galaxies = spread_over_featured_fraction(catalog, 32)
    others = catalog.drop(galaxies.index)
    model, trainer = train(
        tmp_path, "decals_rings", train_catalog=galaxies, val_catalog=others.iloc[:4],
        test_catalog=others.iloc[4:8], model_architecture="resnet_detectron", batch_size=32,
        epochs=EPOCHS, patience=EPOCHS, color=True, resize_size=32, crop_scale_bounds=(1.0, 1.0),
        crop_ratio_bounds=(1.0, 1.0), gpus=0, num_workers=1, random_state=0, dropout_rate=0.0,
        trainer_kwargs={
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "check_val_every_n_epoch": EPOCHS,  # validated once, at the end: the model returned is the last
        },
    )  # fmt: skip
    assert trainer.global_step == EPOCHS

    model.eval()
    images = torch.stack([load_image(path, color=True) for path in galaxies["file_loc"]])
    with torch.no_grad():
        concentrations = model(model.augment(images, train=False))  # the deterministic eval transform
    predicted = expected_vote_fractions(concentrations, model.schema.answer_to_question_matrix)
    predicted_featured = predicted[:, model.schema.label_cols.index(FEATURED)].numpy()
    volunteers = (galaxies[FEATURED] / galaxies[ROOT_ANSWERS].sum(axis=1)).to_numpy()

    correlation = spearman(predicted_featured, volunteers)
    error = np.abs(predicted_featured - volunteers)
    print(f"featured fraction: rank correlation {correlation:.3f}, median |error| {np.median(error):.3f}")
    assert correlation > 0.9, (correlation, np.round(predicted_featured, 3), np.round(volunteers, 3))
    assert np.median(error) < 0.03, error
