"""ReplayKLLoss(loss="nll" | "kl+nll") and replay_step(replay_loss="nll"): the replay text's next-token loss
(and its mix with the KL) through the fused path, against a float64 reference on the model's full logits."""

import pytest
import torch

import selfreplay_fast as sf

VOCAB = 61


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, initializer_range=0.2)).double()


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    teacher = tiny_model(seed=1).float().eval()
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in [7, 12, 9, 4, 11, 8]]
    return sf.build_teacher_cache(teacher, seqs, 4, tmp_path_factory.mktemp("replay") / "c", progress=False)


def reference_terms(model, b, temperature):
    """Per-position (tail KL, NLL of the next token) [B, L] in float64 from the full logits, and the mask."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double() / temperature
    log_q = logits.log_softmax(-1)
    following = torch.nn.functional.pad(b["input_ids"][:, 1:], (0, 1), value=0)
    nll = -log_q.gather(-1, following[..., None])[..., 0]
    ids, lp = b["teacher_ids"].long(), b["teacher_logprobs"].double()
    used = ids >= 0
    q_top = log_q.gather(-1, ids.clamp_min(0))
    tail_p = b["teacher_tail_logprob"].double()
    q_rest = torch.log1p(-torch.where(used, q_top.exp(), 0.0).sum(-1).clamp_max(1 - 1e-12))
    kl = torch.where(used, lp.exp() * (lp - q_top), 0.0).sum(-1) + torch.where(
        torch.isinf(tail_p), 0.0, tail_p.exp() * (tail_p - q_rest))
    return kl, nll, b["mask"]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss, nll_weight", [("nll", 0.5), ("kl+nll", 0.3), ("kl+nll", 1.0)])
def test_replay_nll_and_mix_equal_full_logit_reference(replay, loss, nll_weight):
    model = tiny_model(seed=2).train()
    b = next(replay.batches(4, seed=0))
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}
    temperature = 0.8
    got = sf.ReplayKLLoss(temperature=temperature, impl="torch", chunk_size=5, loss=loss, nll_weight=nll_weight)(model, b)
    got.backward()
    got_grads = grads(model)
    model.zero_grad(set_to_none=True)
    kl, nll, mask = reference_terms(model, b, temperature)
    ref_nll = nll[mask].mean()
    ref = ref_nll if loss == "nll" else (1 - nll_weight) * kl[mask].mean() + nll_weight * ref_nll
    ref.backward()
    assert ref.item() > 0.5  # a real loss, not a vacuous 0 = 0
    torch.testing.assert_close(got.detach().double(), ref.detach(), rtol=1e-6, atol=1e-8)
    ref_grads = grads(model)
    assert got_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-5, atol=1e-8)

    # reduction="none" gives the per-position terms, "sum" and num_items their sum (divided)
    with torch.no_grad():
        per_pos = sf.ReplayKLLoss(temperature=temperature, impl="torch", reduction="none", loss=loss,
                                  nll_weight=nll_weight)(model, b)
        expected = nll if loss == "nll" else (1 - nll_weight) * kl + nll_weight * nll
        torch.testing.assert_close(per_pos.double(), torch.where(mask, expected, 0.0), rtol=1e-6, atol=1e-8)
        halved = sf.ReplayKLLoss(temperature=temperature, loss=loss, nll_weight=nll_weight)(
            model, b, num_items=2 * int(mask.sum()))
        torch.testing.assert_close(halved.double(), ref.detach() / 2, rtol=1e-6, atol=1e-8)


def test_nll_needs_only_input_ids_and_counts_by_attention_mask():
    model = tiny_model(seed=3)
    ids = torch.tensor([[1, 5, 9, 7, 4, 0, 0], [1, 8, 3, 3, 6, 10, 12]])
    attention = (torch.arange(7) < torch.tensor([[5], [7]])).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.double()
        nll = -logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        counted = attention[:, 1:].bool()
        nll_loss = sf.ReplayKLLoss(loss="nll")
        got = nll_loss(model, {"input_ids": ids, "attention_mask": attention})
        torch.testing.assert_close(got.double(), nll[counted].mean(), rtol=1e-6, atol=1e-8)
        # it equals task_nll on the same text (the same loss, the replay text as the task)
        torch.testing.assert_close(got, sf.task_nll(model, ids, attention), rtol=1e-6, atol=1e-8)
        # without an attention mask every next token counts (the padding is then text like any other)
        logits = model(input_ids=ids).logits.double()
        every = -logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        torch.testing.assert_close(nll_loss(model, {"input_ids": ids}).double(), every.mean(), rtol=1e-6, atol=1e-8)


def test_replay_step_takes_the_loss_by_name(replay):
    model = tiny_model(seed=2)
    task = {"input_ids": torch.tensor([[1, 4, 6, 9, 3]])}
    b = next(replay.batches(3, seed=0))
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}
    with torch.no_grad():
        by_name = sf.replay_step(model, task, b, 2.0, replay_loss="nll")
        explicit = sf.ReplayKLLoss(loss="nll")(model, b)
        torch.testing.assert_close(by_name.replay_kl, explicit)
        torch.testing.assert_close(by_name.loss, by_name.task_loss + 2.0 * explicit)
        kl = sf.replay_step(model, task, b, 2.0).replay_kl
        assert abs(float(kl) - float(explicit)) > 1e-3  # a different loss, not the KL renamed


def test_bad_replay_loss_arguments_name_the_argument(replay):
    with pytest.raises(ValueError, match="loss must be one of 'kl', 'nll', 'kl\\+nll'"):
        sf.ReplayKLLoss(loss="mse")
    with pytest.raises(ValueError, match="nll_weight must be a number in \\[0, 1\\]"):
        sf.ReplayKLLoss(loss="kl+nll", nll_weight=1.5)
    with pytest.raises(TypeError, match="nll_weight"):
        sf.ReplayKLLoss(loss="kl+nll", nll_weight="0.5")
    model = tiny_model()
    with pytest.raises(ValueError, match="replay_loss must be one of"):
        sf.replay_step(model, {"input_ids": torch.tensor([[1, 2, 3]])}, {}, 1.0, replay_loss="nl")
    with pytest.raises(KeyError, match="input_ids"):
        sf.ReplayKLLoss(loss="nll")(model, {"attention_mask": torch.ones(1, 3)})
    with pytest.raises(KeyError, match="teacher_ids"):
        sf.ReplayKLLoss(loss="kl+nll")(model, {"input_ids": torch.tensor([[1, 2, 3]])})
