"""Argument checks shared by the subcommands: ``argparse`` type functions and the usage error.

Everything here runs before any model is loaded, so that an ordinary mistake costs nothing but
a one-line message (``selfreplay CMD: error: argument --x: ...``, exit 2).
"""

from __future__ import annotations

import argparse
import math
import os


class UsageError(ValueError):
    """A command-line argument is wrong (exit status 2, like argparse's own errors).

    Raised by a handler for mistakes argparse cannot see alone (e.g. ``--top-k`` above the model's
    vocabulary); the message names the argument.
    """


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (Hugging Face's span several)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _integer(text: str) -> int:
    try:
        return int(text, 10)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (temperatures, learning rates, budgets)."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def number_list(parse):
    """An argparse type: comma-separated values, each checked by ``parse`` (e.g. ``positive_float``), no repeats."""

    def parse_list(text: str):
        items = [t.strip() for t in text.split(",")]
        if not text.strip() or any(not t for t in items):
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        values = [parse(t) for t in items]
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"values repeat in {text!r}")
        return values

    return parse_list


def existing_directory(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file, expected a directory")
    return text


def existing_file(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file")
    return text


def output_directory(text: str) -> str:
    """A directory that is there or can be created (its contents are the writer's to judge)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory path, got ''")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file, expected a directory")
    return text


def check_device(name, flag: str = "--device"):
    """``name`` as a ``torch.device`` that this machine has (None: cuda if there is one, else cpu); a
    UsageError naming ``flag`` otherwise."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"argument {flag}: {name!r} is not a torch device (expected e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"argument {flag}: {name!r} was asked for but torch sees no CUDA device")
        if device.index is not None and device.index >= count:
            raise UsageError(f"argument {flag}: {name!r} was asked for but torch sees {count} CUDA device(s)")
    elif device.type != "cpu":  # mps, xpu, ...: the backend module of that name says whether it is there
        backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is not None and not available():
            raise UsageError(f"argument {flag}: {name!r} was asked for but torch sees no {device.type} device")
    return device
