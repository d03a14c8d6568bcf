"""Vocab-parallel ``fused_replay_kl(..., process_group=...)`` on 2 and 3 gloo ranks (CPU).

Each rank holds a contiguous, uneven vocabulary shard of the lm_head (V = 37 split 10/27 and 5/20/12).
One spawn per world size runs every case inside (spawning is slow); each rank compares its own loss,
full hidden gradient and weight/bias shard gradient with the float64 single-process reference on the
full weight (fp32: relative error <= 1e-4; float64: <= 1e-10) and writes its findings to a JSON file
that the test reads back, together with its losses (which must be bitwise equal on every rank).
"""

import json
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported anywhere (the spawned ranks included)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import selfreplay_fast as sf
from selfreplay_fast import replay_kl as rk

from dist_utils import init_gloo, spawn
from replay_cases import log_mass_outside, make_case, rel_err

VOCAB, DIM, K = 37, 8, 5
SHARDS = {2: (10, 27), 3: (5, 20, 12)}
MODES = ["tail", "sampled", "topk"]


def _pin_rows(case, world):
    """Rows whose ids all live in the first shard (filling it whole in the 3-rank split, so that its
    complement there is empty), all in the last shard, and spread over every shard."""
    teacher = case.extra["teacher"]
    n = teacher.shape[0]
    ids = case.teacher_ids.reshape(n, K).clone()
    lp = case.teacher_logprobs.reshape(n, K).double().clone()
    first = SHARDS[world][0]
    pinned = {2: list(range(min(K, first))), 3: list(range(VOCAB - K, VOCAB)), 4: [1, 7, 15, 30, 36]}
    for row, row_ids in pinned.items():
        ids[row] = torch.tensor(row_ids)
        lp[row] = teacher[row, row_ids]
        if case.mode == "sampled":  # sample frequencies sum to 1
            lp[row] = lp[row] - lp[row].logsumexp(-1)
    case.teacher_ids = ids.reshape(case.teacher_ids.shape)
    case.teacher_logprobs = torch.where(ids >= 0, lp, float("nan")).float().reshape(case.teacher_logprobs.shape)
    if case.teacher_tail_logprob is not None:
        case.teacher_tail_logprob = log_mass_outside(teacher, ids).float().reshape(case.teacher_tail_logprob.shape)
    if case.mask is not None:
        case.mask.view(-1)[list(pinned)] = True
    return case


def _run(fn, case, dtype, reduction, rows=None, weight_grad=True, **kw):
    """Loss and (hidden, weight, bias) gradients of sum(loss * grad_output); ``rows`` selects this
    rank's vocabulary shard of weight and bias."""
    rows = rows or slice(None)
    def leaf(t, grad):
        return t.detach().to(dtype, copy=True).requires_grad_(grad)

    h, w = leaf(case.hidden, True), leaf(case.weight[rows], weight_grad)
    b = leaf(case.bias[rows], True) if case.bias is not None else None
    ids, lp, tkw = case.teacher()
    loss = fn(h, w, ids, lp, bias=b, reduction=reduction, **tkw, **kw)
    g = torch.Generator().manual_seed(5)  # the same grad_output on every rank
    grad_out = (torch.rand(loss.shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(loss.dtype)
    (loss * grad_out).sum().backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _compare(name, got, expected, rows, tol, failures):
    for part, a, e in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], got, expected):
        if part in ("grad_weight", "grad_bias") and e is not None:
            e = e[rows]
        if e is None or a is None:
            if (e is None) != (a is None):
                failures.append(f"{name} {part}: got {a is not None}, expected {e is not None}")
            continue
        if a.shape != e.shape or not torch.isfinite(a).all():
            failures.append(f"{name} {part}: shape {tuple(a.shape)} vs {tuple(e.shape)} or non-finite")
            continue
        err = rel_err(a, e) if e.norm() > 0 else a.abs().max().item()
        if not err <= tol:
            failures.append(f"{name} {part}: relative error {err:.2e} > {tol:.0e}")


def _expect_error(name, call, match, failures):
    try:
        call()
    except ValueError as exc:
        if match not in str(exc):
            failures.append(f"{name}: ValueError {exc!r} does not mention {match!r}")
        return
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the other ranks must not hang
        failures.append(f"{name}: expected ValueError, got {exc!r}")
        return
    failures.append(f"{name}: no error raised")


