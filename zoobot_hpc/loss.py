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
    """`DirichletMultinomialLoss(answer_to_question)(concentrations, votes)`, for a single call."""
    return DirichletMultinomialLoss(answer_to_question)(concentrations, votes)


class DirichletMultinomialLoss:
    """Negative log-likelihood of the votes for one schema, per galaxy and question.

    Built once (the training module holds one): what depends only on the schema and the batch size,
    which question each entry belongs to and a table of log-factorials, is worked out on the first
    batch of each size and device, not on every step.
    """

    # log(j!) up to this many votes per question comes from a table (512 KiB); more, from lgamma
    TABLE_LIMIT = 1 << 16

    def __init__(self, answer_to_question: torch.Tensor) -> None:
        self.answer_to_question = answer_to_question.detach().cpu()
        self._question_of_answer = self.answer_to_question.argmax(dim=1)
        self._slots: dict[tuple[int, torch.device], torch.Tensor] = {}  # by batch size and device
        self._groups: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._log_factorial = self._log_factorials_up_to(1024)

    def __call__(
        self, concentrations: torch.Tensor, votes: torch.Tensor, reduction: str = "none"
    ) -> torch.Tensor:
        """Shape (galaxies, questions) for `reduction="none"`; for `"mean"`, the training loss: the
        sum over questions averaged over galaxies, a scalar (autograd then has no per-question tensor
        to pass back through). float32 (float64 for float64 concentrations).

        `concentrations` and `votes` are (galaxies, answers). The lgamma differences cancel badly in
        float32 once hundreds of votes meet concentrations near 100, so the (tiny) computation runs
        in float64 where the device has it.
        """
        if reduction not in ("none", "mean"):
            raise ValueError(f"reduction={reduction!r}: use 'none' (per galaxy and question) or 'mean'")
        return _DirichletMultinomialNLL.apply(concentrations, votes, self, reduction == "mean")

    def layout(self, votes: torch.Tensor, dtype: torch.dtype) -> _Layout:
        galaxies, device = len(votes), votes.device
        slot = self._slots.get((galaxies, device))
        if slot is None:
            questions = self.answer_to_question.shape[1]
            rows = torch.arange(0, galaxies * questions, questions)
            slot = (rows[:, None] + self._question_of_answer).flatten().to(device)
            self._slots[galaxies, device] = slot
        groups = self._groups.get((device, dtype))
        if groups is None:
            groups = self._groups[device, dtype] = self.answer_to_question.to(device=device, dtype=dtype)
        return _Layout(votes, slot, groups, _answered_only(device))

    def log_factorials(
        self, counts: torch.Tensor, k: torch.Tensor, n: torch.Tensor, whole: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log(k!) and log(n!) of vote counts (as given, `counts`, and as floats, `k`) and their
        float totals `n`. Whole counts (`whole`) are looked up in the table, grown when a total is
        beyond it; others go to lgamma (a negative count, from corrupt data, gives the infinity the
        training step reports with the batch's galaxies)."""
        if whole:
            totals = n.long()
            table = self._log_factorial
            try:  # no check before the lookup: reading the smallest and largest count costs more
                return table.index_select(0, counts), table.index_select(0, totals)
            except IndexError:  # a count is negative or a total beyond the table
                largest = int(totals.max())  # the counts are not empty: a total is over 0
                if int(counts.min()) >= 0 and largest < self.TABLE_LIMIT:
                    self._log_factorial = self._log_factorials_up_to(min(self.TABLE_LIMIT, 2 * largest))
                    return self.log_factorials(counts, k, n, whole)
        return torch.lgamma(k + 1), torch.lgamma(n + 1)

    @staticmethod
    def _log_factorials_up_to(size: int) -> torch.Tensor:
        """log(j!) at j, for j < size."""
        return torch.lgamma(torch.arange(1, size + 1, dtype=torch.float64))


class _DirichletMultinomialNLL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        concentrations: torch.Tensor,
        votes: torch.Tensor,
        loss: DirichletMultinomialLoss,
        mean: bool,
    ) -> torch.Tensor:
        device = concentrations.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        votes = votes.to(device)
        layout = loss.layout(votes, dtype)
        alpha = concentrations.detach().to(dtype).flatten()
        counts, alpha_k = layout.pick(votes.flatten()), layout.pick(alpha)
        k = counts.to(dtype)
        n, alpha_total = layout.question_sums(k, picked=True), layout.question_sums(alpha)
        arguments = torch.cat([k + alpha_k, alpha_k, alpha_total, n + alpha_total])
        ctx.sizes = [len(k)] * 2 + [len(n)] * 2
        k_alpha, alpha_k, total, n_total = torch.lgamma(arguments).split(ctx.sizes)
        whole = layout.answered_only and not votes.is_floating_point()
        log_factorial_k, log_factorial_n = loss.log_factorials(counts, k, n, whole)
        # -log p: each question's own terms, with its answers' terms summed into them
        nll = layout.add_to_questions(n_total - total - log_factorial_n, alpha_k + log_factorial_k - k_alpha)
        ctx.save_for_backward(arguments)
        ctx.layout, ctx.dtype, ctx.mean = layout, concentrations.dtype, mean
        out_dtype = torch.float64 if concentrations.dtype == torch.float64 else torch.float32
        if mean:
            return (nll.sum() / len(votes)).to(out_dtype)
        return nll.view(layout.question_shape).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (arguments,) = ctx.saved_tensors
        layout = ctx.layout
        k_alpha, alpha_k, total, n_total = torch.digamma(arguments).split(ctx.sizes)
        if ctx.mean:  # the same for every question: a scalar
            upstream = picked_upstream = grad_output.to(arguments.dtype) / layout.answer_shape[0]
        else:  # per question
            upstream = grad_output.reshape(-1).to(arguments.dtype)
            picked_upstream = layout.per_picked(upstream)
        d_answers = layout.per_answer(upstream * (n_total - total))
        d_answers = layout.add_to_answers(d_answers, picked_upstream * (alpha_k - k_alpha))
        return d_answers.view(layout.answer_shape).to(ctx.dtype), None, None, None


def _answered_only(device: torch.device) -> bool:
    """Whether to evaluate only the answered entries, on the CPU. Not on accelerators: finding them
    would make the host wait for the device (their number is data-dependent), sizing a table of
    log-factorials too, and `index_add` there sums in a varying order. The terms of unanswered
    entries are exact zeros, so both ways give the same numbers."""
    return device.type == "cpu"


class _Layout:
    """Which question each (galaxy, answer) entry belongs to (`slot`, flat (galaxy, question)
    index), and which entries are evaluated: the answered ones (`answered_only`), summed into their
    questions by `index_add`, or all of them, summed by a product with the answer-to-question
    matrix `groups`. Every tensor here is flattened."""

    def __init__(
        self, votes: torch.Tensor, slot: torch.Tensor, groups: torch.Tensor, answered_only: bool
    ) -> None:
        self.answer_shape, self.question_shape = votes.shape, (len(votes), groups.shape[1])
        self.slot, self.groups = slot, groups
        self.index = votes.flatten().nonzero().squeeze(1) if answered_only else None  # votes >= 0
        self.picked_slot = slot if self.index is None else slot.index_select(0, self.index)

    @property
    def answered_only(self) -> bool:
        return self.index is not None

    def pick(self, values: torch.Tensor) -> torch.Tensor:
        """The entries evaluated, of a flat tensor of entries."""
        return values if self.index is None else values.index_select(0, self.index)

    def question_sums(self, values: torch.Tensor, picked: bool = False) -> torch.Tensor:
        """Per (galaxy, question) sums of a flat tensor of entries, or of picked entries."""
        zeros = values.new_zeros(self.question_shape[0] * self.question_shape[1])
        return self._add(zeros, self.picked_slot if picked else self.slot, values)

    def add_to_questions(self, question_values: torch.Tensor, picked_values: torch.Tensor) -> torch.Tensor:
        """`question_values` (a temporary, changed in place) plus each question's sum of `picked_values`."""
        return self._add(question_values, self.picked_slot, picked_values)

    def per_answer(self, question_values: torch.Tensor) -> torch.Tensor:
        """Each entry's question's value."""
        return question_values.index_select(0, self.slot)

    def per_picked(self, question_values: torch.Tensor) -> torch.Tensor:
        """Each picked entry's question's value."""
        return question_values.index_select(0, self.picked_slot)

    def add_to_answers(self, values: torch.Tensor, picked_values: torch.Tensor) -> torch.Tensor:
        """`values` of every entry (a temporary, changed in place) plus `picked_values`."""
        return (
            values.add_(picked_values)
            if self.index is None
            else values.index_add_(0, self.index, picked_values)
        )

    def _add(self, into: torch.Tensor, slot: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`into` plus each question's sum of `values`: by `slot` on the CPU, by matrix product on
        accelerators (where every entry is evaluated)."""
        if self.index is None:
            return into.add_((values.view(self.answer_shape) @ self.groups).flatten())
        return into.index_add_(0, slot, values)


def expected_vote_fractions(concentrations: torch.Tensor, answer_to_question: torch.Tensor) -> torch.Tensor:
    """Mean of each question's Dirichlet: a_i / sum of the question's a, shape (galaxies, answers)."""
    groups = answer_to_question.to(device=concentrations.device, dtype=concentrations.dtype)
    totals = (concentrations @ groups) @ groups.T
    return concentrations / totals
