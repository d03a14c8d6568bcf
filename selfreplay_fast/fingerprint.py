"""A cheap fingerprint of a model's weights, so that a resumed run refuses to mix two teachers.

A buffer directory is resumed shard by shard, and every shard must come from the same teacher. The
model's name and config hash do not say that: a checkpoint retrained in place, or the same checkpoint
loaded in another dtype, has both unchanged. Hashing every weight would read all of them (16 GB for an
8B model in bfloat16) on each resume, so the fingerprint hashes a fixed sample instead:

* every parameter and persistent buffer, tied weights once (``named_parameters`` yields a shared tensor
  once), contributes its name, shape and dtype, and the exact bits of ``SAMPLE_SIZE`` of its elements
  (all of them in a smaller tensor);
* the sampled flat indices are ``i * stride mod n`` for ``i < SAMPLE_SIZE``, with ``stride`` the integer
  nearest ``n / golden ratio`` that is coprime with ``n``: distinct indices spread evenly over the tensor
  (a Weyl sequence), so that they meet every row of a matrix up to ``SAMPLE_SIZE`` rows, and every column
  up to ``SAMPLE_SIZE`` columns, where a plain stride could keep to one column;
* the samples are gathered on the tensors' own device and moved to the host in one transfer (about
  2.4 MB for an 8B model in bfloat16); indices and bits are integers, so the fingerprint is the same on
  every device.

What it catches: any change of a tensor's name, shape or dtype (a float32 against a bfloat16 load);
re-initialized or retrained weights; any fine-tune (full, or a merged LoRA) of any tensor, which changes
nearly all of that tensor's elements: if a fraction ``f`` of a tensor's elements changed, spread over it,
all ``SAMPLE_SIZE`` samples miss them with probability about ``(1 - f) ** 4096`` (below 1e-17 for
f = 1%). What it cannot catch: an edit of a few elements that the sample does not meet (a single weight
changed by hand). Only the weights are fingerprinted: the config, the vocabulary and the settings of a
run are compared on their own by the writers.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import List, Tuple

import torch

from .replay_buffer import ReplayBufferError, read_metadata

__all__ = ["SAMPLE_SIZE", "fingerprinted_tensors", "weights_fingerprint", "weights_dtype", "weights_identity",
           "checkpoint_identity", "check_resume_weights"]

# Elements sampled per tensor: 4096 make a missed fine-tune (which changes nearly every element of the
# tensors it trains) impossible in practice, at a cost of ~1.2M gathered elements for an 8B model.
SAMPLE_SIZE = 4096
_INVERSE_GOLDEN_RATIO = (math.sqrt(5.0) - 1.0) / 2.0
_WEIGHTS_KEYS = ("weights_fingerprint", "weights_dtype")  # the settings entries weights_identity() makes


def fingerprinted_tensors(model: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs the fingerprint covers: every parameter, then every persistent buffer
    (the rest of the state dict), each shared (tied) tensor once, in registration order."""
    tensors = [(name, param) for name, param in model.named_parameters()]
    for module_name, module in model.named_modules():
        # Non-persistent buffers (rotary inv_freq, causal masks) are rebuilt from the config on every
        # load, never read from a checkpoint: they are not weights.
        transient = getattr(module, "_non_persistent_buffers_set", set())
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in transient:
                tensors.append((f"{module_name}.{name}" if module_name else name, buffer))
    seen, unique = set(), []
    for name, tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique.append((name, tensor))
    return unique


def _sample_stride(numel: int) -> int:
    stride = max(1, round(numel * _INVERSE_GOLDEN_RATIO))
    while math.gcd(stride, numel) != 1:
        stride += 1
    return stride


def _sample_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bits of the sampled elements of ``tensor`` as a uint8 tensor on its device."""
    data = tensor.detach()
    numel = data.numel()
    if numel <= SAMPLE_SIZE:
        sample = data.reshape(-1)  # small: a copy of a non-contiguous one costs nothing
    else:
        flat_index = torch.arange(SAMPLE_SIZE, device=data.device, dtype=torch.int64) * _sample_stride(numel) % numel
        # Indexing by coordinates reads only the sampled elements, contiguous or not (no reshape copy).
        sample = data[torch.unravel_index(flat_index, data.shape)]
    if sample.dtype == torch.bool:
        sample = sample.to(torch.uint8)
    return sample.contiguous().view(torch.uint8).reshape(-1)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and sampled element bits of ``model``'s weights (see the
    module docstring for what it catches). One device-to-host transfer; no host sync per tensor."""
    header = hashlib.sha256()
    samples = []
    target_device = None
    for name, tensor in fingerprinted_tensors(model):
        if tensor.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device (offloaded or not loaded): the weights fingerprint that guards a "
                "resumed run needs every weight materialized on a device"
            )
        header.update(f"{name}|{tuple(tensor.shape)}|{str(tensor.dtype).replace('torch.', '')}\n".encode())
        sample = _sample_bytes(tensor)
        if target_device is None:
            target_device = sample.device
        samples.append(sample.to(target_device, non_blocking=True))
    digest = hashlib.sha256(header.digest())
    if samples:
        digest.update(torch.cat(samples).cpu().numpy().tobytes())  # the one transfer
    return digest.hexdigest()


