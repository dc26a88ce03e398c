"""Core subcommands: train, validate, schemas, demo."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from zoobot_hpc.config import hardware_spec, load_config, train_kwargs


def add_cli_parser(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a model from a YAML config (keys = train() arguments)")
    _add_config_arguments(train)
    train.set_defaults(func=run_train)

    validate = subparsers.add_parser(
        "validate", help="check a config, its schema and catalogs without training"
    )
    _add_config_arguments(validate)
    validate.add_argument(
        "--check-images",
        action="store_true",
        help="also open and decode every image, in parallel (minutes for a large catalog)",
    )
    validate.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes decoding images (default: all CPUs)",
    )
    validate.set_defaults(func=run_validate)

    schemas = subparsers.add_parser("schemas", help="list the built-in schemas, or show one")
    schemas.add_argument("name", nargs="?", help="a built-in schema name or a YAML schema file")
    schemas.set_defaults(func=run_schemas)

    demo = subparsers.add_parser("demo", help="train briefly on the bundled demo galaxies (CPU)")
    demo.add_argument("--save-dir", default="outputs/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=3, help="epochs to train (default: %(default)s)")
    demo.set_defaults(func=run_demo)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file whose keys are train() arguments")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set epochs=10 --set gpus=0",
    )


def run_train(args: argparse.Namespace) -> int:
    from zoobot_hpc.training import train

    config = load_config(args.config, args.overrides)
    hardware_spec(config)  # refuse impossible hardware before anything is read
    _say_where_this_rank_runs()
    train(**train_kwargs(config))
    return 0


def _say_where_this_rank_runs() -> None:
    """One log line per process: which Python (a container's or a venv's) each rank really runs."""
    import torch

    from zoobot_hpc import __version__

    rank = os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", "0"))
    print(
        f"zoobot-hpc {__version__} train, rank {rank}: Python {sys.executable}, torch {torch.__version__}",
        file=sys.stderr,
        flush=True,
    )


def run_validate(args: argparse.Namespace) -> int:
    from zoobot_hpc.catalog import load_splits
    from zoobot_hpc.schema import load_schema

    config = load_config(args.config, args.overrides)
    spec = hardware_spec(config)
    schema = load_schema(config.get("schema", ""))
    kwargs = train_kwargs(config)
    splits = load_splits(
        schema,
        **{k: kwargs.get(k) for k in ("catalog", "train_catalog", "val_catalog", "test_catalog")},
        **{k: kwargs[k] for k in ("split_fractions", "random_state") if k in kwargs},
    )
    print(
        f"ok: schema {schema.name} ({len(schema.questions)} questions, {len(schema.label_cols)} answers); "
        f"train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)} galaxies; "
        f"{spec.nodes} node(s) x {spec.ranks_per_node} rank(s) on {spec.resolved_accelerator}"
    )
    if args.check_images:
        return _check_images(splits, bool(kwargs.get("color", False)), args.workers)
    return 0


def _check_images(splits: Any, color: bool, workers: int) -> int:
    """Decode every image of every split; list the unreadable ones (all of them, in a file if many)."""
    import pandas as pd

    from zoobot_hpc.data import unreadable_images

    splits_locs = [getattr(splits, split)["file_loc"] for split in ("train", "val", "test")]
    locs = pd.concat(splits_locs, ignore_index=True)  # text columns: no Python string per row
    bad = unreadable_images(locs, color, workers)
    if not bad:
        print(f"ok: all {len(locs)} images decode")
        return 0
    print(f"error: {len(bad)} of {len(locs)} images cannot be decoded; the first {min(len(bad), 20)}:")
    for loc, reason in bad[:20]:
        print(f"  {loc}: {reason}")
    print(
        "Replace these files or remove their rows; or train with on_bad_image='skip' "
        "(each skipped image is listed in save_dir/skipped_images.txt)"
    )
    return 2


def run_schemas(args: argparse.Namespace) -> int:
    from zoobot_hpc.config import dump_yaml
    from zoobot_hpc.schema import builtin_schema_names, load_schema

    if args.name:
        sys.stdout.write(dump_yaml(load_schema(args.name).to_dict()))
        return 0
    for name in builtin_schema_names():
        schema = load_schema(name)
        print(f"{name:26s} {len(schema.questions):3d} questions {len(schema.label_cols):4d} answers")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from zoobot_hpc.demo import run_demo as demo

    demo(args.save_dir, epochs=args.epochs)
    return 0
