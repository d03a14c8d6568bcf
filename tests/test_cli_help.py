"""`selfreplay --help` and `--version`, and the example script's --help: every option explains itself and
states its default."""

import argparse
import importlib.util
import os

import pytest

import selfreplay_fast
from selfreplay_fast import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _undocumented(parser):
    """Options whose help is missing, or that take a value with a default the help does not state."""
    formatter = parser._get_formatter()
    bad = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version", "debug"):
            continue
        text = formatter._expand_help(action) if action.help else ""
        if not text or not (action.nargs == 0 or action.required or "default" in text):
            bad.append(f"{parser.prog} {'/'.join(action.option_strings)}: {text!r}")
    return bad


def _subcommands(parser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_subcommand_option_states_its_default():
    parsers = _subcommands(cli.build_parser())
    assert set(parsers) == set(cli.COMMANDS)
    bad = [line for p in parsers.values() for line in _undocumented(p)]
    assert not bad, "\n".join(bad)


def test_every_example_option_states_its_default():
    spec = importlib.util.spec_from_file_location("finetune_example", os.path.join(ROOT, "examples", "finetune_with_replay.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    bad = _undocumented(example.build_parser())
    assert not bad, "\n".join(bad)


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"selfreplay-fast {selfreplay_fast.__version__}"


@pytest.mark.parametrize("command", ["generate", "cache"])
def test_device_defaults_to_cuda_when_present(command, monkeypatch):
    """--device unset: cuda where torch sees a GPU (as for generate, now for cache too), else cpu."""
    from selfreplay_fast.commands._arguments import check_device

    args = _subcommands(cli.build_parser())[command].parse_args(
        ["--model", ROOT, "--out", os.path.join(ROOT, "nonexistent-out"), "--num-sequences", "1",
         "--max-new-tokens", "1"] if command == "generate" else
        ["--model", ROOT, "--out", os.path.join(ROOT, "nonexistent-out"), "--data", os.path.join(ROOT, "README.md")])
    assert args.device is None
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_device(args.device).type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device(args.device).type == "cpu"
