"""Prediction subcommands: predict, merge, report."""

from __future__ import annotations

import argparse
import logging


def add_cli_parser(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser(
        "predict", help="predict vote fractions (MC dropout) for a folder, catalog or list of images"
    )
    predict.add_argument("checkpoint", help="a .ckpt file written by zoobot-hpc train")
    predict.add_argument(
        "images", nargs="+", help="a folder of png/jpg/jpeg, a CSV/Parquet catalog, or image files"
    )
    predict.add_argument("output", help="a .parquet or .csv file; with --num-shards, a folder for the parts")
    predict.add_argument(
        "--n-samples", type=int, default=5, help="MC-dropout samples per image (default: %(default)s)"
    )
    predict.add_argument("--no-dropout", action="store_true", help="one deterministic sample, dropout off")
    predict.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    predict.add_argument(
        "--num-workers", type=int, default=4, help="image-decoding processes (default: %(default)s)"
    )
    predict.add_argument(
        "--gpus", type=int, default=0, help="0 (CPU) or 1; scale out with shards (default: %(default)s)"
    )
    predict.add_argument("--device", help="a torch device instead of --gpus, e.g. cuda:1 or mps")
    predict.add_argument("--num-shards", type=int, help="split the inputs into this many parts")
    predict.add_argument(
        "--shard-index",
        type=int,
        help="predict only this part (0-based; e.g. $SLURM_ARRAY_TASK_ID); all parts in turn if omitted",
    )
    predict.add_argument(
        "--on-bad-image",
        choices=("error", "skip"),
        default="error",
        help="stop at an unreadable image, or skip and list it in OUTPUT.skipped.txt (default: %(default)s)",
    )
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.set_defaults(func=run_predict)

    merge = subparsers.add_parser("merge", help="join the part files of a sharded prediction run")
    merge.add_argument("folder", help="the folder holding part-KKKKK-of-NNNNN.parquet")
    merge.add_argument("output", help="a .parquet or .csv file")
    merge.add_argument("--images", help="the inputs of the run: check that the ids are exactly theirs")
    merge.set_defaults(func=run_merge)

    report = subparsers.add_parser(
        "report", help="learning curves and test-set scatter of a training run (PNG)"
    )
    report.add_argument("save_dir", help="the save_dir of a training run")
    report.add_argument("--output", help="PNG path (default: SAVE_DIR/report.png)")
    report.set_defaults(func=run_report)


def _show_info_logs() -> None:
    """Warnings from everything, progress lines (INFO) from zoobot_hpc, on stderr."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("zoobot_hpc").setLevel(logging.INFO)


def run_predict(args: argparse.Namespace) -> int:
    from zoobot_hpc.prediction import predict

    _show_info_logs()
    images = args.images[0] if len(args.images) == 1 else args.images
    predict(
        args.checkpoint,
        images,
        args.output,
        n_samples=args.n_samples,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        gpus=args.gpus,
        device=args.device,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        on_bad_image=args.on_bad_image,
        dropout=not args.no_dropout,
        progress=not args.no_progress,
    )
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from zoobot_hpc.prediction import load_predictions, merge_parts

    _show_info_logs()
    output = merge_parts(args.folder, args.output, images=args.images)
    frame = load_predictions(output)
    skipped = len(frame.attrs["zoobot_hpc"].get("skipped", []))
    parts = len(frame.attrs["zoobot_hpc"]["merged_from"])
    print(f"merged {parts} parts: {len(frame)} galaxies, {skipped} skipped -> {output}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from zoobot_hpc.report import write_report

    _show_info_logs()
    print(f"report: {write_report(args.save_dir, output=args.output)}")
    return 0
