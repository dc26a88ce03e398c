"""CPU training step, EfficientNet-B0 at 224, grey, batch 16, DR5 schema: ours vs Zoobot's ZoobotTree.

Step = forward + loss (sum over questions, batch mean) + backward + AdamW step, on the same
preprocessed real galaxies and simulated DR5 votes. Ours with channels_last on (what
`train(channels_last="auto")` picks on the CPU) and off; the peer (timm EfficientNet-B0 + Zoobot's
per-question loss) in its venv, as Zoobot builds it (contiguous). Target: ours >= 1.0x the peer.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import WORK, Peer, machine, median, set_threads, spread
from model_inputs import save_peer_inputs, shared_batch
from votes import simulate_votes

from zoobot_hpc.galaxy_model import GalaxyZooModel
from zoobot_hpc.schema import load_schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per repetition")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    WORK.mkdir(parents=True, exist_ok=True)

    schema = load_schema("gz_decals_dr5")
    raw, _ = shared_batch(args.batch)
    models = {
        cl: GalaxyZooModel(schema.to_dict(), "efficientnet", channels=1, resize_size=224, channels_last=cl)
        for cl in (False, True)
    }
    with torch.no_grad():
        images = models[False].augment(raw, train=True, generator=torch.Generator().manual_seed(0))
    votes = torch.from_numpy(simulate_votes(schema, args.batch, seed=1))
    inputs = WORK / "train_inputs.pt"
    save_peer_inputs(inputs, schema, images, votes)
    peer = Peer("peer_model.py", {"inputs": str(inputs), "threads": args.threads})
    optimizers = {cl: m.configure_optimizers() for cl, m in models.items()}

    def ours(cl: bool) -> float:
        model, optimizer = models[cl], optimizers[cl]
        model.train()
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            loss = model.vote_loss(model(images), votes, "mean")
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / args.steps

    ours(False), ours(True), peer.call(cmd="train_step", steps=1)  # warm-up
    times: dict[str, list[float]] = {"ours": [], "ours_cl": [], "peer": []}
    for _ in range(args.reps):
        times["ours"].append(ours(False))
        times["peer"].append(peer.call(cmd="train_step", steps=args.steps)["seconds"])
        times["ours_cl"].append(ours(True))
        print("rep", {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
    peer.close()

    rate = {k: args.batch / median(v) for k, v in times.items()}
    ours_params = sum(p.numel() for p in models[False].parameters())
    print(f"machine: {machine()}; torch threads {args.threads}")
    print(
        f"batch {args.batch}, grey 224 px, EfficientNet-B0 + DR5 head; parameters ours {ours_params:,}, "
        f"peer {peer.ready['params']:,}; median of {args.reps} x {args.steps} steps"
    )
    for key, label in (
        ("ours", "ours, channels_last off"),
        ("ours_cl", "ours, channels_last on (default)"),
        ("peer", f"peer ZoobotTree (zoobot {peer.ready['zoobot']})"),
    ):
        print(
            f"{label:34s} {rate[key]:6.1f} img/s  {median(times[key]):.3f} s/step "
            f"{spread([args.batch / t for t in times[key]])}"
        )
    default = rate["ours_cl"] / rate["peer"]  # train(channels_last="auto") is on for the CPU
    print(
        f"RATIOS train step: ours/peer {default:.2f}x (channels_last on, train()'s default on the CPU), "
        f"{rate['ours'] / rate['peer']:.2f}x (off) (target >=1.0: {'met' if default >= 1 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
