"""A training step with ``fused_replay_kl`` under DDP and FSDP2 (``fully_shard``), 2 gloo ranks on CPU.

The student is a tiny random Hugging Face Llama (an untied lm_head, and a tied-embeddings variant); the
replay batch is a ReplayBuffer recorded by ``build_teacher_cache`` from a second tiny "teacher" Llama.
The step is task NLL + lambda * replay KL, both through the fused path (the task label is a k = 1
teacher), computed inside the forward of a small module that is what gets wrapped, so that DDP's and
FSDP2's hooks fire (FSDP2 all-gathers the parameters, lm_head's included, before that forward). Each
rank gets its own shard of the task and replay batches. Every parameter's gradient (FSDP2: the
full_tensor() of its shard), and every parameter after one SGD step, must equal a single-process step
over the whole batch: fp32, relative error <= 1e-5.

Exactness of the reduction. DDP and FSDP2 average the ranks' gradients. With reduction="mean" on each
rank, the average of the ranks' means equals the mean over all counted tokens only when every rank
counts the same number of tokens, which padded replay batches do not (the shards here are deliberately
uneven). So each rank uses reduction="sum", divides by the global token count (an all-reduce of the
local counts: the same divisor on every rank) and multiplies by the world size, which cancels the
averaging: mean_r(W * S_r / N) = sum_r(S_r) / N, the single-process mean over all N counted tokens.
"""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported anywhere (the spawned ranks included)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import selfreplay_fast as sf

from dist_utils import init_gloo, spawn
from replay_cases import rel_err

WORLD = 2
LAMBDA = 3.0
LR = 0.5
TOL = 1e-5
TASK_LENGTHS = [10, 7, 4, 9]  # rank 0: 15 counted labels, rank 1: 11
REPLAY_LENGTHS = [12, 3, 9, 5, 11, 12, 4, 6]  # rank 0: 29 teacher rows, rank 1: 33
K = 4


def _llama(seed, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


class ReplayStep(torch.nn.Module):
    """The module to wrap in DDP or fully_shard: its forward returns the step's loss, so the base
    model runs inside the wrapper (hooks fire) and lm_head's forward never runs (no full logits)."""

    def __init__(self, lm, lam):
        super().__init__()
        self.lm, self.lam = lm, lam
        self.weight_types = []  # what fused_replay_kl was given as the lm_head weight, per call

    def forward(self, task, replay, task_tokens, replay_tokens, scale):
        base, weight = self.lm.model, self.lm.lm_head.weight
        self.weight_types.append(type(weight).__name__)
        # Task NLL: the label of position j + 1 is a k = 1 teacher with log-probability 0 at position j.
        hidden = base(input_ids=task["input_ids"], attention_mask=task["attention_mask"]).last_hidden_state
        labels = task["labels"][:, 1:]
        ids = labels.clamp_min(0)[..., None]
        nll = sf.fused_replay_kl(hidden[:, :-1], weight, ids, torch.zeros(ids.shape), mask=labels >= 0,
                                 reduction="sum")
        hidden = base(input_ids=replay["input_ids"], attention_mask=replay["attention_mask"]).last_hidden_state
        kl = sf.fused_replay_kl(hidden, weight, replay["teacher_ids"], replay["teacher_logprobs"],
                                mask=replay["mask"], teacher_tail_logprob=replay["teacher_tail_logprob"],
                                reduction="sum")
        loss = scale * (nll / task_tokens + self.lam * kl / replay_tokens)
        return loss, nll.detach(), kl.detach()


def _task_batch():
    g = torch.Generator().manual_seed(7)
    width = max(TASK_LENGTHS)
    ids = torch.randint(1, 48, (len(TASK_LENGTHS), width), generator=g)
    real = torch.arange(width)[None, :] < torch.tensor(TASK_LENGTHS)[:, None]
    return {"input_ids": torch.where(real, ids, 0), "attention_mask": real.long(),
            "labels": torch.where(real, ids, -100)}


def _replay_batch(replay_dir):
    replay = sf.ReplayBuffer.load(replay_dir)
    (batch,) = replay.batches(len(REPLAY_LENGTHS), shuffle=False)
    return {name: batch[name] for name in ("input_ids", "attention_mask", "teacher_ids", "teacher_logprobs",
                                           "teacher_tail_logprob", "mask")}


def _shard(batch, rank, world):
    rows = batch["input_ids"].shape[0] // world
    return {name: t[rank * rows:(rank + 1) * rows] for name, t in batch.items()}


def _counts(task, replay):
    return (task["labels"][:, 1:] >= 0).sum().double(), replay["mask"].sum().double()


def _step(step_module, params, task, replay, task_tokens, replay_tokens, scale, full=lambda t: t):
    """One forward/backward and one SGD step; returns (nll sum, kl sum, grads, params after) by name."""
    opt = torch.optim.SGD([p for _, p in params], lr=LR)
    loss, nll, kl = step_module(task, replay, task_tokens, replay_tokens, scale)
    loss.backward()
    grads = {name: full(p.grad).detach().clone() for name, p in params}
    opt.step()
    after = {name: full(p).detach().clone() for name, p in params}
    return nll, kl, grads, after


def _worker(rank, world, init_file, out_dir, replay_dir):
    dist = init_gloo(rank, world, init_file)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    task, replay = _shard(_task_batch(), rank, world), _shard(_replay_batch(replay_dir), rank, world)
    local = torch.stack(_counts(task, replay))
    counts = local.clone()
    dist.all_reduce(counts)  # the global divisors, the same on every rank
    mesh = init_device_mesh("cpu", (world,))
    failures, sums, results = [], {}, {}
    for strategy in ("ddp", "fsdp2"):
        for tied in (False, True):
            name = f"{strategy}/{'tied' if tied else 'untied'}"
            model = ReplayStep(_llama(0, tied), LAMBDA)
            if strategy == "ddp":
                wrapped = DDP(model)
            else:
                for layer in model.lm.model.layers:
                    fully_shard(layer, mesh=mesh)
                wrapped = fully_shard(model, mesh=mesh)  # the root group: embeddings, final norm, lm_head
                sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
                if len(sharded) != len(list(model.parameters())):
                    failures.append(f"{name}: parameters not all sharded: {sharded}")
            params = list(model.named_parameters())  # a tied lm_head appears once, as embed_tokens
            nll, kl, grads, after = _step(wrapped, params, task, replay, counts[0], counts[1], float(world), full)
            if model.weight_types != ["Parameter"]:  # FSDP2 hands forward the unsharded, plain weight
                failures.append(f"{name}: fused_replay_kl got lm_head weight of type {model.weight_types}")
            partial = torch.stack([nll, kl]).double()
            dist.all_reduce(partial)
            sums[name] = partial.tolist()
            results[name] = {"grads": grads, "after": after}

    # A lm_head in its own fully_shard group is still sharded outside its own forward: refused clearly.
    model = _llama(0, False)
    fully_shard(model.lm_head, mesh=mesh)
    hidden = torch.randn(3, 16, requires_grad=True)
    try:
        sf.fused_replay_kl(hidden, model.lm_head.weight, torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1))
        failures.append("a sharded DTensor lm_head weight was accepted")
    except ValueError as exc:
        if "DTensor" not in str(exc):
            failures.append(f"DTensor weight: unclear error {exc!r}")

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"failures": failures, "sums": sums, "local_counts": local.tolist()}, f)
    dist.destroy_process_group()


