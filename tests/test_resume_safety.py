"""Resume never mixes two teachers (issue 10, item 4): generate_replay refuses to continue a buffer that
other weights, or the same weights in another dtype, began; and the weights fingerprint behind the check.

Every model is a tiny random Llama built from a config, like tests/test_generation.py's.
"""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import selfreplay_fast.generation.replay as generation_replay
from selfreplay_fast.generation import generate_replay
from selfreplay_fast.replay_buffer import ReplayBuffer, ReplayBufferError, read_metadata, write_metadata

CHECKPOINT = "/checkpoints/llama-tiny"  # the same name for every model: a checkpoint overwritten in place


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_llama(seed, *, vocab=48, hidden=32, tie=False):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)
    config._name_or_path = CHECKPOINT
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


RUN = dict(num_sequences=4, max_new_tokens=5, top_k=4, batch_size=2, shard_size=2, seed=3, progress=False)


class Interrupted(Exception):
    pass


def stop_after_first_shard(shard, out_dir):
    raise Interrupted


def partial_buffer(model, out_dir):
    """A buffer that ``model`` began: shard 0 of 2 written, then the run stopped."""
    with pytest.raises(Interrupted):
        generate_replay(model, out_dir=out_dir, on_shard_written=stop_after_first_shard, **RUN)
    return ReplayBuffer.load(out_dir, allow_incomplete=True)