def weights_dtype(model: torch.nn.Module) -> str:
    """The dtypes of ``model``'s parameters, sorted and comma-separated (``"bfloat16"``, or
    ``"bfloat16,float32"`` for a model that keeps some weights in float32)."""
    names = {str(param.dtype).replace("torch.", "") for param in model.parameters()}
    return ",".join(sorted(names))


def weights_identity(model: torch.nn.Module) -> dict:
    """The settings entries that identify the weights of a teacher: ``weights_fingerprint`` and
    ``weights_dtype`` (the fingerprint covers the dtype too; the dtype is there to be read)."""
    return dict(zip(_WEIGHTS_KEYS, (weights_fingerprint(model), weights_dtype(model))))


WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_FILE_CHUNK_BYTES = 16


def checkpoint_identity(directory, dtype: str) -> dict:
    """``weights_fingerprint`` and ``weights_dtype`` of a model that is only a directory to us (the vLLM
    backend: the weights live in the engine's processes): the name and size of every weight file and
    ``SAMPLE_SIZE`` chunks of 16 bytes at evenly spread offsets of each, read without loading the file.
    It catches what the in-memory fingerprint catches (retrained, re-initialized or fine-tuned weights
    rewrite nearly every byte), but it is a fingerprint of the files, not of the tensors, so the two kinds
    are never equal: a directory resumes only with the backend that started it (the settings name it).
    ``dtype``: the dtype the engine loads the weights in."""
    directory = os.fspath(directory)
    files = sorted(name for name in os.listdir(directory) if name.endswith(WEIGHT_FILE_SUFFIXES)
                   and os.path.isfile(os.path.join(directory, name)))
    if not files:
        raise ReplayBufferError(f"model directory {directory} holds no weight file ({', '.join(WEIGHT_FILE_SUFFIXES)})")
    digest = hashlib.sha256(b"selfreplay-fast/checkpoint-files/1")
    for name in files:
        path = os.path.join(directory, name)
        size = os.path.getsize(path)
        digest.update(f"{name}:{size}".encode())
        with open(path, "rb") as handle:
            positions = max(1, min(SAMPLE_SIZE, size // _FILE_CHUNK_BYTES))
            for i in range(positions):
                handle.seek((i * size) // positions)
                digest.update(handle.read(_FILE_CHUNK_BYTES))
    return {"weights_fingerprint": "files:" + digest.hexdigest(), "weights_dtype": str(dtype)}


def check_resume_weights(out_dir, settings_key: str, settings: dict, *, producer: str) -> None:
    """Refuse to resume a buffer in ``out_dir`` that other weights than ``settings``' wrote.

    Only reads ``metadata.json`` (no shard), so a resume with the wrong model fails before any costly
    work. Where every other setting matches, raises :class:`ReplayBufferError` (one line) when the
    recorded ``weights_fingerprint`` or ``weights_dtype`` differs from ``settings``', or when the buffer
    records none (written before fingerprints existed: the weights cannot be checked, and a mixed buffer
    cannot be told apart afterwards). Anything else (no buffer yet, other settings, another producer's
    buffer, a file that is not a buffer, a bad ``out_dir``) is left to ``ShardedBufferWriter``, which
    reports it, still before reading a shard.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        return
    out_dir = os.fspath(out_dir)
    try:
        existing = read_metadata(out_dir)
    except (ReplayBufferError, OSError):
        return
    previous = existing.get(settings_key) if isinstance(existing, dict) else None
    if not isinstance(previous, dict):
        return
    if any(previous.get(key) != settings.get(key) for key in set(previous) | set(settings) if key not in _WEIGHTS_KEYS):
        return  # another model or other settings: the writer names those, which say more than the weights
    if "weights_fingerprint" not in previous:
        raise ReplayBufferError(
            f"out_dir {out_dir} holds a buffer of {producer} that records no weights_fingerprint (it was written "
            "before selfreplay-fast fingerprinted the teacher's weights), so resuming it cannot check that the model "
            "is the one that generated its shards; use a fresh directory (the buffer itself still loads)"
        )
    differing = [key for key in _WEIGHTS_KEYS if previous.get(key) != settings.get(key)]
    if differing:
        detail = ", ".join(f"{key}: {previous.get(key)!r} there, {settings.get(key)!r} now" for key in differing)
        raise ReplayBufferError(
            f"out_dir {out_dir} ({detail}): the model's weights differ from those that generated the existing "
            f"shards, and resuming would mix two teachers in one buffer; rerun {producer} with the original "
            "weights and dtype to resume, or use a fresh directory"
        )
