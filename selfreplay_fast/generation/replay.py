"""``generate_replay``: check the arguments, resume, run the decode loop shard by shard and write each
shard (the package docstring, selfreplay_fast/generation/__init__.py, says how it samples)."""

from __future__ import annotations

import numbers
import time
from typing import Callable, Optional, Union

import torch

from .._inputs import check_temperature
from ..fingerprint import weights_identity
from ..model_info import model_config_hash, model_device_dtype, model_name, output_vocab_size
from ..replay_buffer import LOGPROB_DTYPES, ReplayBuffer
from .decode_loop import GenerationStats, ShardEngine
from .drafting import Drafter, ModelDrafter, NGramDrafter
from .inputs import check_max_length, check_positive_int, replay_prompts, resolve_special_ids
from .sampling import TeacherRecorder
from .self_dialogue import as_self_dialogue
from .shard_schedule import progress_span, resolve_rank, shard_num_sequences
from .shards import assemble_shard, buffer_metadata, generation_settings, open_resumable_writer, shard_seed
from .slot_cache import SlotModelPool, check_slot_attention


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
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
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
        prompts: None (every sequence is BOS alone), a list of strings (needs ``tokenizer``) or of
            token-id lists (sequence ``i`` uses ``prompts[i % len(prompts)]``; ``task_prompts`` makes them
            from task data), or a :class:`SelfDialogue`: the model writes a user turn and answers it through
            the tokenizer's chat template (selfreplay_fast/generation/self_dialogue.py).
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
            directory or a ``vllm.LLM``, and the buffer means the same (selfreplay_fast/generation/vllm_backend.py;
            draft_model, drafter, sampled_draws and check_every are native only).
        vllm_engine_args: with ``backend="vllm"`` and a model directory, extra ``vllm.LLM`` arguments.
        rank / world_size: data-parallel generation: ``world_size`` processes fill one ``out_dir``, this one
            generating the shards of ``rank`` (default: ``RANK``/``WORLD_SIZE`` from the environment, as
            torchrun sets them, when ``out_dir`` is given; else one process). The buffer equals a
            single-process run's shard for shard; only rank 0 shows a progress bar (selfreplay_fast/generation/shard_schedule.py).

    Returns:
        The :class:`ReplayBuffer` of all ``num_sequences`` sequences (``buffer.generation_stats`` holds
        the counters of this call, including the speculative acceptance rate), or None when
        ``keep_in_memory=False`` or ``world_size > 1`` (open ``out_dir`` once every rank has returned).
    """
    if backend != "native" or vllm_engine_args is not None:  # the vLLM backend refuses what it cannot honor
        arguments = dict(locals())  # every argument, by name (before the import adds a name)
        from .vllm_backend import generate_with_backend

        return generate_with_backend(arguments)
    # ---- argument checks ----
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face causal LM (torch.nn.Module with .config), got {type(model).__name__}")
    num_sequences = check_positive_int("num_sequences", num_sequences)
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
    top_k = check_positive_int("top_k", top_k)
    batch_size = check_positive_int("batch_size", batch_size)
    shard_size = check_positive_int("shard_size", shard_size)
    num_draft_tokens = check_positive_int("num_draft_tokens", num_draft_tokens)
    temperature = check_temperature(temperature)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    if sampled_draws is not None:
        sampled_draws = check_positive_int("sampled_draws", sampled_draws)
    if isinstance(logprob_dtype, str):
        if logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype must be one of {list(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
        logprob_dtype = LOGPROB_DTYPES[logprob_dtype]
    if logprob_dtype not in LOGPROB_DTYPES.values():
        raise ValueError(f"logprob_dtype must be torch.float32 or torch.float16, got {logprob_dtype!r}")
    if check_every is not None:
        check_every = check_positive_int("check_every", check_every)
    if not keep_in_memory and out_dir is None:
        raise ValueError("keep_in_memory=False needs out_dir: without it the generated buffer would be lost")
    rank, world_size = resolve_rank(rank, world_size, out_dir=out_dir)
    keep_in_memory, progress = keep_in_memory and world_size == 1, progress and rank == 0

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
    dialogue = as_self_dialogue(prompts)
    max_len = check_max_length(prompt_list, max_new_tokens, config, dialogue)

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

    identity = {"model_name": model_name(model), "config_hash": model_config_hash(model), **weights_identity(model)}
    settings = generation_settings(
        identity, vocab_size=vocab_size, k=k, sampled_draws=sampled_draws, temperature=temperature, seed=seed,
        num_sequences=num_sequences, max_new_tokens=max_new_tokens, batch_size=batch_size, shard_size=shard_size,
        prompts_digest=prompts_digest, num_prompts=len(prompt_list), eos_ids=eos_ids, pad_token_id=pad_token_id,
        drafter=drafter, num_draft_tokens=num_draft_tokens, logprob_dtype=logprob_dtype, dialogue=dialogue)
    pad_token_id = settings["pad_token_id"]

    # ---- resume ----
    writer, parts = open_resumable_writer(out_dir, settings, num_shards, keep_in_memory=keep_in_memory,
                                          tokenizer=tokenizer, rank=rank, world_size=world_size)
    if writer is not None:
        out_dir = writer.out_dir

    # ---- generation ----
    recorder = TeacherRecorder(k, sampled_draws)
    total_stats = GenerationStats()
    todo = writer.todo_shards if writer is not None else list(range(num_shards))
    done_sequences, bar_total = progress_span(todo, num_sequences, shard_size, rank, world_size)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=bar_total, initial=done_sequences, unit="seq", desc="generate_replay", dynamic_ncols=True)
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

    def tokens_only_update(num_finished, num_tokens, engine):
        progress_update(0, num_tokens, engine)

    was_training = model.training
    draft_was_training = draft_model.training if draft_model is not None else False
    model.eval()
    if draft_model is not None:
        draft_model.eval()
    try:
        with torch.inference_mode():
            if todo:
                check_slot_attention(model)
                if draft_model is not None:
                    check_slot_attention(draft_model, name="draft_model")
            slot_models = SlotModelPool()  # one slot cache for every shard of the same shape
            for shard in todo:
                if writer is not None and not writer.claim(shard):
                    continue  # written meanwhile, or being written by another process
                first, count = shard * shard_size, shard_num_sequences(shard, num_sequences, shard_size)
                shard_prompts = [prompt_list[(first + i) % len(prompt_list)] for i in range(count)]
                generator = torch.Generator(device=device).manual_seed(shard_seed(seed, shard))
                shard_stats = GenerationStats()

                def run_phase(phase_prompts, stop_ids, budget, rows=None):  # rows: vLLM seeds only
                    engine = ShardEngine(
                        model=model, prompts=phase_prompts, max_new_tokens=budget, batch_size=batch_size,
                        temperature=temperature, recorder=recorder, eos_ids=stop_ids, vocab_size=vocab_size,
                        drafter=drafter, num_draft_tokens=num_draft_tokens, generator=generator,
                        check_every=check_every,
                        # A dialogue's phases finish each sequence twice: the bar counts it once, below.
                        progress_update=progress_update if dialogue is None else tokens_only_update,
                        slot_models=slot_models,
                    )
                    phase_results = engine.run()
                    shard_stats.add(engine.stats)
                    return phase_results

                if dialogue is None:
                    results = run_phase(shard_prompts, eos_ids, max_new_tokens)
                else:
                    results = dialogue.generate(count, run_phase, eos_ids, max_new_tokens)
                    shard_stats.sequences = count
                    if bar is not None:
                        bar.update(count)
                part = assemble_shard(results, vocab_size, k, settings["mode"], pad_token_id, logprob_dtype)
                total_stats.add(shard_stats)
                if keep_in_memory:
                    parts.append(part)
                if writer is not None:
                    writer.write_shard(part._tensors(), entry_extra={"stats": shard_stats.as_dict()},
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
