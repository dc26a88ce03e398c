"""Dirichlet-Multinomial likelihood of volunteer votes, all questions at once.

For one question with vote counts k_i (total n) and predicted concentrations a_i (total A):

    log p(k | a) = lgamma(n + 1) - sum lgamma(k_i + 1) + lgamma(A) - lgamma(n + A)
                   + sum [lgamma(k_i + a_i) - lgamma(a_i)]

    d(-log p)/d a_i = digamma(a_i) - digamma(k_i + a_i) + digamma(n + A) - digamma(A)

Each answer's terms are summed into its question's (by index on the CPU, by a product with the
one-hot answer-to-question matrix on accelerators), so the cost does not grow with a Python loop over
questions. Most of the cost is the special functions, so each is called once per step,
over one tensor holding all its arguments, and only where a term can be non-zero: an answer nobody
gave (k_i = 0) has lgamma(a_i) - lgamma(a_i) = 0 (a question nobody was asked, n = 0, has no
answers given and contributes exactly 0, with no gradient). The gradient is written out: autograd
would keep a dozen intermediate tensors and call digamma once per lgamma.
"""

from __future__ import annotations

from typing import Any

import torch


def dirichlet_multinomial_nll(
    concentrations: torch.Tensor, votes: torch.Tensor, answer_to_question: torch.Tensor
) -> torch.Tensor:
    """Negative log-likelihood per galaxy and question, shape (galaxies, questions), float32 (float64
    for float64 concentrations).

    `concentrations` and `votes` are (galaxies, answers); `answer_to_question` is the schema's
    (answers, questions) one-hot matrix. The lgamma differences cancel badly in float32 once
    hundreds of votes meet concentrations near 100, so the (tiny) computation runs in float64
    where the device has it.
    """
    return _DirichletMultinomialNLL.apply(concentrations, votes, answer_to_question)


class _DirichletMultinomialNLL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, concentrations: torch.Tensor, votes: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        device = concentrations.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        alpha = concentrations.detach().to(dtype)
        votes = votes.to(device)
        layout = _Layout(votes, groups.to(device=device, dtype=dtype), _answered_only(device))
        counts, alpha_k = layout.pick(votes), layout.pick(alpha)
        k = counts.to(dtype)
        n, alpha_total = layout.question_sums(k, picked=True), layout.question_sums(alpha)
        arguments = torch.cat([k + alpha_k, alpha_k, alpha_total, n + alpha_total])
        ctx.sizes = [len(k)] * 2 + [len(n)] * 2
        k_alpha, alpha_k, total, n_total = torch.lgamma(arguments).split(ctx.sizes)
        log_factorial_k, log_factorial_n = _log_factorials(counts, k, n, layout.answered_only)
        # -log p: each question's own terms, with its answers' terms summed into them
        nll = layout.add_to_questions(n_total - total - log_factorial_n, alpha_k + log_factorial_k - k_alpha)
        ctx.save_for_backward(arguments)
        ctx.layout, ctx.dtype = layout, concentrations.dtype
        out_dtype = torch.float64 if concentrations.dtype == torch.float64 else torch.float32
        return nll.view(layout.question_shape).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (arguments,) = ctx.saved_tensors
        layout = ctx.layout
        k_alpha, alpha_k, total, n_total = torch.digamma(arguments).split(ctx.sizes)
        d_nll = layout.add_to_answers(layout.per_answer(n_total - total), alpha_k - k_alpha)
        upstream = layout.per_answer(grad_output.reshape(-1).to(arguments.dtype))
        return (upstream * d_nll).view(layout.answer_shape).to(ctx.dtype), None, None


def _answered_only(device: torch.device) -> bool:
    """Whether to evaluate only the answered entries, on the CPU. Not on accelerators: finding them
    would make the host wait for the device (their number is data-dependent), sizing a table of
    log-factorials too, and `index_add` there sums in a varying order. The terms of unanswered
    entries are exact zeros, so both ways give the same numbers."""
    return device.type == "cpu"


