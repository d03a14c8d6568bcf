"""Replay generation: sample from the frozen model and record its own top-k teacher on the way.

``generate_replay`` runs its own decode loop over a Hugging Face causal LM (never ``model.generate``,
so no generation_config default such as ``top_k=50`` can truncate the distribution):

* **Batched with continuous batching.** ``batch_size`` slots decode together; when a sequence ends
  (EOS or ``max_new_tokens``) its slot is refilled with the next sequence at once, so the batch stays
  full. Every slot keeps its own positions inside one shared ``DynamicCache``: a per-slot validity mask
  over cache columns says which columns belong to the slot's current sequence, and a custom 4D
  attention mask lets each token see exactly those columns (plus the earlier tokens of its own block).
  Columns of finished sequences and rejected draft tokens simply become invalid; the cache is
  compacted (valid columns of each slot gathered to the right) whenever it has grown to twice the
  longest live sequence, so memory stays bounded.
* **Exact sampling** from ``softmax(logits / temperature)`` over the full vocabulary, and at every
  sampled position the top-k ids/log-probs of *that* distribution plus the log of the remaining mass,
  computed stably as ``logsumexp(non-top-k logits) - logsumexp(all logits)``.
* **Speculative decoding** (``draft_model=`` or ``drafter=NGramDrafter()``): batched, each slot accepts
  its own number of draft tokens. Acceptance is standard rejection sampling (accept with probability
  ``min(1, p/q)``, on rejection resample from ``normalize(max(p - q, 0))``, a bonus token when all are
  accepted), so the output follows the target distribution exactly; the teacher rows come from the
  target's verification logits.
* **Sharded, resumable output.** Sequences are generated shard by shard; shard ``s`` draws all its
  randomness from a ``torch.Generator`` seeded from ``(seed, s)`` and starts from an empty batch, so
  its content does not depend on earlier shards. With ``out_dir`` each finished shard is written
  atomically and listed in ``metadata.json``; rerunning with the same arguments skips the listed
  shards and produces exactly what an uninterrupted run produces (same device and software assumed:
  kernels differ between CPU and GPU). The settings include a fingerprint of the model's weights and
  their dtype (fingerprint.py), checked before anything else: a rerun with other weights under the same
  name and config (a checkpoint retrained in place, another dtype) is refused instead of completing the
  buffer with a second teacher.

The parts live in their own modules: ``slot_cache`` (the per-slot cache and its check),
``sampling`` (the sampler and the teacher rows), ``drafting`` (the drafters), ``decode_engine`` (the
decode loop of one shard) and ``model_info``; this module checks the arguments, resumes and writes.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import time
from typing import Callable, List, Optional, Sequence, Union

import torch

from ._inputs import check_temperature
from .decode_engine import GenerationStats, ShardEngine
from .drafting import DecodeState, Drafter, ModelDrafter, NGramDrafter  # noqa: F401  (DecodeState: for drafters)
from .fingerprint import check_resume_weights, weights_identity
from .provenance import provenance
from .model_info import model_config_hash, model_device_dtype, model_name, output_vocab_size
from .sampling import TeacherRecorder, sample_categorical  # noqa: F401  (sample_categorical: re-exported)
from .slot_cache import check_slot_attention
from .replay_buffer import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOGPROB_DTYPES,
    ReplayBuffer,
    ShardedBufferWriter,
)

__all__ = [
    "generate_replay",
    "GenerationStats",
    "Drafter",
    "ModelDrafter",
    "NGramDrafter",
    "load_model_for_generation",
    "pick_attn_implementation",
    "model_config_hash",
]


# --------------------------------------------------------------------------------------------------
# Loading a model; token ids and shard seeds
# --------------------------------------------------------------------------------------------------


def pick_attn_implementation(device) -> str:
    """``"flash_attention_2"`` when flash_attn imports and ``device`` is CUDA, else ``"sdpa"``."""
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401
        except Exception:  # not installed, or built for another torch/CUDA
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


def load_model_for_generation(path: str, *, device="cpu", dtype=None, attn_implementation: Optional[str] = None):
    """Load a frozen causal LM for :func:`generate_replay`: eval mode, on ``device``, with flash
    attention 2 where available (CUDA and ``flash_attn`` importable), else PyTorch SDPA.

    ``dtype`` defaults to bfloat16 on CUDA and float32 on the CPU.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = attn_implementation or pick_attn_implementation(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def _token_id_list(value) -> List[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _first_id(*candidates) -> Optional[int]:
    for value in candidates:
        ids = _token_id_list(value)
        if ids:
            return ids[0]
    return None


def _shard_seed(seed: int, shard_index: int) -> int:
    digest = hashlib.sha256(f"selfreplay-fast:{seed}:{shard_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _normalize_prompts(prompts, tokenizer, vocab_size) -> List[List[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be None or a list of strings or of token-id lists")
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt (or be None for BOS-only generation)")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"prompts[{i}] is a string: pass tokenizer= to encode string prompts")
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist()
        elif isinstance(prompt, Sequence):
            ids = list(prompt)
        else:
            raise TypeError(f"prompts[{i}] must be a string or a list of token ids, got {type(prompt).__name__}")
        if len(ids) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size:
                raise ValueError(f"prompts[{i}] holds token {t!r}, outside the vocabulary [0, {vocab_size})")
        out.append([int(t) for t in ids])
    return out


class RecentRate:
    """Tokens per second over the last ``interval`` seconds or more (not since the start: a progress bar
    showing the whole run's mean hides a slowdown). ``update`` returns a new rate at most once per interval."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self._since = None  # (time, tokens) where the current window started
        self._tokens = 0

    def update(self, num_tokens: int, now: float) -> Optional[float]:
        self._tokens += num_tokens
        if self._since is None:
            self._since = (now, self._tokens - num_tokens)
            return None
        start, tokens_then = self._since
        if now - start < self.interval:
            return None
        self._since = (now, self._tokens)
        return (self._tokens - tokens_then) / (now - start)


def resolve_special_ids(config, generation_config, tokenizer, vocab_size, *, bos_token_id, eos_token_id, need_bos):
    """(BOS id or None, EOS ids): the explicit arguments, else the generation config, config and tokenizer's
    (EOS) or the tokenizer, config and generation config's (BOS); both backends resolve them here."""
    eos_ids = _token_id_list(eos_token_id)
    if eos_token_id is None:
        eos_ids = (_token_id_list(getattr(generation_config, "eos_token_id", None))
                   or _token_id_list(getattr(config, "eos_token_id", None))
                   or _token_id_list(getattr(tokenizer, "eos_token_id", None)))
    for t in eos_ids:
        if not 0 <= t < vocab_size:
            raise ValueError(f"eos_token_id {t} is outside the vocabulary [0, {vocab_size}); pass eos_token_id= explicitly")
    if not need_bos:
        return None, eos_ids
    bos = bos_token_id if bos_token_id is not None else _first_id(
        getattr(tokenizer, "bos_token_id", None), getattr(config, "bos_token_id", None),
        getattr(generation_config, "bos_token_id", None))
    if bos is None:
        raise ValueError(
            "the model has no BOS token (config, generation_config and tokenizer define none) and prompts is None: "
            "pass prompts= (strings or token-id lists) or bos_token_id="
        )
    if isinstance(bos, bool) or not isinstance(bos, numbers.Integral) or not 0 <= bos < vocab_size:
        raise ValueError(f"bos_token_id {bos!r} is outside the vocabulary [0, {vocab_size})")
    return int(bos), eos_ids


def replay_prompts(prompts, tokenizer, vocab_size: int, bos: Optional[int]):
    """(prompt token-id lists, their sha256 for the resume settings): BOS alone when ``prompts`` is None."""
    if prompts is None:
        return [[bos]], hashlib.sha256(f"bos:{bos}".encode()).hexdigest()
    prompt_list = _normalize_prompts(prompts, tokenizer, vocab_size)
    return prompt_list, hashlib.sha256(json.dumps(prompt_list).encode()).hexdigest()


def check_max_length(prompt_list, max_new_tokens: int, config) -> int:
    """The longest sequence a run can make, refused beyond the model's ``max_position_embeddings``."""
    max_len = max(len(p) for p in prompt_list) + max_new_tokens
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_len > max_positions:
        raise ValueError(
            f"the longest prompt plus max_new_tokens is {max_len} tokens, beyond the model's "
            f"max_position_embeddings = {max_positions}"
        )
    return max_len


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


def open_resumable_writer(out_dir, settings: dict, num_shards: int, *, keep_in_memory: bool, tokenizer=None):
    """(writer or None, the in-memory parts of the shards already there): the resume step of both backends.

    Checks the weights first (metadata.json only), then opens the buffer directory through
    ``ShardedBufferWriter`` (which verifies the shards listed and holds the writer lock until closed) and
    claims an empty directory with a progress ``metadata.json`` before the first shard."""
    if out_dir is None:
        return None, []
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path or None, got {type(out_dir).__name__}")
    # Before the writer reads and verifies the existing shards, and before the model runs at all.
    check_resume_weights(out_dir, "generation", settings, producer="generate_replay")
    writer = ShardedBufferWriter(out_dir, "generation", settings, buffer_metadata(settings, tokenizer), settings["shard_size"],
                                 num_shards, producer="generate_replay", keep_done=keep_in_memory)
    parts = [ReplayBuffer.from_tensors(t, vocab_size=settings["vocab_size"], mode=settings["mode"],
                                       pad_token_id=settings["pad_token_id"]) for t in writer.done_tensors]
    writer.done_tensors = []  # held by parts now
    if not writer.entries:
        writer.write_progress()  # claim the directory before the first shard
    return writer, parts


def generate_replay(
    model,
    *,
    num_sequences: int,
    max_new_tokens: int,
    top_k: int = 64,
    batch_size: int = 64,
    temperature: float = 1.0,
    prompts=None,
    draft_model=None,
    num_draft_tokens: int = 4,
    seed: int = 0,
    out_dir: Optional[str] = None,
    progress: bool = True,
    shard_size: int = 1024,
    tokenizer=None,
    sampled_draws: Optional[int] = None,
    drafter: Union[Drafter, str, None] = None,
    logprob_dtype=torch.float16,
    bos_token_id: Optional[int] = None,
    eos_token_id=None,
    pad_token_id: Optional[int] = None,
    on_shard_written: Optional[Callable[[int, str], None]] = None,
    check_every: Optional[int] = None,
    keep_in_memory: bool = True,
    backend: str = "native",
    vllm_engine_args: Optional[dict] = None,
) -> Optional[ReplayBuffer]:
    """Sample ``num_sequences`` sequences from ``model`` and record its teacher at every sampled position.

    Args:
        model: a Hugging Face causal LM (``AutoModelForCausalLM``), already on its device. It is run in
            eval mode under ``torch.inference_mode`` (its training flag is restored afterwards).
        num_sequences: how many sequences to generate.
        max_new_tokens: generated tokens per sequence at most (a sequence also ends at EOS).
        top_k: teacher slots recorded per position (``k <= vocab size``).
        batch_size: decode slots; finished sequences are replaced at once (continuous batching).
        temperature: sample from (and record) ``softmax(logits / temperature)``; must be > 0.
        prompts: None (every sequence is BOS alone), or a list of strings (needs ``tokenizer``) or of
            token-id lists; sequence ``i`` uses ``prompts[i % len(prompts)]``.
        draft_model: a smaller causal LM with the same vocabulary, for speculative decoding.
        num_draft_tokens: draft tokens per speculative step.
        seed: base seed; shard ``s`` samples with a generator seeded from ``(seed, s)``.
        out_dir: directory to write the sharded buffer to; a rerun resumes after the last complete shard,
            provided the model's weights (their fingerprint and dtype) and every setting are the same.
        progress: show a tqdm bar (sequences, tokens/s, acceptance rate).
        shard_size: sequences per shard (the unit of resumption).
        tokenizer: optional; used for string prompts and for BOS/EOS ids when the config lacks them.
        sampled_draws: record a "sampled" teacher instead of top-k: N draws with replacement from the
            distribution, stored as unique ids and log frequencies (the ``min(top_k, N)`` most frequent).
        drafter: a :class:`Drafter` (e.g. ``NGramDrafter()``) or ``"ngram"``, for speculative decoding
            without a second model. Mutually exclusive with ``draft_model``.
        logprob_dtype: torch.float16 (default: half the bytes; its effect on the replay loss is < 1e-3
            relative, docs/design.md) or torch.float32 for the stored teacher log-probs (the sampled
            tokens' log-probs are always float32).
        bos_token_id / eos_token_id / pad_token_id: override the ids found in the config/tokenizer;
            ``eos_token_id`` may be a list. Padding defaults to EOS (or 0).
        on_shard_written: called as ``fn(shard_index, out_dir)`` after each shard is durably written.
        check_every: decode steps between host checks for finished sequences (default 1 on the CPU,
            4 on accelerators, where each check is a device sync).
        keep_in_memory: return the whole buffer (default). With ``out_dir``, False keeps only the shard
            being generated in memory and returns None (for runs larger than RAM; load shards later,
            the counters of the run are in ``metadata.json`` under ``generation_stats``).
        backend: ``"native"`` (this module's decode loop) or ``"vllm"``: ``model`` is then a local model
            directory or a ``vllm.LLM``, and the buffer means the same (selfreplay_fast/vllm_backend.py;
            draft_model, drafter, sampled_draws and check_every are native only).
        vllm_engine_args: with ``backend="vllm"`` and a model directory, extra ``vllm.LLM`` arguments.

    Returns:
        The :class:`ReplayBuffer` of all ``num_sequences`` sequences (``buffer.generation_stats`` holds
        the counters of this call, including the speculative acceptance rate), or None when
        ``keep_in_memory=False``.
    """
    if backend != "native" or vllm_engine_args is not None:  # the vLLM backend refuses what it cannot honor
        arguments = dict(locals())  # every argument, by name (before the import adds a name)
        from .vllm_backend import generate_with_backend

        return generate_with_backend(arguments)
    # ---- argument checks ----
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face causal LM (torch.nn.Module with .config), got {type(model).__name__}")
    num_sequences = _check_positive_int("num_sequences", num_sequences)
    max_new_tokens = _check_positive_int("max_new_tokens", max_new_tokens)
    top_k = _check_positive_int("top_k", top_k)
    batch_size = _check_positive_int("batch_size", batch_size)
    shard_size = _check_positive_int("shard_size", shard_size)
    num_draft_tokens = _check_positive_int("num_draft_tokens", num_draft_tokens)
    temperature = check_temperature(temperature)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    if sampled_draws is not None:
        sampled_draws = _check_positive_int("sampled_draws", sampled_draws)
    if isinstance(logprob_dtype, str):
        if logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype must be one of {list(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
        logprob_dtype = LOGPROB_DTYPES[logprob_dtype]
    if logprob_dtype not in LOGPROB_DTYPES.values():
        raise ValueError(f"logprob_dtype must be torch.float32 or torch.float16, got {logprob_dtype!r}")
    if check_every is not None:
        check_every = _check_positive_int("check_every", check_every)
    if not keep_in_memory and out_dir is None:
        raise ValueError("keep_in_memory=False needs out_dir: without it the generated buffer would be lost")

    vocab_size = output_vocab_size(model)
    if top_k > vocab_size:
        raise ValueError(f"top_k = {top_k} exceeds the model's vocabulary size {vocab_size}")
    k = top_k if sampled_draws is None else min(top_k, sampled_draws)

    if draft_model is not None and drafter is not None:
        raise ValueError("pass either draft_model or drafter, not both")
    if draft_model is not None:
        if not isinstance(draft_model, torch.nn.Module) or not hasattr(draft_model, "config"):
            raise TypeError(f"draft_model must be a Hugging Face causal LM, got {type(draft_model).__name__}")
        draft_vocab = output_vocab_size(draft_model)
        if draft_vocab != vocab_size:
            raise ValueError(
                f"draft_model has a vocabulary of {draft_vocab} tokens but model has {vocab_size}: "
                "speculative decoding needs a draft model that shares the target's vocabulary"
            )
        if model_device_dtype(draft_model)[0] != model_device_dtype(model)[0]:
            raise ValueError("draft_model must be on the same device as model")
        drafter = ModelDrafter(draft_model)
    elif isinstance(drafter, str):
        if drafter != "ngram":
            raise ValueError(f"drafter must be a Drafter instance, 'ngram' or None, got {drafter!r}")
        drafter = NGramDrafter()
    elif drafter is not None and not isinstance(drafter, Drafter):
        raise TypeError(f"drafter must be a Drafter instance, 'ngram' or None, got {type(drafter).__name__}")

    config = model.config
    bos, eos_ids = resolve_special_ids(config, getattr(model, "generation_config", None), tokenizer, vocab_size,
                                       bos_token_id=bos_token_id, eos_token_id=eos_token_id, need_bos=prompts is None)
    prompt_list, prompts_digest = replay_prompts(prompts, tokenizer, vocab_size, bos)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    max_len = check_max_length(prompt_list, max_new_tokens, config)

    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" in layer_types and isinstance(window, int) and max_len > window:
        raise NotImplementedError(
            f"the model uses sliding-window attention (window {window}) and sequences can reach {max_len} tokens; "
            "generate_replay's slot cache supports full attention only (keep prompt + max_new_tokens <= the window)"
        )

    device, _ = model_device_dtype(model)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 4
    num_shards = -(-num_sequences // shard_size)

    settings = {
        "model_name": model_name(model),
        "config_hash": model_config_hash(model),
        # The weights themselves (a checkpoint retrained in place keeps its name and config) and their dtype.
        # The draft model is left out: exact speculative sampling makes the output follow the target's
        # distribution whatever the draft, so another draft cannot mix two teachers.
        **weights_identity(model),
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
        "num_prompts": len(prompt_list),
        "eos_token_ids": eos_ids,
        "pad_token_id": int(pad_token_id),
        "drafter": drafter.describe() if drafter is not None else None,
        "num_draft_tokens": num_draft_tokens if drafter is not None else None,
        "logprob_dtype": str(logprob_dtype).replace("torch.", ""),
    }

    # ---- resume ----
    writer, parts = open_resumable_writer(out_dir, settings, num_shards, keep_in_memory=keep_in_memory,
                                          tokenizer=tokenizer)
    if writer is not None:
        out_dir = writer.out_dir

    # ---- generation ----
    recorder = TeacherRecorder(k, sampled_draws)
    total_stats = GenerationStats()
    start_shard = writer.num_done_shards if writer is not None else 0
    done_sequences = writer.num_done_sequences if writer is not None else 0

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_sequences, initial=done_sequences, unit="seq", desc="generate_replay", dynamic_ncols=True)
    rate = RecentRate()

    def progress_update(num_finished, num_tokens, engine):
        tokens_per_second = rate.update(num_tokens, time.perf_counter())
        if bar is None:
            return
        bar.update(num_finished)
        if tokens_per_second is not None:
            postfix = {"tok/s": f"{tokens_per_second:.0f}"}
            if engine.drafter is not None and engine.stats.target_forwards:
                proposed = int(engine._proposed)
                if proposed:
                    postfix["accept"] = f"{int(engine._accepted) / proposed:.2f}"
            # Redrawn now: with long sequences no sequence may finish (and tqdm redraw) for minutes.
            bar.set_postfix(postfix, refresh=True)

    was_training = model.training
    draft_was_training = draft_model.training if draft_model is not None else False
    model.eval()
    if draft_model is not None:
        draft_model.eval()
    try:
        with torch.inference_mode():
            if start_shard < num_shards:
                check_slot_attention(model)
                if draft_model is not None:
                    check_slot_attention(draft_model, name="draft_model")
            for shard in range(start_shard, num_shards):
                first = shard * shard_size
                count = min(shard_size, num_sequences - first)
                shard_prompts = [prompt_list[(first + i) % len(prompt_list)] for i in range(count)]
                generator = torch.Generator(device=device).manual_seed(_shard_seed(seed, shard))
                engine = ShardEngine(
                    model=model, prompts=shard_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    temperature=temperature, recorder=recorder, eos_ids=eos_ids, vocab_size=vocab_size,
                    drafter=drafter, num_draft_tokens=num_draft_tokens, generator=generator,
                    check_every=check_every, progress_update=progress_update,
                )
                results = engine.run()
                part = _assemble(results, vocab_size, k, settings["mode"], pad_token_id, logprob_dtype)
                total_stats.add(engine.stats)
                if keep_in_memory:
                    parts.append(part)
                if writer is not None:
                    writer.write_shard(part._tensors(), entry_extra={"stats": engine.stats.as_dict()},
                                       extra_metadata={"generation_stats": total_stats.as_dict()})
                    if on_shard_written is not None:
                        on_shard_written(shard, out_dir)
                elif on_shard_written is not None:
                    on_shard_written(shard, None)
    finally:
        if writer is not None:
            writer.close()  # the out_dir's writer lock
        if bar is not None:
            bar.close()
        model.train(was_training)
        if draft_model is not None:
            draft_model.train(draft_was_training)
    if not keep_in_memory:
        return None
    meta = buffer_metadata(settings, tokenizer)
    meta.update(num_sequences=num_sequences, complete=True, generation_stats=total_stats.as_dict())
    buffer = ReplayBuffer.concat(parts, metadata=meta)
    buffer.generation_stats = total_stats
    return buffer


def _assemble(results, vocab_size, k, mode, pad_token_id, logprob_dtype) -> ReplayBuffer:
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
