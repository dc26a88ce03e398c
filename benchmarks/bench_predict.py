"""MC-dropout prediction, n_samples=5, EfficientNet-B0 at 224, grey, on the shared galaxies.

- ours: `GalaxyZooModel.encode` once, then `head(features, dropout=True)` n times, with the encoder
  channels-last as our prediction path runs it on the CPU (`channels_last_suits`).
- peer: Zoobot's prediction path, n complete forward passes of its own `ZoobotTree` (timm
  EfficientNet-B0, test_time_dropout=True), in the peer venv, on the same preprocessed images.
- also: n full passes of our model (the peer's algorithm on our network), to separate the algorithm
  from the implementation of the network.
Target: ours >= 3x the peer.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import WORK, Peer, machine, median, set_threads, spread
from model_inputs import save_peer_inputs, shared_batch

from zoobot_hpc.galaxy_model import GalaxyZooModel
from zoobot_hpc.hardware import channels_last_suits
from zoobot_hpc.schema import load_schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--n-samples", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    WORK.mkdir(parents=True, exist_ok=True)

    schema = load_schema("gz_decals_dr5")
    raw, _ = shared_batch(args.images)
    model = GalaxyZooModel(schema.to_dict(), "efficientnet", channels=1, resize_size=224).eval()
    model.use_channels_last(channels_last_suits(on_cpu=True, mixed_precision=False))  # as predict_inputs
    with torch.no_grad():
        images = model.augment(raw, train=False)  # the deterministic eval transform, (B, 1, 224, 224)
    votes = torch.zeros(args.images, len(schema.label_cols), dtype=torch.long)
    inputs = WORK / "predict_inputs.pt"
    save_peer_inputs(inputs, schema, images, votes)
    peer = Peer("peer_model.py", {"inputs": str(inputs), "threads": args.threads})

    def ours() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            features = model.encode(images)
            out = torch.stack([model.head(features, dropout=True) for _ in range(args.n_samples)], dim=1)
        assert out.shape == (args.images, args.n_samples, len(schema.label_cols))
        return time.perf_counter() - start

    def ours_full() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            torch.stack([model(images, dropout=True) for _ in range(args.n_samples)], dim=1)
        return time.perf_counter() - start

    ours(), ours_full(), peer.call(cmd="predict", n_samples=1)  # warm-up
    times: dict[str, list[float]] = {"ours": [], "peer": [], "ours_full": []}
    for _ in range(args.reps):
        times["ours"].append(ours())
        times["peer"].append(peer.call(cmd="predict", n_samples=args.n_samples)["seconds"])
        times["ours_full"].append(ours_full())
        print("rep", {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
    peer.close()

    rate = {k: args.images / median(v) for k, v in times.items()}
    print(f"machine: {machine()}; torch threads {args.threads}")
    print(
        f"{args.images} shared galaxies, grey 224 px, EfficientNet-B0, "
        f"DR5 head ({len(schema.label_cols)} answers), "
        f"n_samples={args.n_samples}, median of {args.reps}"
    )
    print(
        f"ours (encoder once, head x{args.n_samples}):   {rate['ours']:7.1f} galaxies/s  "
        f"{spread([args.images / t for t in times['ours']])}"
    )
    print(
        f"peer (ZoobotTree, {args.n_samples} full passes): {rate['peer']:7.1f} galaxies/s  "
        f"{spread([args.images / t for t in times['peer']])}  (zoobot {peer.ready['zoobot']})"
    )
    print(
        f"our network, {args.n_samples} full passes:       {rate['ours_full']:7.1f} galaxies/s  "
        f"{spread([args.images / t for t in times['ours_full']])}"
    )
    ratio = rate["ours"] / rate["peer"]
    print(
        f"RATIOS predict: ours/peer {ratio:.2f}x (target >=3: {'met' if ratio >= 3 else 'NOT met'}); "
        f"ours/our-full-passes {rate['ours'] / rate['ours_full']:.2f}x"
    )


if __name__ == "__main__":
    main()
