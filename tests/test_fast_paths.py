"""The fast paths compute the same things as the straightforward ones (no timing here; speed is
measured by benchmarks/):

- the vectorised Dirichlet-Multinomial loss equals a per-question loop of pyro's
  `DirichletMultinomial` log-probs, values and gradients, on random and edge-case votes; its
  written-out gradient is the derivative of its values; evaluating only the answered entries (CPU)
  gives what evaluating all of them (accelerators) does;
- the batched affine augmentation draws crop scale, aspect ratio, rotation and flips from the
  configured bounds, and a known bright square covers the area fraction the crop scale implies;
- MC dropout with the encoder run once equals n full forward passes when the dropout masks are the
  same (same seed);
- the integer grey conversion equals the rounded float mean of R, G and B for every possible sum;
- the luma grey of a PNG and of a format only Pillow reads uses the JPEG's weights;
- the dataset's packed paths load each row's own image through worker processes.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from zoobot_hpc import loss
from zoobot_hpc.augment import GalaxyAugment
from zoobot_hpc.data import GalaxyDataset, LoaderSettings, grey_mean, load_image
from zoobot_hpc.galaxy_model import GalaxyZooModel
from zoobot_hpc.loss import dirichlet_multinomial_nll
from zoobot_hpc.schema import load_schema

pyro_distributions = pytest.importorskip("pyro.distributions")


def per_question_reference(concentrations: torch.Tensor, votes: torch.Tensor, schema) -> torch.Tensor:
    """(galaxies, questions) negative log-likelihoods, one question at a time, float64, with pyro."""
    columns = []
    for question in schema.questions:
        k = votes[:, question.start : question.end].double()
        alpha = concentrations[:, question.start : question.end].double()
        log_prob = pyro_distributions.DirichletMultinomial(alpha, total_count=k.sum(dim=1)).log_prob(k)
        columns.append(torch.where(k.sum(dim=1) > 0, -log_prob, torch.zeros_like(log_prob)))
    return torch.stack(columns, dim=1)


def random_votes(schema, galaxies: int, generator: torch.Generator, max_votes: int) -> torch.Tensor:
    """Counts per answer; about a third of the questions unasked (all zero) per galaxy."""
    votes = torch.randint(0, max_votes + 1, (galaxies, len(schema.label_cols)), generator=generator)
    for question in schema.questions:
        unasked = torch.rand(galaxies, generator=generator) < 0.3
        votes[unasked, question.start : question.end] = 0
    return votes


def edge_case_votes(schema, galaxies: int) -> torch.Tensor:
    votes = torch.zeros(galaxies, len(schema.label_cols), dtype=torch.long)
    for g in range(galaxies):
        for j, question in enumerate(schema.questions):
            kind = (g + j) % 5
            if kind == 1:  # everyone gave the first answer
                votes[g, question.start] = 40
            elif kind == 2:  # a single vote on the last answer
                votes[g, question.end - 1] = 1
            elif kind == 3:  # very many votes, spread
                votes[g, question.start : question.end] = 400
            elif kind == 4:  # many votes on one answer only
                votes[g, question.end - 1] = 1000
            # kind 0: not asked
    return votes


def edge_case_concentrations(galaxies: int, answers: int) -> torch.Tensor:
    """Concentrations at the head's extremes (just above 1, just below 101) and in between."""
    values = torch.tensor([1.0001, 1.5, 10.0, 55.0, 100.9999])
    index = torch.arange(galaxies * answers).reshape(galaxies, answers) % len(values)
    return values[index]