def directory_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def perturbed(model, scale=1e-3, only=None, seed=99):
    """A fine-tuned copy: every element of every weight (or of the weight named ``only``) moved a little."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if only is None or name == only:
                param.add_(scale * torch.randn(param.shape, generator=g))
    return tuned


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda m: tiny_llama(1), id="reinitialized"),
        pytest.param(lambda m: perturbed(m), id="fine-tuned"),
        pytest.param(lambda m: perturbed(m, only="model.layers.1.self_attn.q_proj.weight"), id="one-tensor-tuned"),
    ],
)
def test_resume_with_other_weights_is_refused(tmp_path, other):
    model = tiny_llama(0)
    out = tmp_path / "buf"
    partial_buffer(model, str(out))
    before = directory_bytes(out)
    with pytest.raises(ReplayBufferError, match=r"weights_fingerprint: '[0-9a-f]{64}' there, '[0-9a-f]{64}' now\): "
                                                "the model's weights differ") as caught:
        generate_replay(other(model), out_dir=str(out), **RUN)
    assert "\n" not in str(caught.value)  # one line, as the CLI prints it
    assert "weights_dtype" not in str(caught.value)  # same dtype: only the fingerprint is named
    assert directory_bytes(out) == before  # nothing written, nothing removed


def test_resume_in_another_dtype_is_refused(tmp_path):
    model = tiny_llama(0)
    out = tmp_path / "buf"
    partial_buffer(model, str(out))
    before = directory_bytes(out)
    with pytest.raises(ReplayBufferError, match="weights_dtype: 'float32' there, 'bfloat16' now"):
        generate_replay(copy.deepcopy(model).to(torch.bfloat16), out_dir=str(out), **RUN)
    assert directory_bytes(out) == before


def test_resume_with_the_same_weights_reloaded_completes_the_buffer(tmp_path):
    model = tiny_llama(0)
    model.save_pretrained(tmp_path / "ckpt")  # first: saving adds `architectures` to the config (its hash)
    out = tmp_path / "buf"
    partial = partial_buffer(model, str(out))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    reloaded.config._name_or_path = CHECKPOINT
    resumed = generate_replay(reloaded, out_dir=str(out), **RUN)
    straight = generate_replay(model, **RUN)
    assert len(partial) == 2 and resumed.sequences()[:2] == partial.sequences()
    for name in ("input_ids", "lengths", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob"):
        assert torch.equal(getattr(resumed, name), getattr(straight, name)), name


def test_buffer_without_a_fingerprint_is_refused(tmp_path):
    model = tiny_llama(0)
    out = tmp_path / "buf"
    partial_buffer(model, str(out))
    # A buffer written before the fingerprint existed: the same metadata without its two fields, written
    # as the library writes it (so that any integrity record of the file itself is right).
    meta = read_metadata(str(out))
    for key in ("weights_fingerprint", "weights_dtype"):
        del meta["generation"][key], meta[key]
    write_metadata(str(out), meta)
    with pytest.raises(ReplayBufferError, match="records no weights_fingerprint.*use a fresh directory") as caught:
        generate_replay(model, out_dir=str(out), **RUN)
    assert "\n" not in str(caught.value)


def test_weights_are_checked_before_any_shard_is_read_or_model_run(tmp_path, monkeypatch):
    model = tiny_llama(0)
    out = tmp_path / "buf"
    partial_buffer(model, str(out))
    # A shard that would fail its checksum, and a model check that must not run: the weights error comes first.
    (out / "shard-00000.safetensors").write_bytes(b"not the shard that was written")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model ran before the weights were checked")

    monkeypatch.setattr(generation_replay, "check_slot_attention", must_not_run)
    with pytest.raises(ReplayBufferError, match="weights differ"):
        generate_replay(tiny_llama(1), out_dir=str(out), **RUN)


def test_metadata_records_the_fingerprint(tmp_path):
    from selfreplay_fast.fingerprint import weights_fingerprint

    model = tiny_llama(0)
    buffer = generate_replay(model, out_dir=str(tmp_path / "buf"), **RUN)
    meta = json.loads((tmp_path / "buf" / "metadata.json").read_text())
    expected = weights_fingerprint(model)
    assert meta["generation"]["weights_fingerprint"] == meta["weights_fingerprint"] == expected
    assert meta["generation"]["weights_dtype"] == meta["weights_dtype"] == "float32"
    assert buffer.metadata["weights_fingerprint"] == expected


def test_the_draft_model_is_not_part_of_the_fingerprint(tmp_path):
    # Exact speculative sampling: the draft changes the speed, never the distribution or the teacher.
    from selfreplay_fast.fingerprint import weights_fingerprint

    model = tiny_llama(0)
    buffer = generate_replay(model, draft_model=tiny_llama(5), out_dir=str(tmp_path / "buf"), **RUN)
    assert buffer.metadata["weights_fingerprint"] == weights_fingerprint(model)


# ----------------------------------------------------------------------------------------------------
# The fingerprint itself
# ----------------------------------------------------------------------------------------------------


def test_fingerprint_is_the_same_for_equal_weights_and_differs_for_others():
    from selfreplay_fast.fingerprint import weights_fingerprint

    a, b = tiny_llama(0), tiny_llama(0)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(tiny_llama(1))


def test_tied_weights_are_fingerprinted_once():
    from selfreplay_fast.fingerprint import fingerprinted_tensors

    tied = tiny_llama(0, tie=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    names = [name for name, _ in fingerprinted_tensors(tied)]
    assert len(names) == len(set(id(p) for p in tied.parameters())) == len(names)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    untied = [name for name, _ in fingerprinted_tensors(tiny_llama(0))]
    assert "lm_head.weight" in untied and len(untied) == len(names) + 1
    # Non-persistent buffers (rotary inv_freq) are rebuilt from the config, not weights.
    assert not any("inv_freq" in name for name in names)


def test_persistent_buffers_are_fingerprinted():
    from selfreplay_fast.fingerprint import fingerprinted_tensors, weights_fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    names = [name for name, _ in fingerprinted_tensors(model)]
    assert "1.running_mean" in names and "1.num_batches_tracked" in names
    before = weights_fingerprint(model)
    model[1].running_mean.add_(1.0)
    assert weights_fingerprint(model) != before


def test_fingerprint_names_shapes_and_dtypes():
    from selfreplay_fast.fingerprint import weights_fingerprint

    class Holder(torch.nn.Module):
        def __init__(self, **tensors):
            super().__init__()
            for name, t in tensors.items():
                self.register_parameter(name, torch.nn.Parameter(t))

    values = torch.arange(12.0)
    base = weights_fingerprint(Holder(w=values.clone()))
    assert weights_fingerprint(Holder(w=values.clone())) == base
    assert weights_fingerprint(Holder(v=values.clone())) != base  # renamed
    assert weights_fingerprint(Holder(w=values.reshape(3, 4).clone())) != base  # reshaped, same bits
    assert weights_fingerprint(Holder(w=values.double())) != base  # same values, another dtype
    assert weights_fingerprint(Holder(w=values.to(torch.bfloat16))) != base
    negative_zero = values.clone()
    negative_zero[0] = -0.0
    assert weights_fingerprint(Holder(w=negative_zero)) != base  # bits, not values


def test_sample_meets_every_row_and_every_column_of_a_large_matrix():
    # A change confined to one row (an embedding row) or one column (one input feature) of a tensor much
    # larger than the sample is still caught: the sampled indices spread over both.
    from selfreplay_fast.fingerprint import SAMPLE_SIZE, weights_fingerprint

    rows, cols = 1024, 64
    assert rows * cols > 8 * SAMPLE_SIZE
    layer = torch.nn.Linear(cols, rows, bias=False)
    base = weights_fingerprint(layer)
    with torch.no_grad():
        for r in range(rows):
            saved = layer.weight[r].clone()
            layer.weight[r] += 1.0
            assert weights_fingerprint(layer) != base, f"row {r} missed"
            layer.weight[r] = saved
        for c in range(cols):
            saved = layer.weight[:, c].clone()
            layer.weight[:, c] += 1.0
            assert weights_fingerprint(layer) != base, f"column {c} missed"
            layer.weight[:, c] = saved
    assert weights_fingerprint(layer) == base


def test_sample_reads_a_bounded_number_of_elements_of_any_tensor():
    from selfreplay_fast.fingerprint import SAMPLE_SIZE, _sample_bytes

    big = torch.randn(3000, 700)
    sample = _sample_bytes(big)
    assert sample.numel() == SAMPLE_SIZE * 4
    transposed = _sample_bytes(big.t())  # non-contiguous: still sampled by coordinates, not copied whole
    assert transposed.numel() == SAMPLE_SIZE * 4
    # the sampled elements are distinct elements of the tensor
    values = sample.view(torch.float32)
    assert torch.isin(values, big.reshape(-1)).all() and values.unique().numel() == SAMPLE_SIZE


def test_meta_tensors_are_refused_by_name():
    from selfreplay_fast.fingerprint import weights_fingerprint

    with torch.device("meta"):
        layer = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="weight is on the meta device"):
        weights_fingerprint(layer)


def test_checkpoint_identity_of_a_model_directory(tmp_path):
    """The vLLM backend's fingerprint (of weight files, read in 16-byte samples): equal for the same files,
    different for retrained weights saved in place and for another dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfreplay_fast.fingerprint import checkpoint_identity

    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    first = checkpoint_identity(tmp_path, "float32")
    assert first == checkpoint_identity(tmp_path, "float32") and first["weights_fingerprint"].startswith("files:")
    assert checkpoint_identity(tmp_path, "bfloat16")["weights_dtype"] == "bfloat16"
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # same name, config and file size, other weights
    assert checkpoint_identity(tmp_path, "float32")["weights_fingerprint"] != first["weights_fingerprint"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReplayBufferError, match="no weight file"):
        checkpoint_identity(empty, "float32")
