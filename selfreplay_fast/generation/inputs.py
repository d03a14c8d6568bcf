"""The inputs of replay generation, checked and resolved the same way for both backends: the model to
load, positive-int arguments, prompts (BOS alone, strings or token ids), BOS/EOS ids and the longest
sequence a run can make."""

from __future__ import annotations

import hashlib
import json
import numbers
from typing import List, Optional, Sequence

import torch

from .self_dialogue import SelfDialogue


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


def check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _normalize_prompts(prompts, tokenizer, vocab_size) -> List[List[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be None, a list of strings or of token-id lists, or a SelfDialogue")
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
    """(prompt token-id lists, their sha256 for the resume settings): BOS alone when ``prompts`` is None,
    the user-turn opening for a :class:`SelfDialogue`."""
    if prompts is None:
        return [[bos]], hashlib.sha256(f"bos:{bos}".encode()).hexdigest()
    if isinstance(prompts, SelfDialogue):  # phase 1's prompt; the phases are the shard loop's
        prompts.check_vocabulary(vocab_size)
        return [list(prompts.opening)], prompts.digest()
    prompt_list = _normalize_prompts(prompts, tokenizer, vocab_size)
    return prompt_list, hashlib.sha256(json.dumps(prompt_list).encode()).hexdigest()


def check_max_length(prompt_list, max_new_tokens: int, config, dialogue: Optional[SelfDialogue] = None) -> int:
    """The longest sequence a run can make, refused beyond the model's ``max_position_embeddings``."""
    longest = dialogue.longest_prompt(max_new_tokens) if dialogue is not None else max(len(p) for p in prompt_list)
    max_len = longest + max_new_tokens
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_len > max_positions:
        raise ValueError(
            f"the longest prompt plus max_new_tokens is {max_len} tokens, beyond the model's "
            f"max_position_embeddings = {max_positions}"
        )
    return max_len
