"""Peer side of bench_predict.py and bench_train_step.py: Zoobot's own `ZoobotTree` (timm
EfficientNet-B0 encoder + Dirichlet head with PermaDropout), randomly initialised, in the peer venv."""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version

import torch
from common import serve
from zoobot.pytorch.estimators.define_model import ZoobotTree


def main() -> None:
    config = json.loads(sys.argv[1])
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    data = torch.load(config["inputs"])
    model = ZoobotTree(
        output_dim=len(data["label_cols"]),
        question_answer_pairs=data["pairs"],
        dependencies=data["dependencies"],
        architecture_name="efficientnet_b0",
        channels=data["images"].shape[1],
        test_time_dropout=True,
        dropout_rate=0.2,
    )
    images = data["images"]
    if config.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    labels = {col: data["votes"][:, i] for i, col in enumerate(data["label_cols"])}

    def predict(n_samples: int) -> dict:
        """Zoobot's MC dropout: n complete forward passes (predict_on_catalog run n times)."""
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            out = torch.stack([model(images) for _ in range(n_samples)], dim=1)
        return {"seconds": time.perf_counter() - start, "shape": list(out.shape)}

    def train_step(steps: int) -> dict:
        """forward + Zoobot's loss (per question, summed, batch mean) + backward + AdamW step."""
        model.train()
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.mean(torch.sum(model.loss_func(model(images), labels), axis=1))
            loss.backward()
            optimizer.step()
        return {"seconds": (time.perf_counter() - start) / steps, "loss": float(loss)}

    params = sum(p.numel() for p in model.parameters())
    serve(
        {"predict": predict, "train_step": train_step}, ready={"zoobot": version("zoobot"), "params": params}
    )


if __name__ == "__main__":
    main()
