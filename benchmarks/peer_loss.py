"""Peer side of bench_loss.py, run in the peer venv: Zoobot's own per-question Dirichlet loss."""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version

import torch
from common import serve
from zoobot.pytorch.estimators.define_model import get_dirichlet_loss_func


def main() -> None:
    config = json.loads(sys.argv[1])
    torch.set_num_threads(config["threads"])
    data = torch.load(config["inputs"])
    loss_func = get_dirichlet_loss_func(data["pairs"])
    votes = data["votes"]
    targets = {col: votes[:, i] for i, col in enumerate(data["label_cols"])}
    alpha = data["concentrations"].clone().requires_grad_(True)

    def step() -> torch.Tensor:
        per_question = loss_func(alpha, targets)  # (batch, questions), as ZoobotTree computes it
        torch.mean(torch.sum(per_question, axis=1)).backward()
        return per_question

    values = step().detach()
    with torch.no_grad():  # the same formula in float64: what "equal values" is judged against
        values64 = loss_func(alpha.double(), targets)
    torch.save({"values": values, "values64": values64, "grad": alpha.grad.clone()}, config["outputs"])

    def time_it(iters: int) -> dict:
        start = time.perf_counter()
        for _ in range(iters):
            alpha.grad = None
            step()
        return {"ms": (time.perf_counter() - start) / iters * 1e3}

    serve({"time": time_it}, ready={"zoobot": version("zoobot")})


if __name__ == "__main__":
    main()
