"""The slot cache's CPU layout and its reuse between shards: a tight layout (the window re-laid with at
most _TIGHT_SLACK spare columns) and a restarted cache must give exactly what a static, fresh cache gives."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import selfreplay_fast.generation.slot_cache as slot_cache
from selfreplay_fast.generation import generate_replay
from selfreplay_fast.generation.slot_cache import SlotModel, SlotModelPool


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=None)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def drive(slots: SlotModel, layouts: list):
    """A ragged prefill, plain steps, a speculative feed with a partial rollback, a refill of one slot and
    then of every slot: the logits of every forward, and (capacity, window) after each."""
    torch.manual_seed(1)
    B, L = 3, 40
    buf = torch.randint(2, 61, (B, L + 2))
    live = torch.ones(B, dtype=torch.bool)
    out = []

    def note(logits):
        out.append(logits.clone())
        cache = slots.cache
        layouts.append((cache.slot_keys[0].shape[2], cache.window))

    lengths = torch.tensor([5, 2, 3])
    note(slots.feed(buf, lengths, live, 5, keep=5))
    for _ in range(9):
        note(slots.step(buf.gather(1, lengths[:, None] - 1), lengths, live))
        lengths += 1
    drafts = torch.randint(2, 61, (B, 3))
    note(slots.feed(buf, lengths, live, 1, extra=drafts, keep=4))
    slots.rollback(3, torch.tensor([2, 0, 3]), live)
    buf[:, :] = buf.clone()
    for b, kept in enumerate([2, 0, 3]):
        buf[b, lengths[b]:lengths[b] + kept] = drafts[b, :kept]
    lengths += torch.tensor([2, 0, 3])
    slots.reset(torch.tensor([False, True, False]), [1])
    lengths[1] = 1
    note(slots.feed(buf, lengths, live, int(lengths.max()), keep=1))
    for _ in range(6):
        note(slots.step(buf.gather(1, lengths[:, None] - 1), lengths, live))
        lengths += 1
    slots.reset(torch.ones(B, dtype=torch.bool), [0, 1, 2])  # every slot: the window starts over
    lengths = torch.tensor([1, 2, 1])
    note(slots.feed(buf, lengths, live, 2, keep=1))
    for _ in range(4):
        note(slots.step(buf.gather(1, lengths[:, None] - 1), lengths, live))
        lengths += 1
    return out


def test_tight_layout_gives_the_static_cache_logits(model):
    tight_layouts, static_layouts = [], []
    with torch.inference_mode():
        tight = drive(SlotModel(model, 3, 40, tight_window=True), tight_layouts)
        static = drive(SlotModel(model, 3, 40, tight_window=False), static_layouts)
    for a, b in zip(tight, static):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    slack = slot_cache._TIGHT_SLACK
    assert all(window <= capacity <= window + slack for capacity, window in tight_layouts), tight_layouts
    assert all(capacity == 42 for capacity, _ in static_layouts)
    capacities = [capacity for capacity, _ in tight_layouts]
    assert max(capacities) > capacities[0] and capacities[-1] < max(capacities)  # grew, then shrank


def test_a_relayout_that_drops_the_cached_columns_fails_the_test(model, monkeypatch):
    # The check above can fail: a relayout that zeroes instead of copying changes the logits.
    def forgetful(self, layer_idx):
        self.slot_keys[layer_idx] = self._view(self.spare_keys, self.slot_keys[layer_idx], self.capacity).zero_()
        self.slot_values[layer_idx] = self._view(self.spare_values, self.slot_values[layer_idx],
                                                 self.capacity).zero_()

    monkeypatch.setattr(slot_cache.SlotKVCache, "_relayout", forgetful)
    with torch.inference_mode():
        tight = drive(SlotModel(model, 3, 40, tight_window=True), [])
        static = drive(SlotModel(model, 3, 40, tight_window=False), [])
    assert max(float((a - b).abs().max()) for a, b in zip(tight, static)) > 1e-2


def generate(model, out_dir=None):
    return generate_replay(model, num_sequences=10, max_new_tokens=9, top_k=5, batch_size=4, shard_size=4,
                           seed=3, progress=False, eos_token_id=[7], out_dir=out_dir)


def test_shards_reuse_one_slot_cache_with_the_same_samples(model, monkeypatch):
    made = []
    make = slot_cache.make_slot_model

    def counting(*args, **kwargs):
        made.append(args[1:])
        return make(*args, **kwargs)

    monkeypatch.setattr(slot_cache, "make_slot_model", counting)
    reused = generate(model)
    # the one-off slot check's (2 slots, 8 columns), then shards of 4, 4 and 2 sequences of 1 + 9 tokens
    # (max_len 11: one column more for the last step's pending token): the first two share a cache
    assert made == [(2, 8), (4, 11), (2, 11)], made
    monkeypatch.setattr(SlotModelPool, "get", lambda self, m, b, n: make(m, b, n))  # a fresh cache per shard
    fresh = generate(model)
    for name in ("input_ids", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob", "sampled_logprobs"):
        assert torch.equal(getattr(reused, name), getattr(fresh, name)), name
    assert (reused.input_ids == 7).any()  # EOS ends some sequences early: ragged refills within a shard
