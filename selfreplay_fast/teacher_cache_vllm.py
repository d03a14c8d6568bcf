"""``build_teacher_cache(..., backend="vllm")``: the teacher cache of given text, computed by a vLLM engine.

Every sequence goes to the engine as a prompt of its own with ``SamplingParams(max_tokens=1,
prompt_logprobs=k)``; the one sampled token is discarded. What the buffer holds is exactly what the native
backend (teacher_cache.py) holds:

* **Rows.** vLLM returns one entry per prompt position: ``None`` at position 0 (no prefix), and at each
  position ``t >= 1`` the distribution of token ``t`` given tokens ``0 .. t-1`` (the actual token ``t``
  first, then the top-k). The native cache's row ``j`` predicts token ``j + 1`` from tokens ``0 .. j``:
  so row ``j`` is vLLM's position ``j + 1``, rows ``0 .. n-2`` of an ``n``-token sequence hold a teacher
  and row ``n - 1`` none (nothing follows it within the sequence); ``sampled_logprobs`` of row ``j`` is
  the log-prob of the actual token ``j + 1`` (vLLM's first entry at ``j + 1``).
* **Temperature 1 only.** vLLM computes prompt log-probs as ``log_softmax(logits)`` before any sampling
  processor (its model runner: "prompt tokens skip sampling processors"), whatever the request's
  temperature and the engine's ``logprobs_mode``; the distribution at another temperature cannot be
  recovered from a top-k at temperature 1 (its normalizer needs all V logits). So ``temperature`` must
  be 1.0 here: use the native backend for another.
* **The tail from the top-k mass**, ``log1p(-sum exp(top-k))`` in float64 from the engine's float32
  log-probs, with the precision limit of the generation backend (generation/vllm_backend.py: a tail mass
  is known to ~1e-7 absolute; the native backend sums the tail directly and exactly). The conversion of
  the engine's flat log-probs is the generation backend's :func:`split_flat_logprobs`.
* **Streamed and resumable as native** (the same shard loop, teacher_cache.write_teacher_cache): one
  shard in memory, and within it ``batch_size`` requests per engine call, so the engine's Python-side
  log-prob lists stay bounded; the engine is built only if a shard is missing.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .fingerprint import checkpoint_identity
from .generation.shard_schedule import rank_engine_devices
from .generation.vllm_backend import (
    _check_engine, _config_hash, _engine_dtype, _load_hf_configs, build_llm, engine_or_path, require_vllm, split_flat_logprobs,
)
from .teacher_cache import (
    _check_sequences, cache_metadata, cache_settings, check_cache_arguments, empty_shard_rows, teacher_row_mask,
    write_teacher_cache,
)


def prompt_logprob_params(k: int):
    """One request's SamplingParams: top-k prompt log-probs (flat), one throw-away token, nothing that could
    change the distribution (prompt log-probs skip the sampler anyway) and no prefix-cache reads."""
    from vllm import SamplingParams

    return SamplingParams(
        n=1, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
        repetition_penalty=1.0, max_tokens=1, ignore_eos=True, prompt_logprobs=k, seed=0, detokenize=False,
        flat_logprobs=True, skip_reading_prefix_cache=True,
    )


def _vllm_rows(llm, sequences, k, vocab_size, pad_token_id, batch_size, bar):
    """One shard in the layout of teacher_cache._teacher_rows, from the engine's prompt log-probs."""
    from vllm.inputs import TokensPrompt

    out = empty_shard_rows(sequences, k, pad_token_id)
    length = out["input_ids"].shape[1]
    params = prompt_logprob_params(k)
    for start in range(0, len(sequences), batch_size):
        rows = slice(start, min(start + batch_size, len(sequences)))
        batch = [s.tolist() for s in sequences[rows]]
        results = llm.generate([TokensPrompt(prompt_token_ids=s) for s in batch], params, use_tqdm=False)
        flat_ids, flat_lp = [], []
        for seq, result in zip(batch, results):
            logprobs = result.prompt_logprobs
            if list(result.prompt_token_ids) != seq or len(logprobs) != len(seq) or len(logprobs[0] or ()) != 0:
                raise RuntimeError("the engine's prompt log-probs are not one entry per prompt token, none at position 0")
            flat_ids.append(logprobs.token_ids)  # positions 1 .. n-1, k + 1 entries each, the prompt token first
            flat_lp.append(logprobs.logprobs)
        following = np.concatenate([np.asarray(s[1:], dtype=np.int64) for s in batch])
        top_ids, top_lp, tail, token_lp = split_flat_logprobs(flat_ids, flat_lp, following, k, vocab_size)
        # Row-major over (sequence, row), as the concatenation above: vLLM position j + 1 -> row j.
        where = teacher_row_mask(out["lengths"][rows], length)
        out["teacher_ids"][rows][where] = torch.from_numpy(top_ids.astype(np.int32))
        out["teacher_logprobs"][rows][where] = torch.from_numpy(top_lp)
        out["teacher_tail_logprob"][rows][where] = torch.from_numpy(tail)
        out["sampled_logprobs"][rows][where] = torch.from_numpy(token_lp)
        bar.update(rows.stop - rows.start)
    return out


