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
would keep a dozen intermediate tensors and call digamma once per lgamma. On the CPU, where torch's
lgamma and digamma cost 8-13 ns per argument, both come from Stirling's series instead, vectorised
operations that share their logarithm (`_StirlingGamma`).
"""

from __future__ import annotations

import math
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
        return _Layout(votes, slot, groups, _cpu_strategy(device))

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
        # each term of -log p pairs an argument with itself plus a vote count, so one subtraction of
        # the halves gives them all: lgamma(a_i) - lgamma(k_i + a_i) of the answers given, then
        # lgamma(n + A) - lgamma(A) of the questions (backward does the same with digamma)
        arguments = torch.cat([k + alpha_k, alpha_total, alpha_k, n + alpha_total])
        half, given = len(arguments) // 2, len(k)  # each half: the answers given, then the questions
        gamma = _StirlingGamma(arguments) if layout.on_cpu else _TorchGamma(arguments)
        log_gamma = gamma.lgamma()
        terms = log_gamma[half:] - log_gamma[:half]
        whole = layout.on_cpu and not votes.is_floating_point()
        log_factorial_k, log_factorial_n = loss.log_factorials(counts, k, n, whole)
        ctx.gamma, ctx.given = gamma, given
        ctx.layout, ctx.dtype, ctx.mean = layout, concentrations.dtype, mean
        out_dtype = torch.float64 if concentrations.dtype == torch.float64 else torch.float32
        if mean:  # the batch's sum: no per-question sums needed
            total = terms.sum() + (log_factorial_k.sum() - log_factorial_n.sum())
            return (total / len(votes)).to(out_dtype)
        # each question's own terms, with its answers' terms summed into them
        nll = layout.add_to_questions(terms[given:] - log_factorial_n, terms[:given] + log_factorial_k)
        return nll.view(layout.question_shape).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        layout = ctx.layout
        digammas = ctx.gamma.digamma()
        half = len(digammas) // 2
        gradients = digammas[half:] - digammas[:half]
        picked, per_question = gradients[: ctx.given], gradients[ctx.given :]
        if ctx.mean:  # the same upstream gradient for every question: scale once, at the end
            d_answers = layout.add_to_answers(layout.per_answer(per_question), picked)
            scale = grad_output.to(digammas.dtype) / layout.answer_shape[0]
            return (d_answers.view(layout.answer_shape) * scale).to(ctx.dtype), None, None, None
        upstream = grad_output.reshape(-1).to(digammas.dtype)
        d_answers = layout.add_to_answers(
            layout.per_answer(per_question * upstream), picked * layout.per_picked(upstream)
        )
        return d_answers.view(layout.answer_shape).to(ctx.dtype), None, None, None


def _cpu_strategy(device: torch.device) -> bool:
    """On the CPU, evaluate only the answered entries, with lgamma and digamma from Stirling's
    series. Not on accelerators: finding the answered entries would make the host wait for the
    device (their number is data-dependent), sizing a table of log-factorials too, `index_add` there
    sums in a varying order, and the series' twenty-odd operations would be as many kernel launches
    where torch's lgamma and digamma are one each. The terms of unanswered entries are exact zeros,
    so both ways give the same numbers (to 1e-10, the series' accuracy)."""
    return device.type == "cpu"


class _TorchGamma:
    """torch's lgamma and digamma of the loss's arguments (accelerators)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def lgamma(self) -> torch.Tensor:
        return torch.lgamma(self.x)

    def digamma(self) -> torch.Tensor:
        return torch.digamma(self.x)


class _StirlingGamma:
    """lgamma and digamma of float64 arguments x > 0 (to 1e-10 absolute, for x below ~1e38, where
    the product below overflows), from Stirling's series at y = x + 8.

    torch's CPU lgamma and digamma take 8-13 ns per element, about 60% of the loss; these take
    ~20 vectorised operations each, and digamma reuses what lgamma computed (log y, 1/y, the
    product). The shift: lgamma(x) = lgamma(x + 8) - log P and digamma(x) = digamma(x + 8) - P'/P,
    with P = x (x+1) ... (x+7) = u (u+6) (u+10) (u+12) for u = x (x+7). At y >= 8 the series'
    first omitted terms, 1/(1680 y^7) and 1/(240 y^8), are below 3e-10.
    """

    SHIFT = 8.0
    HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.u = (x + 7.0).mul_(x)
        self.product = (self.u + 6.0).mul_(self.u).mul_(self.u + 10.0).mul_(self.u + 12.0)
        self.y = x + self.SHIFT
        self.log_y = self.y.log()
        self.r = self.y.reciprocal()
        self.r2 = self.r * self.r

    def lgamma(self) -> torch.Tensor:
        # (y - 1/2) log y - y + log(2 pi)/2 + 1/(12 y) - 1/(360 y^3) + 1/(1260 y^5)
        series = self.r2.mul(1 / 1260).sub_(1 / 360).mul_(self.r2).add_(1 / 12).mul_(self.r)
        stirling = (self.y - 0.5).mul_(self.log_y).sub_(self.y).add_(series).add_(self.HALF_LOG_2PI)
        return stirling.sub_(self.product.log())

    def digamma(self) -> torch.Tensor:
        # log y - 1/(2 y) - 1/(12 y^2) + 1/(120 y^4) - 1/(252 y^6)
        series = self.r2.mul(-1 / 252).add_(1 / 120).mul_(self.r2).sub_(1 / 12).mul_(self.r2)
        stirling = self.r.mul(-0.5).add_(self.log_y).add_(series)
        # P'/P = sum of 1/(x + j), j < 8: dP/du = 4u^3 + 84u^2 + 504u + 720, du/dx = 2x + 7
        d_product = self.u.mul(4.0).add_(84.0).mul_(self.u).add_(504.0).mul_(self.u).add_(720.0)
        return stirling.sub_(d_product.mul_((self.x * 2.0).add_(7.0)).div_(self.product))


class _Layout:
    """Which question each (galaxy, answer) entry belongs to (`slot`, flat (galaxy, question)
    index), and which entries are evaluated: the answered ones (on the CPU, `on_cpu`), summed into their
    questions by `index_add`, or all of them, summed by a product with the answer-to-question
    matrix `groups`. Every tensor here is flattened."""

    def __init__(self, votes: torch.Tensor, slot: torch.Tensor, groups: torch.Tensor, on_cpu: bool) -> None:
        self.answer_shape, self.question_shape = votes.shape, (len(votes), groups.shape[1])
        self.slot, self.groups = slot, groups
        self.index = votes.flatten().nonzero().squeeze(1) if on_cpu else None  # votes >= 0
        self.picked_slot = slot if self.index is None else slot.index_select(0, self.index)

    @property
    def on_cpu(self) -> bool:
        """Whether only the answered entries are evaluated (`_cpu_strategy`)."""
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
