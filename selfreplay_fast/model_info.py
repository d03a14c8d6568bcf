"""What generation reads off a Hugging Face causal LM: its name, a hash of its config, its vocabulary
size, and the device and dtype of its weights (the weights themselves: fingerprint.py)."""

from __future__ import annotations

import hashlib
import json

__all__ = ["model_name", "model_config_hash", "output_vocab_size", "model_device_dtype"]


def _canonical_config(config) -> dict:
    # Fields that change with how a model was loaded (path, dtype, attention kernel, library version)
    # rather than with what it computes are left out, so a reload gets the same hash.
    data = config.to_dict()
    volatile = {"transformers_version", "torch_dtype", "dtype", "use_cache", "name_or_path"}
    return {key: value for key, value in data.items() if key not in volatile and not key.startswith("_")}


def model_config_hash(model) -> str:
    """sha256 of the model's config (load-time fields removed): identifies the architecture + vocab."""
    text = json.dumps(_canonical_config(model.config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_name(model) -> str:
    """The path or hub id the model was loaded from, else its class name."""
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or type(model).__name__)


def output_vocab_size(model) -> int:
    """Rows of the output layer (the vocabulary the model samples from), else ``config.vocab_size``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def model_device_dtype(model):
    """Device and dtype of the model's first parameter."""
    param = next(model.parameters())
    return param.device, param.dtype
