"""`zoobot-hpc` command line: one subcommand per task, each defined next to the code it runs.

Every module named in `COMMAND_MODULES` has `add_cli_parser(subparsers)`, which adds its
subcommands and sets `func(args) -> int` on them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "zoobot_hpc.commands",
    "zoobot_hpc.slurm_cli",
    "zoobot_hpc.selftest",
    "zoobot_hpc.predict_commands",
)


def build_parser() -> argparse.ArgumentParser:
    from zoobot_hpc import __version__

    parser = argparse.ArgumentParser(prog="zoobot-hpc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from zoobot_hpc.errors import InputError, RunError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (InputError, RunError) as err:
        print(f"zoobot-hpc {args.command}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1


if __name__ == "__main__":
    sys.exit(main())
