import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zoobot_hpc.loss import dirichlet_multinomial_nll, expected_vote_fractions
from zoobot_hpc.schema import load_schema

pyro_dist = pytest.importorskip("pyro.distributions", reason="pyro-ppl is the independent reference")


def reference_nll(concentrations, votes, schema):
    """Pyro's DirichletMultinomial, one question at a time; unasked questions contribute 0."""
    out = torch.zeros(votes.shape[0], len(schema.questions), dtype=torch.float64)
    for j, (start, end) in enumerate(schema.question_index_groups):
        k = votes[:, start:end].double()
        total = k.sum(dim=1)
        for i in range(votes.shape[0]):
            if total[i] > 0:
                dist = pyro_dist.DirichletMultinomial(
                    concentrations[i, start:end].double(), total_count=total[i]
                )
                out[i, j] = -dist.log_prob(k[i])
    return out


def tree_votes(schema, n, rng, root_volunteers=40):
    """Integer votes that flow down the decision tree: unasked questions get zero votes."""
    votes = np.zeros((n, len(schema.label_cols)), dtype=np.int64)
    index = {c: i for i, c in enumerate(schema.label_cols)}
    for question in schema.questions:
        if question.asked_after is None:
            total = np.full(n, root_volunteers)
        else:
            total = votes[:, index[question.asked_after]]
        p = rng.dirichlet(np.ones(len(question.answers)), size=n)
        for i in range(n):
            votes[i, question.start : question.end] = rng.multinomial(total[i], p[i])
    return torch.from_numpy(votes)


@pytest.mark.parametrize("schema_name", ["gz_decals_dr5", "decals_rings", "gz_decals_all_campaigns"])
def test_matches_pyro_reference(schema_name):
    schema = load_schema(schema_name)
    rng = np.random.default_rng(0)
    votes = tree_votes(schema, 16, rng)
    concentrations = 1 + 100 * torch.rand(
        16, len(schema.label_cols), generator=torch.Generator().manual_seed(1)
    )
    ours = dirichlet_multinomial_nll(concentrations, votes, schema.answer_to_question_matrix)
    reference = reference_nll(concentrations, votes, schema)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)


def test_edge_cases_match_reference():
    schema = load_schema("decals_rings")
    votes = torch.tensor(
        [
            [40, 0, 0, 0, 0, 0, 0],  # everyone said smooth: later questions unasked
            [0, 40, 0, 40, 0, 0, 0],  # all edge-on
            [0, 0, 0, 0, 0, 0, 0],  # nobody voted at all
            [1, 0, 0, 0, 0, 0, 0],  # a single vote
            [400, 400, 400, 0, 400, 200, 200],  # many votes
        ]
    )
    concentrations = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            [101.0] * 7,
            [50.0] * 7,
            [1.0001, 100.0, 3.0, 2, 2, 2, 2],
            [7.0] * 7,
        ]
    )
    ours = dirichlet_multinomial_nll(concentrations, votes, schema.answer_to_question_matrix)
    torch.testing.assert_close(
        ours.double(), reference_nll(concentrations, votes, schema), rtol=1e-5, atol=1e-5
    )
    assert bool((ours[2] == 0).all())


def test_unasked_question_contributes_exactly_zero_and_no_gradient():
    schema = load_schema("decals_rings")
    votes = torch.tensor([[40, 0, 0, 0, 0, 0, 0]])
    concentrations = torch.full((1, 7), 5.0, requires_grad=True)
    loss = dirichlet_multinomial_nll(concentrations, votes, schema.answer_to_question_matrix)
    assert loss[0, 1].item() == 0.0 and loss[0, 2].item() == 0.0
    loss.sum().backward()
    assert bool((concentrations.grad[0, 3:] == 0).all())
    assert bool((concentrations.grad[0, :3] != 0).all())


@settings(max_examples=60, deadline=None)
@given(
    votes=st.lists(st.integers(min_value=0, max_value=500), min_size=7, max_size=7),
    concentrations=st.lists(st.floats(min_value=1.0, max_value=101.0), min_size=7, max_size=7),
)
def test_loss_is_finite_for_any_valid_votes(votes, concentrations):
    schema = load_schema("decals_rings")
    loss = dirichlet_multinomial_nll(
        torch.tensor([concentrations]), torch.tensor([votes]), schema.answer_to_question_matrix
    )
    assert bool(torch.isfinite(loss).all()) and bool((loss >= -1e-3).all())
    for j, (start, end) in enumerate(schema.question_index_groups):
        if sum(votes[start:end]) == 0:
            assert loss[0, j].item() == 0.0


def test_expected_vote_fractions_sum_to_one_per_question():
    schema = load_schema("gz_decals_dr5")
    concentrations = 1 + 100 * torch.rand(4, 34)
    fractions = expected_vote_fractions(concentrations, schema.answer_to_question_matrix)
    sums = fractions @ schema.answer_to_question_matrix
    torch.testing.assert_close(sums, torch.ones(4, 10))
