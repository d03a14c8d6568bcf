"""What a subcommand needs to know about a model directory before loading its weights.

Reading ``config.json`` takes milliseconds where loading the weights can take minutes: a missing
directory, a directory that holds no model, or ``--top-k`` above the vocabulary is reported first.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

from ._arguments import UsageError, one_line


def read_model_config(path: str, flag: str = "--model"):
    """The model config in directory ``path`` (a UsageError naming ``flag`` if there is none)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"argument {flag}: {path} is not a Hugging Face model directory (it has no config.json)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # bad JSON, unknown model_type, ...
        raise UsageError(f"argument {flag}: {path}/config.json is not a readable model config: {one_line(exc)}") from None


def _text_config(config):
    # Multimodal configs keep the language model's sizes in a sub-config.
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _int_field(config, name: str) -> Optional[int]:
    value = getattr(_text_config(config), name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def config_vocab_size(config) -> Optional[int]:
    """The vocabulary size the config declares (None if it declares none)."""
    return _int_field(config, "vocab_size")


def config_max_positions(config) -> Optional[int]:
    """``max_position_embeddings`` (None if the config has no limit)."""
    return _int_field(config, "max_position_embeddings")


def check_top_k(top_k: int, config, flag: str = "--top-k") -> None:
    vocab = config_vocab_size(config)
    if vocab is not None and top_k > vocab:
        raise UsageError(f"argument {flag}: {top_k} exceeds the model's vocabulary size {vocab}")


def check_token_ids(ids, config, where: str) -> None:
    """Every id in ``ids`` inside the config's vocabulary; ``where`` names the source (file:line)."""
    vocab = config_vocab_size(config)
    if vocab is None:
        return
    for token in ids:
        if not 0 <= token < vocab:
            raise UsageError(f"{where}: token id {token} is outside the model's vocabulary [0, {vocab})")


@contextlib.contextmanager
def hub_progress_bars(enabled: bool):
    """Transformers' own progress bars ("Loading weights") on or off for the block, as --no-progress
    asks; the previous setting is restored (in-process callers of ``cli.main`` keep theirs)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
