"""The ``selfreplay`` command line: one subcommand per module in ``selfreplay_fast.commands``.

Each module exposes ``register(subparsers)``, which adds its parser and sets ``handler`` (a function
of the parsed arguments returning an exit code) as a default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order ``selfreplay --help`` lists them.
COMMANDS = ["demo", "generate", "cache", "plan"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfreplay",
        description="Fine-tune LLMs without forgetting: self-generated replay with a fused KL to a cached top-k teacher.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"selfreplay_fast.commands.{name}").register(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
