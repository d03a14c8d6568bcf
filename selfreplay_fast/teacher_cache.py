"""Teacher caches for text the model did not generate: real replay data, or the fine-tuning data itself.

``build_teacher_cache`` runs the frozen model over given token sequences and records, at every position,
the top-k ids and log-probabilities of its next-token distribution and the log of the remaining mass
(``linear_topk_logprobs``: chunked over tokens, so no [tokens, V] logits tensor ever exists). It writes
the replay-buffer format of ``generate_replay`` (replay_buffer.py), shard by shard, so a long corpus run
that is interrupted resumes after its last complete shard. ``backend="vllm"`` computes the same cache
through a vLLM engine's ``prompt_logprobs`` (teacher_cache_vllm.py); the argument checks, the row layout,
the metadata and the shard loop here serve both.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ._inputs import check_temperature
from .fingerprint import check_resume_weights, weights_identity
from .model_info import model_config_hash, model_name
from .model_glue import lm_head_of
from .provenance import provenance
from .replay_buffer import FORMAT_NAME, FORMAT_VERSION, ReplayBuffer, ShardedBufferWriter
from .topk import linear_topk_logprobs

SETTINGS_KEY = "teacher_cache"


def _check_sequences(token_sequences, vocab_size: int) -> List[torch.Tensor]:
    if isinstance(token_sequences, (str, bytes)) or not isinstance(token_sequences, Sequence):
        raise TypeError("token_sequences must be a list of token-id lists (or 1-D integer tensors)")
    out = []
    for i, seq in enumerate(token_sequences):
        t = seq if isinstance(seq, torch.Tensor) else torch.as_tensor(seq)
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64) or t.numel() < 1:
            raise ValueError(f"token_sequences[{i}] must be a non-empty 1-D list of integer token ids")
        if int(t.min()) < 0 or int(t.max()) >= vocab_size:
            raise ValueError(f"token_sequences[{i}] holds token ids outside [0, {vocab_size}) (the model's vocabulary)")
        out.append(t.long())
    if not out:
        raise ValueError("token_sequences must hold at least one sequence")
    return out


def _digest(sequences: List[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in sequences:
        h.update(t.numpy().astype("<i8").tobytes())
        h.update(b"|")
    return h.hexdigest()


def cache_settings(identity: dict, config, vocab: int, k: int, temperature: float, sequences, shard_size: int,
                   pad_token_id: Optional[int], dtype_name: str) -> dict:
    """The settings a resumed corpus cache must match (both backends): the model's ``identity`` and the
    cache's arguments; ``pad_token_id`` None takes the config's, else 0."""
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
    return {
        **identity,
        "vocab_size": vocab,
        "k": k,
        "temperature": temperature,
        "num_sequences": len(sequences),
        "sequences_sha256": _digest(sequences),
        "shard_size": shard_size,
        "pad_token_id": pad_token_id,
        "logprob_dtype": dtype_name,
    }


def empty_shard_rows(sequences: List[torch.Tensor], k: int, pad_token_id: int) -> dict:
    """One shard in the replay-buffer layout, tokens filled in and no teacher yet: ``input_ids`` padded with
    ``pad_token_id``, ``lengths``, ``teacher_ids`` -1, ``teacher_logprobs`` 0, ``teacher_tail_logprob``
    -inf, ``sampled_logprobs`` 0. Row j of a sequence of n tokens predicts token j + 1: rows 0 .. n-2 get a
    teacher (:func:`teacher_row_mask`), row n-1 and the padding none."""
    num, length = len(sequences), max(len(s) for s in sequences)
    input_ids = torch.full((num, length), pad_token_id, dtype=torch.int64)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = s
    return {"input_ids": input_ids, "lengths": torch.tensor([len(s) for s in sequences], dtype=torch.int64),
            "teacher_ids": torch.full((num, length, k), -1, dtype=torch.int32),
            "teacher_logprobs": torch.zeros((num, length, k), dtype=torch.float32),
            "teacher_tail_logprob": torch.full((num, length), -math.inf, dtype=torch.float32),
            "sampled_logprobs": torch.zeros((num, length), dtype=torch.float32)}


def teacher_row_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """[len(lengths), length] bool: the rows that predict a next token within their sequence."""
    return torch.arange(length)[None, :] < (lengths[:, None] - 1)


@torch.inference_mode()
def _teacher_rows(base, weight, bias, sequences, k, temperature, batch_size, chunk_size, pad_token_id, bar):
    """Tensors of one shard in the replay-buffer layout."""
    device = weight.device
    out = empty_shard_rows(sequences, k, pad_token_id)
    input_ids, lengths = out["input_ids"], out["lengths"]
    teacher_ids, teacher_logprobs = out["teacher_ids"], out["teacher_logprobs"]
    tail, next_logprob = out["teacher_tail_logprob"], out["sampled_logprobs"]
    num, length = input_ids.shape
    head_bias = bias / temperature if bias is not None else None
    for start in range(0, num, batch_size):
        rows = slice(start, min(start + batch_size, num))
        ids = input_ids[rows].to(device)
        attention = (torch.arange(length)[None, :] < lengths[rows, None]).long().to(device)
        hidden = base(input_ids=ids, attention_mask=attention).last_hidden_state
        predicts = teacher_row_mask(lengths[rows], length).to(device)
        h = hidden[predicts]
        if h.shape[0]:
            h = h / temperature
            top_ids, top_lp, top_tail = linear_topk_logprobs(h, weight, k, bias=head_bias, chunk_size=chunk_size)
            where = predicts.cpu()
            teacher_ids[rows][where] = top_ids.cpu()
            teacher_logprobs[rows][where] = top_lp.cpu()
            tail[rows][where] = top_tail.cpu()
            # The actual next token's log-prob, from two logits only (no [N, V]): its logit minus the
            # log-normalizer, which the best slot gives as its logit minus its log-prob.
            following = ids[:, 1:][predicts[:, :-1]]
            lse = _logits_at(h, weight, head_bias, top_ids[:, 0].long()) - top_lp[:, 0]
            next_logprob[rows][where] = (_logits_at(h, weight, head_bias, following) - lse).cpu()
        bar.update(rows.stop - rows.start)
    return out


def _logits_at(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor):
    """Logits ``hidden[i] . weight[ids[i]] (+ bias[ids[i]])`` in float32, one vocabulary row per position."""
    logits = (hidden.float() * weight[ids].float()).sum(-1)
    return logits + bias[ids].float() if bias is not None else logits


def check_cache_arguments(k, batch_size, shard_size, temperature, out_dir, logprob_dtype, vocab: int):
    """The arguments both backends check alike, normalized: (temperature, out_dir as str, dtype name)."""
    for name, value, low in (("k", k, 1), ("batch_size", batch_size, 1), ("shard_size", shard_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if k > vocab:
        raise ValueError(f"k must be <= the vocabulary size {vocab}, got {k}")
    temperature = check_temperature(temperature)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    if logprob_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"logprob_dtype must be torch.float16 or torch.float32, got {logprob_dtype!r}")
    return temperature, os.fspath(out_dir), str(logprob_dtype).replace("torch.", "")


def cache_metadata(settings: dict, backend: str) -> dict:
    """metadata.json of a teacher cache (both backends): the fields a reader checks, provenance, the settings."""
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "vocab_size": settings["vocab_size"],
        "k": settings["k"], "mode": "tail", "pad_token_id": settings["pad_token_id"],
        "logprob_dtype": settings["logprob_dtype"], "model_name": settings["model_name"],
        "config_hash": settings["config_hash"], "weights_fingerprint": settings["weights_fingerprint"],
        "weights_dtype": settings["weights_dtype"], "temperature": settings["temperature"], "source": "corpus",
        # The next token's log-prob at every row (the field generated buffers have), but the text is a corpus,
        # not a sample of the model: no unbiased sequence-level KL estimate from it.
        "sampled_logprobs": True, "sampled_from_teacher": False, "provenance": provenance(backend),
        SETTINGS_KEY: settings,
    }


def write_teacher_cache(out_dir: str, settings: dict, metadata: dict, sequences, shard_rows, *, progress: bool,
                        logprob_dtype, desc: str = "teacher cache", rank: int = 0,
                        world_size: int = 1) -> Optional[ReplayBuffer]:
    """The shard loop of both backends: resume after the last complete shard of ``out_dir``, then
    ``shard_rows(shard_sequences, bar)`` (the layout of :func:`_teacher_rows`) for each missing shard,
    written as soon as it is computed. Returns the complete buffer; with ``world_size > 1`` this process
    is rank ``rank`` of a data-parallel run (generation/shard_schedule.py: it computes shards ``rank``,
    ``rank + world_size``, ...; generation/parallel_writer.py: how the ranks share ``out_dir``) and
    returns None (the buffer is complete once every rank has returned)."""
    from .generation.shard_schedule import progress_span

    shard_size, num_sequences = settings["shard_size"], len(sequences)
    check_resume_weights(out_dir, SETTINGS_KEY, settings, producer="build_teacher_cache")  # before any shard is read
    num_shards = -(-num_sequences // shard_size)
    if world_size > 1:
        from .generation.parallel_writer import ParallelShardWriter

        writer = ParallelShardWriter(out_dir, SETTINGS_KEY, settings, metadata, shard_size, num_shards,
                                     num_sequences=num_sequences, rank=rank, world_size=world_size,
                                     producer="build_teacher_cache")
    else:
        writer = ShardedBufferWriter(out_dir, SETTINGS_KEY, settings, metadata, shard_size, num_shards,
                                     producer="build_teacher_cache")
    done, total = progress_span(writer.todo_shards, num_sequences, shard_size, rank, world_size)
    with writer, tqdm(total=total, initial=done, desc=desc, unit="seq", disable=not progress or rank != 0,
                      dynamic_ncols=True) as bar:  # the writer holds out_dir's lock (shared among ranks)
        for index in list(writer.todo_shards):
            if not writer.claim(index):
                continue  # written meanwhile, or being written by another process
            tensors = shard_rows(sequences[index * shard_size : (index + 1) * shard_size], bar)
            for name in ("teacher_logprobs", "teacher_tail_logprob"):
                tensors[name] = tensors[name].to(logprob_dtype)
            writer.write_shard(tensors)  # the shard, then metadata.json listing it
    if world_size > 1:
        return None
    return ReplayBuffer.load(out_dir, expected_vocab_size=settings["vocab_size"])


def build_teacher_cache(
    model,
    token_sequences,
    k: int,
    out_dir,
    *,
    batch_size: int = 8,
    shard_size: int = 1024,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    progress: bool = True,
    logprob_dtype=torch.float16,
    backend: str = "native",
    vllm_engine_args: Optional[dict] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> Optional[ReplayBuffer]:
    """Record ``model``'s top-k teacher at every position of ``token_sequences`` into ``out_dir``.

    Args:
        model: a Hugging Face causal LM with a linear lm_head, on its device (run under inference mode);
            with ``backend="vllm"``, a local model directory or a ``vllm.LLM``.
        token_sequences: list of token-id lists (or 1-D integer tensors), each at least one token.
        k: teacher slots per position, 1 <= k <= vocabulary size.
        out_dir: directory of the buffer; a rerun with the same model, sequences and settings resumes
            after the last complete shard; a directory holding another buffer is refused, and so is one
            that other weights (another fingerprint or dtype, see fingerprint.py) began.
        batch_size: sequences per forward pass (vLLM: requests per engine call). shard_size: sequences per shard file.
        temperature: the teacher is softmax(logits / temperature) (vLLM: 1.0 only, see teacher_cache_vllm.py).
        chunk_size: positions per logits chunk of ``linear_topk_logprobs`` (default: its own; native only).
        pad_token_id: padding id in ``input_ids`` (default: the model's, else 0).
        logprob_dtype: torch.float16 (default; see docs/design.md for its effect on the loss) or torch.float32,
            for the stored teacher log-probs.
        backend: ``"native"`` (this module: the model's forward pass and ``linear_topk_logprobs``) or
            ``"vllm"`` (the engine's ``prompt_logprobs``: teacher_cache_vllm.py); the buffers mean the same.
        vllm_engine_args: with ``backend="vllm"`` and a model directory, extra ``vllm.LLM`` arguments.
        rank / world_size: data parallel: ``world_size`` processes fill ``out_dir``, this one computing the
            shards of ``rank`` (default: ``RANK``/``WORLD_SIZE`` from the environment, as torchrun sets them;
            else one process), as ``generate_replay`` does (generation/shard_schedule.py). A shard depends
            on its sequences alone, so the buffer equals a single-process run's, shard for shard; only rank 0
            shows a progress bar.
    Returns the complete ReplayBuffer (mode "tail"), as ``ReplayBuffer.load(out_dir)`` would; None with
    ``world_size > 1`` (open ``out_dir`` once every rank has returned).
    """
    from .generation.shard_schedule import resolve_rank
    from .generation.vllm_backend import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    rank, world_size = resolve_rank(rank, world_size, out_dir=out_dir)
    if backend == "vllm":
        if chunk_size is not None:
            raise ValueError("chunk_size is not supported by backend='vllm' (the engine computes the logits); leave it unset")
        from .teacher_cache_vllm import build_teacher_cache_vllm

        return build_teacher_cache_vllm(model, token_sequences, k, out_dir, batch_size=batch_size, shard_size=shard_size,
                                        temperature=temperature, pad_token_id=pad_token_id, progress=progress,
                                        logprob_dtype=logprob_dtype, vllm_engine_args=vllm_engine_args, rank=rank,
                                        world_size=world_size)
    if vllm_engine_args is not None:
        raise ValueError("vllm_engine_args only applies to backend='vllm'")
    base, weight, bias = lm_head_of(model)
    vocab = weight.shape[0]
    temperature, out_dir, dtype_name = check_cache_arguments(k, batch_size, shard_size, temperature, out_dir,
                                                             logprob_dtype, vocab)
    sequences = _check_sequences(token_sequences, vocab)
    identity = {
        "model_name": model_name(model),
        "config_hash": model_config_hash(model),
        **weights_identity(model),  # a checkpoint retrained in place keeps its name and config
    }
    settings = cache_settings(identity, model.config, vocab, k, temperature, sequences, shard_size, pad_token_id,
                              dtype_name)
    pad_token_id = settings["pad_token_id"]

    def shard_rows(shard, bar):
        return _teacher_rows(base, weight, bias, shard, k, temperature, batch_size, chunk_size, pad_token_id, bar)

    return write_teacher_cache(out_dir, settings, cache_metadata(settings, "corpus"), sequences, shard_rows,
                               progress=progress, logprob_dtype=logprob_dtype, rank=rank, world_size=world_size)
