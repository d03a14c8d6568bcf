"""Shards of a generated buffer, shared by both backends: the seed each shard samples with, the settings and
metadata a buffer directory holds, the resume step (open the directory, check the weights, load what is there) and
the assembly of one shard's sequences into a ReplayBuffer."""

from __future__ import annotations

import hashlib
import os

import torch

from ..fingerprint import check_resume_weights
from ..provenance import provenance
from ..replay_buffer import FORMAT_NAME, FORMAT_VERSION, ReplayBuffer, ShardedBufferWriter


def shard_seed(seed: int, shard_index: int) -> int:
    """Shard ``shard_index``'s 63-bit sampling seed: its content depends on ``(seed, shard_index)`` only."""
    digest = hashlib.sha256(f"selfreplay-fast:{seed}:{shard_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generation_settings(identity: dict, *, vocab_size: int, k: int, temperature: float, seed: int, num_sequences: int,
                        max_new_tokens: int, batch_size: int, shard_size: int, prompts_digest: str, num_prompts: int,
                        eos_ids, pad_token_id, logprob_dtype, dialogue=None, sampled_draws=None, drafter=None,
                        num_draft_tokens=None) -> dict:
    """The settings of a generated buffer (both backends): what a resume compares, and the ``"generation"``
    field of its metadata. ``identity`` names the model: ``model_name``, ``config_hash``, the weights'
    fingerprint and dtype (a checkpoint retrained in place keeps its name and config), and ``backend`` for
    vLLM. ``pad_token_id`` None pads with the first EOS id (or 0). ``sampled_draws`` and the drafter are
the native loop's only (None: a top-k teacher, no speculative decoding). The draft model is left out: exact
    speculative sampling makes the output follow the target's distribution whatever the draft, so another
    draft cannot mix two teachers; only the drafter's kind is recorded."""
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    settings = {
        **identity,
        "vocab_size": vocab_size,
        "k": k,
        "mode": "tail" if sampled_draws is None else "sampled",
        "sampled_draws": sampled_draws,
        "temperature": temperature,
        "seed": seed,
        "num_sequences": num_sequences,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "prompts_sha256": prompts_digest,
        "num_prompts": num_prompts,
        "eos_token_ids": eos_ids,
        "pad_token_id": int(pad_token_id),
        "drafter": drafter.describe() if drafter is not None else None,
        "num_draft_tokens": num_draft_tokens if drafter is not None else None,
        "logprob_dtype": str(logprob_dtype).replace("torch.", ""),
    }
    if dialogue is not None:
        settings["self_dialogue"] = dialogue.describe(max_new_tokens)
    return settings


def buffer_metadata(settings: dict, tokenizer=None) -> dict:
    """The metadata.json fields of a generated buffer (both backends): its format, the fields a reader
    checks, its provenance (software versions, backend, tokenizer; not compared on resume) and the run's
    ``settings`` (what a resume compares) under ``"generation"``."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **{key: settings[key] for key in ("vocab_size", "k", "mode", "pad_token_id", "logprob_dtype", "model_name",
                                          "config_hash", "weights_fingerprint", "weights_dtype", "temperature", "seed")},
        # Every sequence was sampled from the teacher at `temperature`, its tokens' log-probs recorded: what
        # the sequence-level KL estimate needs (forgetting.py).
        "sampled_logprobs": True,
        "sampled_from_teacher": True,
        "provenance": provenance(settings.get("backend", "native"), tokenizer),
        "generation": settings,
    }


def open_resumable_writer(out_dir, settings: dict, num_shards: int, *, keep_in_memory: bool, tokenizer=None,
                          rank: int = 0, world_size: int = 1):
    """(writer or None, the in-memory parts of the shards already there): the resume step of both backends.

    Checks the weights first (metadata.json only), then opens the buffer directory through
    ``ShardedBufferWriter`` (which verifies the shards listed and holds the writer lock until closed) and
    claims an empty directory with a progress ``metadata.json`` before the first shard. With
    ``world_size > 1`` the writer is rank ``rank``'s ``ParallelShardWriter`` (parallel_writer.py) and
    nothing is kept in memory."""
    if out_dir is None:
        return None, []
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path or None, got {type(out_dir).__name__}")
    # Before the writer reads and verifies the existing shards, and before the model runs at all.
    check_resume_weights(out_dir, "generation", settings, producer="generate_replay")
    if world_size > 1:
        from .parallel_writer import ParallelShardWriter

        writer = ParallelShardWriter(out_dir, "generation", settings, buffer_metadata(settings, tokenizer),
                                     settings["shard_size"], num_shards, num_sequences=settings["num_sequences"],
                                     rank=rank, world_size=world_size, producer="generate_replay")
        return writer, []
    writer = ShardedBufferWriter(out_dir, "generation", settings, buffer_metadata(settings, tokenizer), settings["shard_size"],
                                 num_shards, producer="generate_replay", keep_done=keep_in_memory)
    parts = [ReplayBuffer.from_tensors(t, vocab_size=settings["vocab_size"], mode=settings["mode"],
                                       pad_token_id=settings["pad_token_id"]) for t in writer.done_tensors]
    writer.done_tensors = []  # held by parts now
    if not writer.entries:
        writer.write_progress()  # claim the directory before the first shard
    return writer, parts


def assemble_shard(results, vocab_size, k, mode, pad_token_id, logprob_dtype) -> ReplayBuffer:
    """Pad one shard's per-sequence results (tokens, teacher ids, log-probs, tail, sampled log-probs) into a
    ReplayBuffer."""
    lengths = torch.tensor([r[0].numel() for r in results], dtype=torch.long)
    width = int(lengths.max())
    S = len(results)
    input_ids = torch.full((S, width), pad_token_id, dtype=torch.long)
    teacher_ids = torch.full((S, width, k), -1, dtype=torch.int32)
    teacher_lp = torch.zeros(S, width, k, dtype=torch.float32)
    tail = torch.full((S, width), float("-inf"), dtype=torch.float32)
    sampled = torch.zeros(S, width, dtype=torch.float32)
    for i, (tok, ids, lp, tl, slp) in enumerate(results):
        n = tok.numel()
        input_ids[i, :n] = tok
        teacher_ids[i, :n] = ids
        teacher_lp[i, :n] = lp
        tail[i, :n] = tl
        sampled[i, :n] = slp
    return ReplayBuffer(input_ids, lengths, teacher_ids, teacher_lp.to(logprob_dtype), tail.to(logprob_dtype),
                        vocab_size=vocab_size, mode=mode, pad_token_id=pad_token_id, sampled_logprobs=sampled)
