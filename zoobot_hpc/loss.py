"""Dirichlet-Multinomial likelihood of volunteer votes, all questions at once.

For one question with vote counts k_i (total n) and predicted concentrations a_i (total A):

    log p(k | a) = lgamma(n + 1) - sum lgamma(k_i + 1) + lgamma(A) - lgamma(n + A)
                   + sum [lgamma(k_i + a_i) - lgamma(a_i)]

Per-answer terms are summed into per-question terms with one matrix product, so the cost does not
grow with a Python loop over questions. A question nobody was asked (n = 0) contributes exactly 0
and no gradient.
"""

from __future__ import annotations

import torch


def dirichlet_multinomial_nll(
    concentrations: torch.Tensor, votes: torch.Tensor, answer_to_question: torch.Tensor
) -> torch.Tensor:
    """Negative log-likelihood per galaxy and question, shape (galaxies, questions), float32.

    `concentrations` and `votes` are (galaxies, answers); `answer_to_question` is the schema's
    (answers, questions) one-hot matrix. The lgamma differences cancel badly in float32 once
    hundreds of votes meet concentrations near 100, so the (tiny) computation runs in float64
    where the device has it.
    """
    dtype = torch.float32 if concentrations.device.type == "mps" else torch.float64  # MPS has no float64
    alpha = concentrations.to(dtype)
    k = votes.to(dtype)
    groups = answer_to_question.to(device=alpha.device, dtype=dtype)
    per_answer = torch.lgamma(k + alpha) - torch.lgamma(alpha) - torch.lgamma(k + 1)
    n = k @ groups
    alpha_total = alpha @ groups
    log_prob = torch.lgamma(n + 1) + torch.lgamma(alpha_total) - torch.lgamma(n + alpha_total)
    log_prob = log_prob + per_answer @ groups
    asked = n > 0
    return torch.where(asked, -log_prob, torch.zeros_like(log_prob)).to(torch.float32)


def expected_vote_fractions(concentrations: torch.Tensor, answer_to_question: torch.Tensor) -> torch.Tensor:
    """Mean of each question's Dirichlet: a_i / sum of the question's a, shape (galaxies, answers)."""
    groups = answer_to_question.to(device=concentrations.device, dtype=concentrations.dtype)
    totals = (concentrations @ groups) @ groups.T
    return concentrations / totals
