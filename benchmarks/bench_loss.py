"""Loss forward + backward, batch 256, GZ DECaLS DR5 schema: ours vs Zoobot's per-question loss.

Ours: `zoobot_hpc.loss.DirichletMultinomialLoss` (all questions at once, only the answers given,
lgamma and digamma from Stirling's series, the gradient written out), timed as the training step
calls it (`reduction="mean"`: the batch loss, summed over questions and averaged over galaxies, inside
the loss) and with per-question values summed and averaged afterwards, as the peer's. Peer: Zoobot's
`CustomMultiQuestionLoss` with `get_dirichlet_neg_log_prob` (a Python loop over questions), run in the
peer venv on the same saved inputs. Values are also compared with a float64 pyro reference.
Targets: >= 3x faster; values equal to relative 1e-5.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import WORK, Peer, machine, median, set_threads, spread
from votes import simulate_votes

from zoobot_hpc.loss import DirichletMultinomialLoss, _StirlingGamma
from zoobot_hpc.schema import load_schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--iters", type=int, default=200, help="forward+backward calls per repetition")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)

    schema = load_schema("gz_decals_dr5")
    votes = torch.from_numpy(simulate_votes(schema, args.batch, root_volunteers=40, seed=0))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, len(schema.label_cols), generator=generator) * 2
    concentrations = (1 + 100 * torch.sigmoid(logits)).float()
    inputs = WORK / "loss_inputs.pt"
    torch.save(
        {
            "concentrations": concentrations,
            "votes": votes,
            "pairs": {q.name: [f"_{a}" for a in q.answers] for q in schema.questions},
            "label_cols": schema.label_cols,
        },
        inputs,
    )
    groups = schema.answer_to_question_matrix
    loss = DirichletMultinomialLoss(groups)  # built once, as the training module does

    def ours_step(alpha: torch.Tensor) -> None:
        """The batch loss and its gradient, as the training step computes them."""
        loss(alpha, votes, reduction="mean").backward()

    def ours_per_question_step(alpha: torch.Tensor) -> torch.Tensor:
        """Per-question values (as validation logs them), then summed and averaged as the peer does."""
        per_question = loss(alpha, votes)
        per_question.sum(dim=1).mean().backward()
        return per_question

    alpha = concentrations.clone().requires_grad_(True)
    ours_values = ours_per_question_step(alpha).detach()
    ours_grad = alpha.grad.clone()
    alpha.grad = None
    ours_step(alpha)
    torch.testing.assert_close(alpha.grad, ours_grad, rtol=1e-6, atol=1e-12, msg="reductions disagree")

    peer = Peer(
        "peer_loss.py",
        {"inputs": str(inputs), "outputs": str(WORK / "loss_peer.pt"), "threads": args.threads},
    )
    peer_out = torch.load(WORK / "loss_peer.pt")
    peer_values, peer_values64, peer_grad = peer_out["values"], peer_out["values64"], peer_out["grad"]

    # float64 reference, independent of both: pyro's DirichletMultinomial per question
    from pyro.distributions import DirichletMultinomial

    reference = torch.zeros_like(ours_values, dtype=torch.float64)
    for j, q in enumerate(schema.questions):
        k = votes[:, q.start : q.end].double()
        a = concentrations[:, q.start : q.end].double()
        reference[:, j] = -DirichletMultinomial(a, total_count=k.sum(1)).log_prob(k)

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.double(), y.double()
        return float(((x - y).abs() / y.abs().clamp(min=1e-6)).max())

    # What the special functions alone cost: lgamma and digamma (its gradient) of the arguments our
    # loss evaluates (the answers given and every question; the log-factorials of the counts come
    # from a table), by torch's float64 functions and by the series our CPU loss uses instead.
    k64, a64, g64 = votes.double(), concentrations.double(), groups.double()
    given = votes > 0
    totals = a64 @ g64
    arguments = torch.cat([(k64 + a64)[given], a64[given], totals.flatten(), (k64 @ g64 + totals).flatten()])

    def torch_special_functions() -> None:
        torch.lgamma(arguments)
        torch.digamma(arguments)

    def series_special_functions() -> None:
        series = _StirlingGamma(arguments)
        series.lgamma()
        series.digamma()

    def ms_per_call(step: Callable[[], object]) -> float:
        start = time.perf_counter()
        for _ in range(args.iters):
            alpha.grad = None
            step()
        return (time.perf_counter() - start) / args.iters * 1e3

    ours_times, per_question_times, peer_times, torch_special_times, series_times = [], [], [], [], []
    for _ in range(args.reps):  # interleaved: ours, peer, ours, peer, ...
        ours_times.append(ms_per_call(lambda: ours_step(alpha)))
        per_question_times.append(ms_per_call(lambda: ours_per_question_step(alpha)))
        peer_times.append(peer.call(cmd="time", iters=args.iters)["ms"])
        torch_special_times.append(ms_per_call(torch_special_functions))
        series_times.append(ms_per_call(series_special_functions))
    peer.close()

    ours_ms, peer_ms = median(ours_times), median(peer_times)
    per_question_ms = median(per_question_times)
    asked = votes @ groups.long() > 0
    print(f"machine: {machine()}; torch threads {args.threads}")
    print(
        f"batch {args.batch}, schema gz_decals_dr5 ({len(schema.label_cols)} answers, "
        f"{len(schema.questions)} questions), "
        f"40 volunteers at the root, {(~asked).float().mean():.0%} of galaxy-questions unasked"
    )
    print(
        f"ours forward+backward, the training step's reduction='mean': {ours_ms:.3f} ms {spread(ours_times)} "
        f"(median of {args.reps})"
    )
    print(
        f"ours per-question values, then .sum(dim=1).mean() as the peer: {per_question_ms:.3f} ms "
        f"{spread(per_question_times)} (peer / this: {peer_ms / per_question_ms:.2f}x)"
    )
    print(f"peer forward+backward: {peer_ms:.3f} ms {spread(peer_times)} (zoobot {peer.ready['zoobot']})")
    print(
        f"lgamma + digamma of the {len(arguments)} arguments ours evaluates, alone: torch's float64 "
        f"{median(torch_special_times):.3f} ms {spread(torch_special_times)}; the series ours uses "
        f"{median(series_times):.3f} ms {spread(series_times)}"
    )
    print(
        f"max rel diff ours vs peer (its float32), per galaxy-question: {rel(ours_values, peer_values):.2e}; "
        f"batch loss: {rel(ours_values.sum(1).mean(), peer_values.sum(1).mean()):.2e}"
    )
    equal = rel(ours_values, peer_values64)
    print(f"max rel diff ours vs the peer's formula run in float64, per galaxy-question: {equal:.2e}")
    print(
        f"max rel diff vs float64 pyro reference: ours {rel(ours_values, reference):.2e}, "
        f"peer {rel(peer_values, reference):.2e}"
    )
    print(f"max rel diff of gradients ours vs peer: {rel(ours_grad, peer_grad):.2e}")
    print(
        f"unasked questions exactly 0: ours {bool((ours_values[~asked] == 0).all())}, "
        f"peer {bool((peer_values[~asked] == 0).all())}"
    )
    speed = peer_ms / ours_ms
    print(
        f"RATIOS loss: speed ours/peer {speed:.2f}x (target >=3: {'met' if speed >= 3 else 'NOT met'}; "
        f"per-question values then summed: {peer_ms / per_question_ms:.2f}x); "
        f"max rel diff vs the peer's formula in float64 {equal:.1e} (target 1e-5: "
        f"{'met' if equal <= 1e-5 else 'NOT met'}; vs its float32 run {rel(ours_values, peer_values):.1e})"
    )


if __name__ == "__main__":
    main()