def _worker(rank, world, init_file, out_dir):
    dist = init_gloo(rank, world, init_file)
    group = dist.new_group(list(range(world)))  # a group other than the default one
    sizes = SHARDS[world]
    offset = sum(sizes[:rank])
    rows = slice(offset, offset + sizes[rank])
    failures, losses = [], {}

    # --- errors first: every rank raises, and the ranks stay in step for the cases after them -----
    case = _pin_rows(make_case((3, 5), DIM, VOCAB, K, "tail", seed=1), world)
    for fn in (sf.fused_replay_kl, sf.reference_replay_kl):
        bad_ids = case.teacher_ids.clone()
        bad_ids.view(-1)[0] = VOCAB  # >= the global V = sum of the shard sizes
        h, w, b = case.hidden.float(), case.weight[rows].float(), case.bias[rows].float()
        lp = case.teacher_logprobs
        _expect_error(f"{fn.__name__} id >= V", lambda: fn(h, w, bad_ids, lp, bias=b, process_group=group),
                      "teacher_ids", failures)
        # An id beyond this rank's shard but inside the global vocabulary is fine.
        short_bias = b[:-1] if rank == world - 1 else b
        _expect_error(f"{fn.__name__} bias shard", lambda: fn(h, w, case.teacher_ids, lp, bias=short_bias,
                      process_group=group), "bias" if rank == world - 1 else f"rank(s) [{world - 1}]", failures)

    # --- every mode, reduction and impl, fp32, against the float64 reference on the full weight ---
    # Vocabulary tiles of 16 columns: the shards' partials passes then have different numbers of splits
    # (10/27: 1 and 2; 5/20/12: 1, 2, 1), which the ranks must gather evenly.
    from selfreplay_fast.kernels import vocab_pass

    vocab_pass.MAX_BLOCK_V_INTERPRETER = 16
    references = {}
    for mode in MODES:
        for reduction in ["mean", "sum", "none"]:
            for impl in ["torch", "triton"]:
                seed = 10 * MODES.index(mode) + ["mean", "sum", "none"].index(reduction)
                case = _pin_rows(make_case((3, 5), DIM, VOCAB, K, mode, seed=seed, temperature=0.7,
                                           bias=impl == "torch", with_tail=(mode == "tail" and reduction == "sum")),
                                 world)
                key = (mode, reduction, impl == "torch")
                if key not in references:
                    references[key] = _run(sf.reference_replay_kl, case, torch.float64, reduction)
                name = f"{mode}/{reduction}/{impl}"
                got = _run(sf.fused_replay_kl, case, torch.float32, reduction, rows, impl=impl, chunk_size=4,
                           process_group=group)
                _compare(name, got, references[key], rows, 1e-4, failures)
                losses[name] = got[0].double().reshape(-1).tolist()

    # --- float64: exact; a frozen weight; k = V (the complement empty on every rank) ---------------
    for mode in MODES:
        case = _pin_rows(make_case((3, 5), DIM, VOCAB, K, mode, seed=40 + MODES.index(mode), temperature=1.3), world)
        ref = _run(sf.reference_replay_kl, case, torch.float64, "none")
        got = _run(sf.fused_replay_kl, case, torch.float64, "none", rows, impl="torch", chunk_size=3,
                   process_group=group)
        _compare(f"{mode}/float64", got, ref, rows, 1e-10, failures)
        frozen = _run(sf.fused_replay_kl, case, torch.float64, "mean", rows, weight_grad=False, impl="torch",
                      chunk_size=6, process_group=group)
        _compare(f"{mode}/frozen weight", frozen, _run(sf.reference_replay_kl, case, torch.float64, "mean",
                 weight_grad=False), rows, 1e-10, failures)
        # The reference all-gathers the shards: the same result as on the full weight.
        sharded_ref = _run(sf.reference_replay_kl, case, torch.float64, "none", rows, process_group=group)
        _compare(f"{mode}/sharded reference", sharded_ref, ref, rows, 1e-12, failures)
    case = make_case((2, 3), DIM, VOCAB, VOCAB, "tail", seed=50, unused_slots=False)
    for impl in ["torch", "triton"]:
        got = _run(sf.fused_replay_kl, case, torch.float64, "sum", rows, impl=impl, process_group=group)
        _compare(f"k = V/{impl}", got, _run(sf.reference_replay_kl, case, torch.float64, "sum"), rows, 1e-10,
                 failures)

    # --- the default chunk size is the same on every rank, whatever its shard's size --------------
    case = _pin_rows(make_case((3, 5), DIM, VOCAB, K, "tail", seed=60), world)
    rk._CHUNK_BYTES["cpu"] = 4 * 4 * VOCAB  # about 4 rows of the largest shard
    got = _run(sf.fused_replay_kl, case, torch.float32, "mean", rows, impl="torch", process_group=group)
    _compare("default chunk size", got, _run(sf.reference_replay_kl, case, torch.float64, "mean"), rows, 1e-4,
             failures)

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"failures": failures, "losses": losses}, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(SHARDS))
def test_vocab_parallel_matches_one_process(world, tmp_path):
    spawn(_worker, world, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        assert not res["failures"], f"rank {r}:\n" + "\n".join(res["failures"])
    for res in results[1:]:  # every rank returns the same global loss, bit for bit
        assert res["losses"] == results[0]["losses"]
    assert len(results[0]["losses"]) == 18 and all(
        math.isfinite(x) for loss in results[0]["losses"].values() for x in loss
    )
