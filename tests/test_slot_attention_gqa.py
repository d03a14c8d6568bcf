"""The slot cache's decode forwards on a grouped-query model on the CPU: transformers' SDPA gets the slot
mask with ``enable_gqa`` (its faster CPU path) instead of query heads folded into the query length, the
environment is as before afterwards, a user's own setting wins, and the samples and teachers are those of
the folded path. (tests/test_generation.py compares the teachers with full forwards on such a model.)"""

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from selfreplay_fast.generation import generate_replay
from selfreplay_fast.generation.slot_cache import _FORCE_MASKED_GQA


@pytest.fixture(scope="module")
def gqa_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def _generate_recording_sdpa(model, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        calls.append((query.shape, attn_mask is not None, kwargs.get("enable_gqa", False)))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    buffer = generate_replay(model, num_sequences=6, max_new_tokens=10, top_k=5, batch_size=4, seed=3,
                             progress=False)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    return buffer, calls


def test_decode_forwards_pass_the_mask_with_enable_gqa(gqa_model, monkeypatch):
    monkeypatch.delenv(_FORCE_MASKED_GQA, raising=False)
    buffer, calls = _generate_recording_sdpa(gqa_model, monkeypatch)
    decode = [c for c in calls if c[1] and c[0][0] == 4]  # the 4 slots' masked forwards
    assert decode and all(gqa for _, _, gqa in decode), calls[:4]
    assert all(shape[1] == 2 for shape, _, _ in decode)  # [B, query heads, n, d]: not folded
    assert _FORCE_MASKED_GQA not in os.environ

    # The user's own "0" is left as it is: transformers folds the query heads, and the output is the same.
    monkeypatch.setenv(_FORCE_MASKED_GQA, "0")
    folded, calls = _generate_recording_sdpa(gqa_model, monkeypatch)
    decode = [c for c in calls if c[1] and c[0][0] == 4]
    assert decode and not any(gqa for _, _, gqa in decode) and os.environ[_FORCE_MASKED_GQA] == "0"
    assert torch.equal(buffer.input_ids, folded.input_ids)
    torch.testing.assert_close(buffer.teacher_logprobs.float(), folded.teacher_logprobs.float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(buffer.sampled_logprobs.float(), folded.sampled_logprobs.float(), atol=1e-3, rtol=0)