def _reference(replay_dir, tied):
    """The single-process step over the whole batch (scale 1: nothing to cancel)."""
    task, replay = _task_batch(), _replay_batch(replay_dir)
    task_tokens, replay_tokens = _counts(task, replay)
    model = ReplayStep(_llama(0, tied), LAMBDA)
    params = list(model.named_parameters())
    nll, kl, grads, after = _step(model, params, task, replay, task_tokens, replay_tokens, 1.0)
    before = {f"lm.{n}": p.detach() for n, p in _llama(0, tied).named_parameters()}
    # The fused k = 1 task NLL is the usual cross-entropy of the full logits (checked here only).
    logits = _llama(0, tied)(input_ids=task["input_ids"], attention_mask=task["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 48), task["labels"][:, 1:].reshape(-1),
                                           reduction="sum", ignore_index=-100)
    assert rel_err(nll, ce) <= TOL
    return [nll.item(), kl.item()], grads, after, before


@pytest.fixture(scope="module")
def replay_dir(tmp_path_factory):
    """A replay buffer of the teacher's top-k on text of uneven lengths (so the ranks' counts differ)."""
    out = tmp_path_factory.mktemp("replay") / "buffer"
    teacher = _llama(1, False).eval()
    g = torch.Generator().manual_seed(3)
    sequences = [torch.randint(1, 48, (n,), generator=g).tolist() for n in REPLAY_LENGTHS]
    with torch.inference_mode():
        sf.build_teacher_cache(teacher, sequences, K, str(out), progress=False)
    return str(out)


def test_ddp_and_fsdp2_match_one_process(replay_dir, tmp_path):
    spawn(_worker, WORLD, tmp_path, replay_dir)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, res in enumerate(ranks):
        assert not res["failures"], f"rank {r}:\n" + "\n".join(res["failures"])
    # The shards count different numbers of tokens: the reduction above is what makes this exact.
    assert ranks[0]["local_counts"] != ranks[1]["local_counts"]
    tensors = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for tied in (False, True):
        sums, grads, after, before = _reference(replay_dir, tied)
        assert ("lm.lm_head.weight" in grads) != tied  # tied: one parameter, named embed_tokens
        for strategy in ("ddp", "fsdp2"):
            name = f"{strategy}/{'tied' if tied else 'untied'}"
            for r in range(WORLD):
                assert ranks[r]["sums"][name] == pytest.approx(sums, rel=TOL), name
                got = tensors[r][name]
                assert got["grads"].keys() == grads.keys(), name
                for p in grads:
                    assert grads[p].abs().max() > 0, f"{name} {p}: zero reference gradient"
                    err = rel_err(got["grads"][p], grads[p])
                    assert err <= TOL, f"{name} rank {r} grad {p}: relative error {err:.2e}"
                    # The update to TOL, plus the fp32 rounding of p - lr * g (a parameter near 1, e.g. a
                    # norm weight, holds its update only to 2^-24 of the parameter).
                    update = (after[p] - before[p]).double().norm()
                    diff = (got["after"][p] - after[p]).double().norm()
                    bound = TOL * update + 2.0**-23 * after[p].double().norm()
                    assert diff <= bound, f"{name} rank {r} SGD step of {p}: {diff:.2e} > {bound:.2e}"