@pytest.mark.parametrize("schema_name", ["gz_decals_dr5", "gz2", "decals_rings"])
@pytest.mark.parametrize("case", ["random", "edge"])
def test_vectorised_loss_equals_per_question_pyro_loop(schema_name, case):
    schema = load_schema(schema_name)
    generator = torch.Generator().manual_seed(7)
    galaxies, answers = 64, len(schema.label_cols)
    if case == "random":
        votes = random_votes(schema, galaxies, generator, max_votes=60)
        concentrations = 1 + 100 * torch.sigmoid(3 * torch.randn(galaxies, answers, generator=generator))
    else:
        votes = edge_case_votes(schema, galaxies)
        concentrations = edge_case_concentrations(galaxies, answers)

    fast_input = concentrations.float().clone().requires_grad_(True)
    fast = dirichlet_multinomial_nll(fast_input, votes, schema.answer_to_question_matrix)
    fast.sum(dim=1).mean().backward()

    slow_input = concentrations.float().double().clone().requires_grad_(True)
    slow = per_question_reference(slow_input, votes, schema)
    slow.sum(dim=1).mean().backward()

    assert fast.shape == slow.shape == (galaxies, len(schema.questions))
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), slow.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_input.grad.double(), slow_input.grad, rtol=1e-5, atol=1e-7)


def test_stirling_series_equals_torch_lgamma_and_digamma():
    """The CPU loss's lgamma and digamma (Stirling's series after a shift by 8) against torch's,
    from near 0 to ten million: below 1e-9 absolute, and to float64 rounding where they are large."""
    generator = torch.Generator().manual_seed(13)
    x = torch.cat(
        [
            torch.logspace(-6, 7, 2000, dtype=torch.float64),
            1 + 100 * torch.rand(2000, generator=generator, dtype=torch.float64),  # the head's range
            torch.arange(1, 60, dtype=torch.float64),  # whole numbers, where lgamma is log((x-1)!)
        ]
    )
    series = loss._StirlingGamma(x)
    torch.testing.assert_close(series.lgamma(), torch.lgamma(x), rtol=1e-13, atol=1e-9)
    torch.testing.assert_close(series.digamma(), torch.digamma(x), rtol=1e-13, atol=1e-9)
    assert series.lgamma().dtype == torch.float64


@pytest.mark.parametrize("entries", ["answered", "all"])
@pytest.mark.parametrize("vote_dtype", [torch.int32, torch.float64])
def test_loss_gradient_is_the_derivative_of_its_values(monkeypatch, entries, vote_dtype):
    """Finite differences of the float64 values against the written-out gradient, with whole votes
    (log-factorials from a table on the CPU) and float votes (from lgamma)."""
    monkeypatch.setattr(loss, "_cpu_strategy", lambda device: entries == "answered")
    schema = load_schema("gz_decals_dr5")
    generator = torch.Generator().manual_seed(3)
    votes = random_votes(schema, 6, generator, max_votes=30).to(vote_dtype)
    concentrations = 1 + 100 * torch.rand(6, len(schema.label_cols), generator=generator, dtype=torch.float64)
    groups = schema.answer_to_question_matrix
    assert torch.autograd.gradcheck(
        lambda alpha: dirichlet_multinomial_nll(alpha, votes, groups), (concentrations.requires_grad_(True),)
    )