def build_teacher_cache_vllm(model, token_sequences, k, out_dir, *, batch_size=8, shard_size=1024, temperature=1.0,
                             pad_token_id: Optional[int] = None, progress=True, logprob_dtype=torch.float16,
                             vllm_engine_args: Optional[dict] = None, rank: int = 0, world_size: int = 1):
    """``build_teacher_cache(..., backend="vllm")``; the arguments mean what they mean there.

    ``model`` is a local model directory (an engine is built for it by generation.vllm_backend.build_llm
    with ``max_num_seqs=batch_size`` and ``vllm_engine_args``) or a ``vllm.LLM`` you built (it must have
    ``max_logprobs >= k`` and return log-probs, not logits; ``vllm_engine_args`` must then be None). With
    ``world_size > 1`` (checked by the caller) every rank runs an engine of its own; one built here by a
    torchrun rank gets the GPUs of its local rank (``shard_schedule.rank_engine_devices``).
    """
    llm, path = engine_or_path(model, vllm_engine_args)
    if llm is None:
        require_vllm()  # before any file is written
    config, _ = _load_hf_configs(path)
    text_config = config.get_text_config()
    vocab = int(text_config.vocab_size)
    temperature, out_dir, dtype_name = check_cache_arguments(k, batch_size, shard_size, temperature, out_dir,
                                                             logprob_dtype, vocab)
    if temperature != 1.0:
        raise ValueError(
            f"temperature must be 1.0 with backend='vllm', got {temperature}: vLLM's prompt log-probs are those of "
            "the model at temperature 1 whatever the request asks (see teacher_cache_vllm.py); use backend='native'"
        )
    sequences = _check_sequences(token_sequences, vocab)
    identity = {
        "model_name": str(path),
        "config_hash": _config_hash(config),
        # The weight files and the dtype the engine holds them in (a checkpoint retrained in place keeps its name).
        **checkpoint_identity(path, _engine_dtype(llm, vllm_engine_args, config)),
        "backend": "vllm",  # a native run does not resume this buffer, nor this one a native buffer
    }
    settings = cache_settings(identity, text_config, vocab, k, temperature, sequences, shard_size, pad_token_id,
                              dtype_name)
    pad_token_id = settings["pad_token_id"]
    checked = False

    def shard_rows(shard, bar):
        nonlocal llm, checked
        if not checked:  # the engine is built (and checked) at the first missing shard only
            if llm is None:
                with rank_engine_devices(world_size, (vllm_engine_args or {}).get("tensor_parallel_size", 1)):
                    llm = build_llm(path, top_k=k, max_num_seqs=batch_size, engine_args=vllm_engine_args)
            _check_llm(llm, k, vocab, max(len(s) for s in sequences))
            checked = True
        return _vllm_rows(llm, shard, k, vocab, pad_token_id, batch_size, bar)

    return write_teacher_cache(out_dir, settings, cache_metadata(settings, "vllm"), sequences, shard_rows,
                               progress=progress, logprob_dtype=logprob_dtype, desc="teacher cache[vllm]", rank=rank,
                               world_size=world_size)


def _check_llm(llm, k: int, vocab: int, longest: int) -> None:
    _check_engine(llm, k, 1.0)  # generative, max_logprobs >= k, log-probs (raw = processed for prompt tokens)
    if llm.model_config.get_vocab_size() != vocab:
        raise ValueError(f"the engine's vocabulary ({llm.model_config.get_vocab_size()}) is not the checkpoint's ({vocab})")
    if longest >= llm.model_config.max_model_len:  # vLLM wants room for the one generated token
        raise ValueError(
            f"the longest sequence has {longest} tokens; the engine takes prompts of at most max_model_len - 1 = "
            f"{llm.model_config.max_model_len - 1} (build it with a larger max_model_len, or truncate)"
        )
