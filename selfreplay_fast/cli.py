"""The ``selfreplay`` command line: one subcommand per module in ``selfreplay_fast.commands``.

Each module exposes ``register(subparsers)``, which adds its parser and sets ``handler`` (a function
of the parsed arguments returning an exit code) as a default, and optionally ``on_interrupt`` (a
function of the arguments returning what survives a Ctrl-C, e.g. the sequences saved so far).

Errors come out as one line, ``selfreplay CMD: error: ...``: exit status 2 for a wrong argument
(argparse's convention), 1 for a failure while running, 130 after Ctrl-C. ``--debug`` (before or
after the subcommand) adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from . import __version__
from .commands._arguments import UsageError, one_line

# Subcommand modules, in the order ``selfreplay --help`` lists them.
COMMANDS = ["demo", "generate", "cache", "plan", "audit"]

EXIT_RUNTIME_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C

# Failures the library reports for bad data, files or devices: their message says it all. Any other
# exception is a bug, reported with its type and a pointer to --debug.
_EXPECTED_ERRORS = (ValueError, OSError, RuntimeError, ImportError)

_DEBUG_HELP = "on an error, print the traceback too"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: appended as ``(default: X)`` unless the help says what the
    default is already (options whose default is None must), or the option is a flag or required."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or action.required:
            return text
        return f"{text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block above them."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="selfreplay",
        description="Fine-tune LLMs without forgetting: self-generated replay with a fused KL to a cached top-k teacher.",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    parser.add_argument("--version", action="version", version=f"selfreplay-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"selfreplay_fast.commands.{name}").register(subparsers)
    for subparser in subparsers.choices.values():
        # SUPPRESS: a subcommand without --debug leaves the global flag's value alone.
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def _report(prog: str, message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"{prog}: {message}", file=sys.stderr)


def main(argv=None) -> int:
    """Run ``selfreplay`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or an argument error already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE_ERROR)
    prog = f"selfreplay {args.command}"
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        _report(prog, f"error: {one_line(exc)} (see {prog} --help)", args.debug)
        return EXIT_USAGE_ERROR
    except KeyboardInterrupt:
        note = getattr(args, "on_interrupt", None)
        try:
            detail = note(args) if note is not None else None
        except Exception:  # noqa: BLE001 - a note that fails must not hide the interruption
            detail = None
        _report(prog, "interrupted" + (f": {detail}" if detail else ""), args.debug)
        return EXIT_INTERRUPTED
    except _EXPECTED_ERRORS as exc:
        _report(prog, f"error: {one_line(exc)}", args.debug)
        return EXIT_RUNTIME_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug: one line still, the traceback on request
        hint = "" if args.debug else "; rerun with --debug for the traceback"
        _report(prog, f"error: {type(exc).__name__}: {one_line(exc)}{hint}", args.debug)
        return EXIT_RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())
