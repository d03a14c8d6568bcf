"""build_teacher_cache and `selfreplay cache` against a separate full forward pass of the model."""

import json

import pytest
import torch

import selfreplay_fast as sf
from selfreplay_fast import cli
from selfreplay_fast import replay_buffer as rb
from selfreplay_fast import teacher_cache as tc

VOCAB = 61


def tiny_model(kind="llama", seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                             initializer_range=0.5)  # peaked logits: no ties in the top k
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, initializer_range=0.5)
        model = GPT2LMHeadModel(config)
    return model.eval()


def corpus(seed=0, count=7):
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 9, 17, 5, 12, 3, 8, 11][:count]
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]  # no pad/bos/eos


def expected_rows(model, seq, k, temperature=1.0):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].double() / temperature
    log_p = torch.log_softmax(logits, -1)
    top = log_p.topk(k, -1)
    rest = log_p.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    return top.indices, top.values, rest


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cache_equals_the_models_own_log_softmax(tmp_path, kind, temperature):
    model = tiny_model(kind)
    seqs = corpus()
    k = 5
    buf = sf.build_teacher_cache(model, seqs, k, tmp_path / "c", batch_size=3, shard_size=4,
                                 temperature=temperature, progress=False, logprob_dtype=torch.float32)
    assert len(buf) == len(seqs) and buf.k == k and buf.vocab_size == VOCAB
    assert buf.lengths.tolist() == [len(s) for s in seqs]
    for i, seq in enumerate(seqs):
        n = len(seq)
        assert buf.input_ids[i, :n].tolist() == seq
        ids, lp, rest = expected_rows(model, seq, k, temperature)
        for j in range(n - 1):  # row j predicts token j + 1
            got_ids = buf.teacher_ids[i, j].long()
            assert set(got_ids.tolist()) == set(ids[j].tolist())
            order = torch.argsort(got_ids)
            torch.testing.assert_close(buf.teacher_logprobs[i, j][order].double(),
                                       lp[j][torch.argsort(ids[j])], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(buf.teacher_tail_logprob[i, j].double(), rest[j], rtol=1e-5, atol=1e-5)
        # the last token predicts nothing within the sequence, and padding has no teacher
        assert (buf.teacher_ids[i, n - 1 :] == -1).all()
        assert torch.isinf(buf.teacher_tail_logprob[i, n - 1 :]).all()
        # cache v2: row j also holds the log-prob of the actual token j + 1 (0 where no row predicts)
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double() / temperature, -1)
        torch.testing.assert_close(buf.sampled_logprobs[i, : n - 1].double(),
                                   log_p[torch.arange(n - 1), torch.tensor(seq[1:], dtype=torch.long)], rtol=1e-5, atol=1e-5)
        assert (buf.sampled_logprobs[i, n - 1 :] == 0).all()
    assert buf.metadata["sampled_logprobs"] is True and buf.metadata["sampled_from_teacher"] is False
    assert buf.metadata["provenance"]["backend"] == "corpus" and buf.metadata["provenance"]["torch"] == torch.__version__


def test_a_model_against_its_own_cache_has_zero_kl(tmp_path):
    model = tiny_model()
    buf = sf.build_teacher_cache(model, corpus(), 4, tmp_path / "c", progress=False, logprob_dtype=torch.float32)
    batch = next(buf.batches(7, shuffle=False))
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        kl = sf.fused_replay_kl(hidden, model.lm_head.weight, batch["teacher_ids"], batch["teacher_logprobs"],
                                mask=batch["mask"], teacher_tail_logprob=batch["teacher_tail_logprob"])
        other = tiny_model(seed=1)
        hidden2 = other.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        kl_other = sf.fused_replay_kl(hidden2, other.lm_head.weight, batch["teacher_ids"], batch["teacher_logprobs"],
                                      mask=batch["mask"], teacher_tail_logprob=batch["teacher_tail_logprob"])
    assert abs(kl.item()) < 1e-5 and kl_other.item() > 1e-3