@pytest.mark.parametrize("schema_name", ["gz_decals_dr5", "gz2"])
def test_loss_over_answered_entries_equals_the_loss_over_all(monkeypatch, schema_name):
    """The CPU evaluates only answered entries, summed by index; accelerators evaluate all, summed by
    a matrix product. Run here on the CPU, both ways."""
    schema = load_schema(schema_name)
    generator = torch.Generator().manual_seed(5)
    votes = random_votes(schema, 128, generator, max_votes=60)
    concentrations = 1 + 100 * torch.sigmoid(
        3 * torch.randn(128, len(schema.label_cols), generator=generator)
    )
    results = {}
    for entries in ("answered", "all"):
        monkeypatch.setattr(loss, "_cpu_strategy", lambda device, entries=entries: entries == "answered")
        alpha = concentrations.clone().requires_grad_(True)
        values = dirichlet_multinomial_nll(alpha, votes, schema.answer_to_question_matrix)
        values.sum().backward()
        results[entries] = (values.detach(), alpha.grad)
    torch.testing.assert_close(results["answered"], results["all"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("entries", ["answered", "all"])
def test_a_negative_count_gives_a_non_finite_loss_not_an_error(monkeypatch, entries):
    """Corrupt votes must reach the training step's non-finite check (which names the batch's
    galaxies), not fail inside the log-factorial table."""
    monkeypatch.setattr(loss, "_cpu_strategy", lambda device: entries == "answered")
    schema = load_schema("decals_rings")
    votes = torch.tensor([[-1, 25, 3, 22, 9, 13, 15]] + [[30, 10, 0, 10, 0, 5, 5]] * 15, dtype=torch.int32)
    values = dirichlet_multinomial_nll(torch.full((16, 7), 5.0), votes, schema.answer_to_question_matrix)
    assert not torch.isfinite(values[0]).all() and torch.isfinite(values[1:]).all()


def test_log_factorial_table_grows_and_gives_way_to_lgamma(monkeypatch):
    """Whole counts take log(k!) from a table, grown to the largest total seen, and from lgamma
    beyond its limit; float counts always from lgamma. All three give the same numbers."""
    monkeypatch.setattr(loss.DirichletMultinomialLoss, "TABLE_LIMIT", 8192)
    schema = load_schema("gz_decals_dr5")
    nll = loss.DirichletMultinomialLoss(schema.answer_to_question_matrix)
    generator = torch.Generator().manual_seed(11)
    concentrations = 1 + 100 * torch.rand(
        32, len(schema.label_cols), generator=generator, dtype=torch.float64
    )
    for max_votes in (60, 600, 9_000):
        votes = random_votes(schema, 32, generator, max_votes=max_votes)
        largest = int((votes @ schema.answer_to_question_matrix.long()).max())
        before = len(nll._log_factorial)
        whole = nll(concentrations, votes)
        if largest < 8192:
            assert len(nll._log_factorial) == (before if largest < before else 2 * largest)
        else:  # beyond the limit: lgamma, and the table is left as it was
            assert len(nll._log_factorial) == before
        torch.testing.assert_close(whole, nll(concentrations, votes.double()), rtol=1e-12, atol=1e-12)
    assert len(nll._log_factorial) > 1024  # the 600-vote batch grew it


@pytest.mark.parametrize("entries", ["answered", "all"])
def test_mean_reduction_is_the_per_question_loss_summed_and_averaged(monkeypatch, entries):
    """The training step's scalar (reduced inside the loss) and its gradient equal the per-question
    values summed over questions and averaged over galaxies, as validation computes them."""
    monkeypatch.setattr(loss, "_cpu_strategy", lambda device: entries == "answered")
    schema = load_schema("gz_decals_dr5")
    generator = torch.Generator().manual_seed(17)
    votes = random_votes(schema, 48, generator, max_votes=40).int()
    concentrations = 1 + 100 * torch.sigmoid(3 * torch.randn(48, len(schema.label_cols), generator=generator))
    nll = loss.DirichletMultinomialLoss(schema.answer_to_question_matrix)
    per_question, mean = (
        concentrations.clone().requires_grad_(True),
        concentrations.clone().requires_grad_(True),
    )
    expected = nll(per_question, votes).sum(dim=1).mean()
    expected.backward()
    reduced = nll(mean, votes, reduction="mean")
    reduced.backward()
    assert reduced.shape == () and reduced.dtype == torch.float32
    torch.testing.assert_close(reduced, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.grad, per_question.grad, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="reduction='sum'"):
        nll(concentrations, votes, reduction="sum")


def test_one_loss_serves_batches_of_every_size():
    """What the loss keeps per batch size (which question each entry is in) is not mixed up."""
    schema = load_schema("gz2")
    generator = torch.Generator().manual_seed(13)
    votes = random_votes(schema, 40, generator, max_votes=30)
    concentrations = 1 + 100 * torch.rand(40, len(schema.label_cols), generator=generator)
    reused = loss.DirichletMultinomialLoss(schema.answer_to_question_matrix)
    for rows in (slice(0, 40), slice(0, 7), slice(10, 40), slice(3, 10)):
        torch.testing.assert_close(
            reused(concentrations[rows], votes[rows]),
            dirichlet_multinomial_nll(concentrations[rows], votes[rows], schema.answer_to_question_matrix),
            rtol=0,
            atol=0,
        )


def test_unasked_questions_give_exact_zero_loss_and_gradient():
    schema = load_schema("gz_decals_dr5")
    votes = edge_case_votes(schema, 10)
    concentrations = edge_case_concentrations(10, len(schema.label_cols)).requires_grad_(True)
    loss = dirichlet_multinomial_nll(concentrations, votes, schema.answer_to_question_matrix)
    loss.sum().backward()
    asked = (votes @ schema.answer_to_question_matrix.long()) > 0
    assert (loss[~asked] == 0).all()
    unasked_answers = (asked.long() @ schema.answer_to_question_matrix.long().T) == 0
    assert (concentrations.grad[unasked_answers] == 0).all()


# ---------------------------------------------------------------------------------------- augmentation
SCALE, RATIO = (0.7, 0.8), (0.9, 1.1)


def test_sampled_crop_parameters_follow_the_configured_bounds():
    augment = GalaxyAugment(224, SCALE, RATIO)
    params = augment.sample_params(200_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    scale, ratio, angle = params["scale"], params["ratio"], params["angle"]
    assert SCALE[0] <= scale.min() and scale.max() <= SCALE[1]
    assert abs(scale.mean().item() - sum(SCALE) / 2) < 1e-3
    assert abs(scale.var().item() - (SCALE[1] - SCALE[0]) ** 2 / 12) < 1e-4  # uniform
    # aspect ratio log-uniform within the bounds, as torchvision's RandomResizedCrop
    assert RATIO[0] - 1e-6 <= ratio.min() and ratio.max() <= RATIO[1] + 1e-6
    log_mid = (math.log(RATIO[0]) + math.log(RATIO[1])) / 2
    assert abs(ratio.log().mean().item() - log_mid) < 1e-3
    # rotation uniform over the full circle, flips half the time
    assert angle.min() >= 0 and angle.max() < 2 * math.pi
    assert abs(angle.mean().item() - math.pi) < 0.02
    assert abs(torch.cos(angle).mean().item()) < 0.01 and abs(torch.sin(angle).mean().item()) < 0.01
    assert abs(params["flip"].float().mean().item() - 0.5) < 0.01
    assert params["offset_x"].abs().max() <= 1 and params["offset_y"].abs().max() <= 1


@pytest.mark.parametrize("height, width", [(424, 424), (400, 440)])
def test_affine_maps_cover_the_sampled_area_and_aspect_ratio(height, width):
    """In normalised coordinates the output square maps to a parallelogram of area fraction `scale`
    of the input, with side lengths in the sampled aspect ratio (in pixels) and right angles."""
    augment = GalaxyAugment(224, SCALE, RATIO)
    params = augment.sample_params(5_000, torch.device("cpu"), torch.Generator().manual_seed(1))
    theta = augment.affine_matrices(params, height, width).double()
    linear = theta[:, :, :2]
    area_fraction = torch.linalg.det(linear).abs()  # both squares are [-1, 1]^2 before the map
    expected = params["scale"].double()
    limited = (torch.sqrt(expected * height * width * params["ratio"]) <= width) & (
        torch.sqrt(expected * height * width / params["ratio"]) <= height
    )
    assert limited.all()  # the default bounds never clamp on these shapes
    torch.testing.assert_close(area_fraction[limited], expected[limited], rtol=1e-5, atol=0)
    pixels = linear * torch.tensor([width / 2, height / 2], dtype=torch.float64).view(1, 2, 1)
    side_u, side_v = pixels[:, :, 0].norm(dim=1), pixels[:, :, 1].norm(dim=1)
    torch.testing.assert_close(
        (side_u / side_v)[limited], params["ratio"].double()[limited], rtol=1e-5, atol=0
    )
    dot = (pixels[:, :, 0] * pixels[:, :, 1]).sum(dim=1)
    assert (dot.abs() / (side_u * side_v)).max() < 1e-6  # rotation + crop: no shear
    # the crop stays inside the rotated image: its centre is at most the free room away
    assert (theta[:, :, 2].abs() <= 1).all()


def test_bright_square_covers_the_area_fraction_the_crop_scale_implies():
    """A 100 x 100 bright square in the middle of a dark 424 x 424 image: after augmentation it covers
    (its area / crop area) of the output, whatever the rotation and flip, so its output fraction
    times the image-to-square area ratio recovers the sampled crop scales' distribution."""
    size, square = 424, 100
    images = torch.zeros(512, 1, size, size, dtype=torch.uint8)
    low = (size - square) // 2
    images[:, :, low : low + square, low : low + square] = 255
    augment = GalaxyAugment(224, SCALE, RATIO)
    out = augment(images, train=True, generator=torch.Generator().manual_seed(2))
    assert out.shape == (512, 1, 224, 224)
    square_fraction = square**2 / size**2
    implied_scale = square_fraction / out.mean(dim=(1, 2, 3)).double()
    # each image: inside the bounds up to the bilinear edge of the square (a few percent)
    assert implied_scale.min() > SCALE[0] * 0.97 and implied_scale.max() < SCALE[1] * 1.03
    # the distribution: uniform on the bounds
    assert abs(implied_scale.mean().item() - sum(SCALE) / 2) < 0.01
    assert implied_scale.std().item() == pytest.approx((SCALE[1] - SCALE[0]) / math.sqrt(12), rel=0.25)


def test_evaluation_transform_is_deterministic_at_the_mean_scale():
    size, square = 424, 100
    images = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    low = (size - square) // 2
    images[:, :, low : low + square, low : low + square] = 255
    augment = GalaxyAugment(224, SCALE, RATIO)
    first, second = augment(images, train=False), augment(images, train=False)
    assert torch.equal(first, second) and torch.equal(first[0], first[1])
    implied_scale = (square**2 / size**2) / first.mean().item()
    assert implied_scale == pytest.approx(sum(SCALE) / 2, rel=0.02)


# ---------------------------------------------------------------------------------------- MC dropout
@pytest.mark.parametrize("architecture", ["efficientnet", "resnet_detectron"])
def test_encoder_once_mc_dropout_equals_full_passes_with_the_same_masks(architecture):
    schema = load_schema("gz_decals_dr5")
    torch.manual_seed(0)
    model = GalaxyZooModel(
        schema.to_dict(), architecture, channels=1, resize_size=64, dropout_rate=0.5
    ).eval()
    images = torch.randint(0, 256, (4, 1, 80, 80), dtype=torch.uint8)
    n_samples = 5
    with torch.no_grad():
        # an untrained network's eval-mode features are ~1e-14: give batch norm real statistics
        model.train()
        for _ in range(3):
            model.encode(model.augment(images, train=False))
        model.eval()
        model.head.linear.weight.mul_(50)  # and make dropout visible in the concentrations
        pixels = model.augment(images, train=False)
        torch.manual_seed(123)
        features = model.encode(pixels)
        fast = torch.stack([model.head(features, dropout=True) for _ in range(n_samples)], dim=1)
        torch.manual_seed(123)
        full = torch.stack([model(pixels, dropout=True) for _ in range(n_samples)], dim=1)
        without = model(pixels, dropout=False)
    assert fast.shape == (4, n_samples, len(schema.label_cols))
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    # the samples really differ (dropout was on) and differ from the dropout-free prediction
    assert (fast[:, 0] - fast[:, 1]).abs().max() > 1e-3
    assert (fast[:, 0] - without).abs().max() > 1e-3


def test_integer_grey_equals_the_rounded_float_mean_for_every_sum():
    levels = torch.arange(256, dtype=torch.uint8)
    blues = torch.tensor([0, 1, 2, 127, 254, 255], dtype=torch.uint8)
    rgb = torch.stack(torch.meshgrid(levels, levels, blues, indexing="ij")).reshape(3, 256, -1)
    expected = (rgb.double().sum(dim=0) / 3).round().to(torch.uint8)
    assert torch.equal(grey_mean(rgb)[0], expected)  # every sum 0..765, many ways each


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_luma_of_other_formats_uses_the_jpeg_weights(tmp_path, suffix):
    """A catalog mixing formats gets one grey: 0.299 R + 0.587 G + 0.114 B, whatever the decoder.

    Colour ramps, not a galaxy: galaxies are nearly grey, where every weighting agrees within a level;
    here Rec. 709's weights (libpng's own default) would be off by up to 30 levels.
    """
    x, y = np.meshgrid(np.arange(256), np.arange(256))
    rgb = np.stack([x, y, 255 - x], axis=2).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / f"ramps{suffix}")  # lossless
    luma = load_image(str(tmp_path / f"ramps{suffix}"), color=False, grey="luma")[0].double()
    expected = torch.from_numpy(rgb).double() @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    assert (luma - expected).abs().max() <= 1.5  # libpng truncates where JPEG and Pillow round


def test_packed_paths_give_each_row_its_own_image_through_worker_processes(tmp_path, demo_frame):
    """The dataset's paths live in one Arrow array; through forked workers every row still loads its
    own file, whatever the path's length or characters."""
    folders = [tmp_path / "a", tmp_path / "galaxies é ü", tmp_path / ("deep_" * 40) / "x"]
    rows = []
    for i, loc in enumerate(demo_frame["file_loc"].iloc[:12]):
        target = folders[i % 3] / f"g {i}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(loc, target)
        rows.append(str(target))
    catalog = pd.DataFrame({"id_str": [f"g{i}" for i in range(len(rows))], "file_loc": rows})
    dataset = GalaxyDataset.from_catalog(catalog, None, color=False, size=(128, 128))
    loader = LoaderSettings(batch_size=4, num_workers=2, prefetch_factor=2).loader(dataset, shuffle=False)
    images = torch.cat([batch["image"] for batch in loader])
    expected = torch.stack([load_image(path, color=False, size=(128, 128)) for path in rows])
    assert torch.equal(images, expected)
    assert len({image.sum().item() for image in images}) == len(rows)  # 12 different galaxies


def test_worker_batches_hold_what_the_default_collation_of_the_items_does(tmp_path, demo_frame):
    """Small fields cross from the workers as numpy arrays and arrive as the tensors torch's own
    collation makes of the same items: values, dtypes and shapes, an unreadable image included."""
    frame = demo_frame.iloc[:10].reset_index(drop=True)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    frame.loc[3, "file_loc"] = str(broken)
    label_cols = load_schema("decals_rings").label_cols
    dataset = GalaxyDataset.from_catalog(frame, label_cols, color=False, size=(96, 96))
    loader = LoaderSettings(batch_size=4, num_workers=2, prefetch_factor=2).loader(dataset)
    expected = [
        default_collate([{**item, "votes": torch.from_numpy(item["votes"])} for item in items])
        for items in (
            [dataset[i] for i in range(start, min(start + 4, len(dataset)))]
            for start in range(0, len(dataset), 4)
        )
    ]
    batches = list(loader)
    assert len(batches) == len(expected) == 3
    for got, want in zip(batches, expected, strict=True):
        assert got.keys() == want.keys()
        assert got["error"] == want["error"] and "BytesIO" not in str(got["error"])
        for key in ("image", "index", "ok", "votes"):
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert batches[0]["ok"].tolist() == [True, True, True, False] and "broken.jpg" in batches[0]["error"][3]
    assert batches[0]["votes"].tolist()[:3] == frame[label_cols].to_numpy()[:3].tolist()