def _log_factorials(
    counts: torch.Tensor, k: torch.Tensor, n: torch.Tensor, table: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """log(k!) and log(n!) of vote counts (as given, `counts`, and as floats, `k`) and their float
    totals `n`. Whole counts are looked up in a table up to the largest total when that is shorter
    than the counts: a few dozen lgamma calls instead of one per count. (A negative count, from
    corrupt data, goes to lgamma, whose infinity the training step reports with the batch's
    galaxies.)"""
    if table and not counts.is_floating_point() and len(counts):
        smallest, largest = int(counts.min()), int(n.max())
        if smallest >= 0 and largest < len(counts) + len(n):
            log_factorial = torch.lgamma(torch.arange(1, largest + 2, dtype=n.dtype))  # log(j!) at j
            return log_factorial.index_select(0, counts), log_factorial.index_select(0, n.long())
    return torch.lgamma(k + 1), torch.lgamma(n + 1)


class _Layout:
    """Which question each (galaxy, answer) entry belongs to, and which entries are evaluated: the
    answered ones (`answered_only`), summed into their questions by `index_add`, or all of them,
    summed by a product with the answer-to-question matrix. Every tensor here is flattened."""

    def __init__(self, votes: torch.Tensor, groups: torch.Tensor, answered_only: bool) -> None:
        galaxies, questions = len(votes), groups.shape[1]
        self.answer_shape, self.question_shape = votes.shape, (galaxies, questions)
        self.groups = groups
        rows = torch.arange(0, galaxies * questions, questions, device=votes.device)
        self.slot = (rows[:, None] + groups.argmax(dim=1)).flatten()  # each entry's (galaxy, question)
        self.index = votes.flatten().nonzero().squeeze(1) if answered_only else None  # votes >= 0
        self.picked_slot = self.slot if self.index is None else self.slot.index_select(0, self.index)

    @property
    def answered_only(self) -> bool:
        return self.index is not None

    def pick(self, values: torch.Tensor) -> torch.Tensor:
        """The entries evaluated."""
        return values.flatten() if self.index is None else values.flatten().index_select(0, self.index)

    def question_sums(self, values: torch.Tensor, picked: bool = False) -> torch.Tensor:
        """Per (galaxy, question) sums of a (galaxies, answers) tensor, or of picked entries."""
        zeros = values.new_zeros(self.question_shape[0] * self.question_shape[1])
        return self.add_to_questions(zeros, values) if picked else self._add(zeros, self.slot, values)

    def add_to_questions(self, question_values: torch.Tensor, picked_values: torch.Tensor) -> torch.Tensor:
        """`question_values` (a temporary, changed in place) plus each question's sum of `picked_values`."""
        return self._add(question_values, self.picked_slot, picked_values)

    def per_answer(self, question_values: torch.Tensor) -> torch.Tensor:
        """Each entry's question's value."""
        return question_values.index_select(0, self.slot)

    def add_to_answers(self, values: torch.Tensor, picked_values: torch.Tensor) -> torch.Tensor:
        """`values` of every entry (a temporary, changed in place) plus `picked_values`."""
        return (
            values.add_(picked_values)
            if self.index is None
            else values.index_add_(0, self.index, picked_values)
        )

    def _add(self, into: torch.Tensor, slot: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return into.add_((values.view(self.answer_shape) @ self.groups).flatten())
        return into.index_add_(0, slot, values.flatten())


def expected_vote_fractions(concentrations: torch.Tensor, answer_to_question: torch.Tensor) -> torch.Tensor:
    """Mean of each question's Dirichlet: a_i / sum of the question's a, shape (galaxies, answers)."""
    groups = answer_to_question.to(device=concentrations.device, dtype=concentrations.dtype)
    totals = (concentrations @ groups) @ groups.T
    return concentrations / totals