def test_interrupted_run_resumes_to_the_same_buffer(tmp_path, monkeypatch):
    model, seqs = tiny_model(), corpus(count=9)
    full = sf.build_teacher_cache(model, seqs, 3, tmp_path / "full", shard_size=2, progress=False)

    calls = {"n": 0}
    original = rb.write_shard

    def dying_write_shard(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed after two shards")
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(rb, "write_shard", dying_write_shard)
    with pytest.raises(KeyboardInterrupt):
        sf.build_teacher_cache(model, seqs, 3, tmp_path / "resumed", shard_size=2, progress=False)
    with pytest.raises(sf.ReplayBufferError, match="incomplete"):
        sf.ReplayBuffer.load(tmp_path / "resumed")
    monkeypatch.setattr(rb, "write_shard", original)
    computed = []
    original_rows = tc._teacher_rows
    monkeypatch.setattr(tc, "_teacher_rows", lambda *a: computed.append(len(a[3])) or original_rows(*a))
    resumed = sf.build_teacher_cache(model, seqs, 3, tmp_path / "resumed", shard_size=2, progress=False)
    assert computed == [2, 2, 1]  # shards 0 and 1 were not recomputed
    for name in ("input_ids", "lengths", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob"):
        assert torch.equal(getattr(full, name), getattr(resumed, name)), name


def test_other_runs_directory_is_refused(tmp_path):
    model, seqs = tiny_model(), corpus()
    sf.build_teacher_cache(model, seqs, 3, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="another run"):
        sf.build_teacher_cache(model, seqs, 4, tmp_path / "c", progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not empty"):
        sf.build_teacher_cache(model, seqs, 3, tmp_path / "junk", progress=False)


@pytest.mark.parametrize("other", ["reinitialized", "bfloat16"])
def test_resume_with_other_weights_is_refused(tmp_path, monkeypatch, other):
    # A checkpoint retrained in place, or loaded in another dtype, keeps its name and config: the weights
    # fingerprint tells them apart, before any shard is read.
    model, seqs = tiny_model(), corpus(count=5)
    model.config._name_or_path = "/checkpoints/tiny"
    sf.build_teacher_cache(model, seqs, 3, tmp_path / "c", shard_size=2, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    if other == "reinitialized":
        changed, match = tiny_model(seed=1), "weights_fingerprint: '[0-9a-f]{64}' there, '[0-9a-f]{64}' now"
    else:
        changed, match = tiny_model().to(torch.bfloat16), "weights_dtype: 'float32' there, 'bfloat16' now"
    changed.config._name_or_path = "/checkpoints/tiny"
    monkeypatch.setattr(rb, "read_shard", lambda *a, **k: pytest.fail("a shard was read before the weights check"))
    with pytest.raises(sf.ReplayBufferError, match=match + r".*the model's weights differ") as caught:
        sf.build_teacher_cache(changed, seqs, 3, tmp_path / "c", shard_size=2, progress=False)
    assert "\n" not in str(caught.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before
    meta = json.loads((tmp_path / "c" / "metadata.json").read_text())
    assert meta["teacher_cache"]["weights_fingerprint"] == meta["weights_fingerprint"]
    assert meta["teacher_cache"]["weights_dtype"] == meta["weights_dtype"] == "float32"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must be"),
        (dict(k=VOCAB + 1), "k must be <="),
        (dict(token_sequences=[]), "at least one"),
        (dict(token_sequences=[[1, 2], []]), r"token_sequences\[1\]"),
        (dict(token_sequences=[[1, VOCAB]]), "outside"),
        (dict(token_sequences="abc"), "list of token-id lists"),
        (dict(temperature=0.0), "temperature"),
        (dict(batch_size=0), "batch_size"),
        (dict(out_dir=3), "out_dir"),
    ],
)
def test_bad_input(tmp_path, kwargs, match):
    args = dict(token_sequences=corpus(), k=3, out_dir=tmp_path / "c")
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        sf.build_teacher_cache(tiny_model(), args.pop("token_sequences"), args.pop("k"), args.pop("out_dir"),
                               progress=False, **args)


def test_softcapped_head_is_refused():
    model = tiny_model()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="softcapping"):
        tc.lm_head_of(model)


def test_cache_command_reads_jsonl_ids_and_text(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0").save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"input_ids": [3, 4, 5, 6]}) + "\n\n" + json.dumps({"text": "w7 w8 w9"}) + "\n")
    assert cli.main(["cache", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out"),
                     "--top-k", "4", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["buffer"] == {"sequences": 2, "tokens": 7, "teacher_rows": 5, "shards": 1, "complete": True, "k": 4,
                                 "vocab_size": VOCAB}
    assert summary["this_run"]["sequences"] == 2 and summary["this_run"]["tokens"] == 7
    buf = sf.ReplayBuffer.load(tmp_path / "out", expected_vocab_size=VOCAB)
    assert buf.input_ids[0, :4].tolist() == [3, 4, 5, 6] and buf.input_ids[1, :3].tolist() == [7, 8, 9]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": [1]}\n')
    assert cli.main(["cache", "--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "o2"),
                     "--top-k", "4"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_cache_command_logprob_dtype(tmp_path, capsys):
    """--logprob-dtype float32 stores what build_teacher_cache(logprob_dtype=torch.float32) stores; the default is
    float16, whose rounding (up to |log p| * 2**-11) is the whole difference between the two."""
    model_dir = tmp_path / "model"
    model = tiny_model()
    model.save_pretrained(model_dir)
    seqs = corpus()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    common = ["cache", "--model", str(model_dir), "--data", str(data), "--top-k", "4", "--no-progress"]
    assert cli.main([*common, "--out", str(tmp_path / "f32"), "--logprob-dtype", "float32"]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "f16")]) == 0
    f32, f16 = (sf.ReplayBuffer.load(tmp_path / name, expected_vocab_size=VOCAB) for name in ("f32", "f16"))
    direct = sf.build_teacher_cache(model, seqs, 4, tmp_path / "direct", progress=False, logprob_dtype=torch.float32)
    assert f32.metadata["logprob_dtype"] == "float32" and f16.metadata["logprob_dtype"] == "float16"
    assert f32.teacher_logprobs.dtype == torch.float32 and f16.teacher_logprobs.dtype == torch.float16
    assert torch.equal(f32.teacher_logprobs, direct.teacher_logprobs)
    assert torch.equal(f16.teacher_logprobs, direct.teacher_logprobs.half())
    capsys.readouterr()
    assert cli.main([*common, "--out", str(tmp_path / "x"), "--logprob-dtype", "bfloat16"]) == cli.EXIT_USAGE_ERROR
    assert "argument --logprob-dtype: invalid choice: 'bfloat16'" in capsys.readouterr().err


def test_backend_argument_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"backend must be one of \['native', 'vllm'\], got 'sglang'"):
        sf.build_teacher_cache(tiny_model(), corpus(), 3, tmp_path / "c", progress=False, backend="sglang")
    with pytest.raises(ValueError, match="vllm_engine_args only applies to backend='vllm'"):
        sf.build_teacher_cache(tiny_model(), corpus(), 3, tmp_path / "c", progress=False, vllm_engine_args={})


def test_vllm_backend_without_vllm_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    with pytest.raises(ImportError, match=r"pip install 'selfreplay-fast\[vllm\]'"):
        sf.build_teacher_cache(str(model_dir), corpus(), 3, tmp_path / "c", progress=False, backend="vllm")
    assert not (tmp_path / "c").exists()  # refused before anything was written
