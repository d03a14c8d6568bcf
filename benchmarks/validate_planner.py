"""Predicted (selfreplay_fast/planner.py) vs measured peak memory of real replay training steps.

    python -m benchmarks.validate_planner                 # CUDA: presets (8B LoRA at 4096 x 4 when memory allows)
    python -m benchmarks.validate_planner --device cpu    # smoke test: tiny random Llama on the CPU

Each configuration builds a random-weight model from the preset's config (no download), adds LoRA
adapters (the planner's model of peft: fp32 adapters, input cast per adapted module) or trains every
weight, runs one warm-up step (so AdamW's states exist), resets the peak statistics and measures a
second step: forward, task NLL + replay KL, backward, optimizer step. "selfreplay-fast" computes both
losses with fused_replay_kl (the NLL as a k = 1 teacher); "naive" keeps a frozen teacher copy and
dense fp32 logits. Measured: torch.cuda.max_memory_allocated on CUDA; on the CPU, planner.LiveBytes
(storages created by ATen ops, kernel-internal temporaries excluded), with the planner's CPU chunk
size. A configuration predicted above 90% of the free GPU memory is skipped and recorded as such.
Writes benchmarks/results/planner_<device>.json with machine info.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time

import torch
import torch.nn as nn

from benchmarks.machine import machine_info, results_path, run_record, write_result
from selfreplay_fast import fused_replay_kl
from selfreplay_fast.replay_kl import vocab_chunk_rows
from selfreplay_fast.planner import (
    GiB, MiB, LiveBytes, ModelSpec, PlanConfig, load_model_spec, predict,
)

TINY = ModelSpec(name="tiny-llama", vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LoRALinear(nn.Module):
    """LoRA with peft's forward (the input cast to the adapter dtype in each adapted module)."""

    def __init__(self, base, rank, dtype):
        super().__init__()
        self.base = base
        self.A = nn.Linear(base.in_features, rank, bias=False, dtype=dtype, device=base.weight.device)
        self.B = nn.Linear(rank, base.out_features, bias=False, dtype=dtype, device=base.weight.device)
        nn.init.normal_(self.B.weight, std=0.02)

    def forward(self, x):
        out = self.base(x)
        return (out + self.B(self.A(x.to(self.A.weight.dtype))) * 2.0).to(out.dtype)


def build_model(spec: ModelSpec, cfg: PlanConfig, device):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                  num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                  num_key_value_heads=spec.num_key_value_heads, tie_word_embeddings=spec.tie_word_embeddings,
                  attn_implementation="sdpa", max_position_embeddings=max(cfg.seq_len, 2048))
    if spec.attention_bias:
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(head_dim=spec.head_dim, **common), LlamaForCausalLM
    dtype = TORCH_DTYPES[cfg.param_dtype]
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    model.train()
    if not cfg.full:
        model.requires_grad_(False)
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name in cfg.lora_targets:
                    if hasattr(parent, name):
                        setattr(parent, name, LoRALinear(getattr(parent, name), cfg.lora_rank, TORCH_DTYPES[cfg.lora_dtype]))
    if cfg.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_optimizer(model, cfg: PlanConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-5)
    if cfg.optimizer == "adamw-8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5)
    # fp32 parameters (adapters) keep fp32 states; the planner's "adamw" is 8 B per parameter
    return torch.optim.AdamW(params, lr=1e-5, foreach=True)


def make_batch(spec, cfg, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    S, V = cfg.seq_len, spec.vocab_size
    task = torch.randint(0, V, (cfg.batch, S), generator=g)
    replay = torch.randint(0, V, (cfg.replay_batch, S), generator=g)
    # cached top-k teacher: k distinct ids per position (int32) and log-probs (fp32) with mass 0.9
    ids = (torch.randint(0, V, (cfg.replay_batch, S, 1), generator=g) + torch.arange(cfg.k) * 7919) % V
    logp = torch.log_softmax(torch.randn(cfg.replay_batch, S, cfg.k, generator=g), -1) + torch.log(torch.tensor(0.9))
    return task.to(device), replay.to(device), ids.to(torch.int32).to(device), logp.to(device)


def _fused_pass(model, task, replay, ids, logp, chunk):
    weight = model.lm_head.weight
    n_task = task.shape[0]
    hidden = model.model(input_ids=torch.cat([task, replay])).last_hidden_state
    loss = hidden.new_zeros((), dtype=torch.float32)
    if n_task:
        labels = task.roll(-1, dims=1)  # next-token labels (memory-wise identical to a real shift)
        zeros = torch.zeros(labels.shape + (1,), dtype=torch.float32, device=labels.device)
        loss = loss + fused_replay_kl(hidden[:n_task], weight, labels[..., None], zeros, chunk_size=chunk)
    if replay.shape[0]:
        loss = loss + fused_replay_kl(hidden[n_task:], weight, ids, logp, chunk_size=chunk)
    loss.backward()


def _naive_pass(model, teacher, task, replay):
    import torch.nn.functional as F

    n_task = task.shape[0]
    teacher_logp = None
    if replay.shape[0]:
        with torch.no_grad():
            teacher_logp = teacher.lm_head(teacher.model(input_ids=replay).last_hidden_state).float().log_softmax(-1)
    hidden = model.model(input_ids=torch.cat([task, replay])).last_hidden_state
    logp = model.lm_head(hidden).float().log_softmax(-1)
    loss = logp.new_zeros(())
    if n_task:
        loss = loss + F.nll_loss(logp[:n_task].flatten(0, 1), task.roll(-1, dims=1).flatten())
    if teacher_logp is not None:
        loss = loss + F.kl_div(logp[n_task:], teacher_logp, log_target=True, reduction="batchmean")
    del teacher_logp
    loss.backward()


def run_step(method, model, teacher, opt, cfg, batch, chunk):
    """One step: a joint pass over task + replay sequences, or (micro_batch m) passes of at most m
    task or m replay sequences with gradients accumulated; then the optimizer step."""
    task, replay, ids, logp = batch

    def one_pass(t, r, i, lp):
        if method == "fused":
            _fused_pass(model, t, r, i, lp, chunk)
        else:
            _naive_pass(model, teacher, t, r)

    if cfg.micro_batch is None:
        one_pass(task, replay, ids, logp)
    else:
        m = cfg.micro_batch
        for t0 in range(0, cfg.batch, m):
            one_pass(task[t0:t0 + m], replay[:0], ids[:0], logp[:0])
        for r0 in range(0, cfg.replay_batch, m):
            one_pass(task[:0], replay[r0:r0 + m], ids[r0:r0 + m], logp[r0:r0 + m])
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(spec, cfg, method, device):
    cfg = cfg.validated()
    chunk_bytes = cfg.chunk_bytes if device == "cuda" else 32 * MiB
    chunk = vocab_chunk_rows(sys.maxsize, spec.vocab_size, device, budget=chunk_bytes)  # the dispatcher's rows
    model = build_model(spec, cfg, device)
    teacher = None
    if method == "naive":
        teacher = copy.deepcopy(model).requires_grad_(False).eval() if cfg.full else build_model(
            spec, PlanConfig(param_dtype=cfg.param_dtype, lora_rank=None, checkpointing=False), device).requires_grad_(False).eval()
    opt = make_optimizer(model, cfg)
    batch = make_batch(spec, cfg, device)
    run_step(method, model, teacher, opt, cfg, batch, chunk)  # warm-up: optimizer states exist from now on
    gc.collect()
    t0 = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run_step(method, model, teacher, opt, cfg, batch, chunk)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        resident = sum(t.untyped_storage().nbytes() for t in _resident_tensors(model, teacher, opt, batch))
        with LiveBytes() as live:
            run_step(method, model, teacher, opt, cfg, batch, chunk)
        peak = resident + live.peak
    seconds = time.perf_counter() - t0
    del model, teacher, opt, batch
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return peak, seconds


def _resident_tensors(model, teacher, opt, batch):
    seen, out = set(), []
    tensors = list(model.parameters()) + list(model.buffers()) + list(batch)
    if teacher is not None:
        tensors += list(teacher.parameters()) + list(teacher.buffers())
    tensors += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def configurations(device):
    if device == "cpu":
        base = PlanConfig(seq_len=64, batch=4, replay_batch=2, k=8, lora_rank=4, chunk_bytes=32 * MiB)
        return [("tiny", base, m) for m in ("fused", "naive")] + [
            ("tiny", PlanConfig(seq_len=64, batch=4, replay_batch=2, k=8, lora_rank=4, checkpointing=False), "fused"),
            ("tiny", PlanConfig(seq_len=64, batch=4, replay_batch=2, k=8, lora_rank=None, param_dtype="fp32"), "fused"),
            ("tiny", PlanConfig(seq_len=64, batch=4, replay_batch=2, k=8, lora_rank=4, micro_batch=1), "fused"),
        ]
    goal = PlanConfig(seq_len=4096, batch=4, replay_batch=2, k=64, lora_rank=16, checkpointing=True)
    return [
        ("llama-3.2-1b", PlanConfig(seq_len=2048, batch=2, replay_batch=1), "fused"),
        ("llama-3.2-1b", PlanConfig(seq_len=2048, batch=2, replay_batch=1), "naive"),
        ("llama-3.2-1b", PlanConfig(seq_len=2048, batch=2, replay_batch=1, checkpointing=False), "fused"),
        ("llama-3.1-8b", PlanConfig(**{**goal.__dict__, "micro_batch": 2}), "fused"),
        ("llama-3.1-8b", PlanConfig(**{**goal.__dict__, "micro_batch": 1}), "fused"),
        ("llama-3.1-8b", goal, "fused"),
        ("llama-3.1-8b", PlanConfig(**{**goal.__dict__, "micro_batch": 1}), "naive"),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default=None, help="run only configurations whose model name contains this")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("validate_planner: --device cuda but torch sees no CUDA device")
    rows = []
    out = {"machine": machine_info(args.device), "run": run_record(False, f"--only {args.only}" if args.only else None),
           "device": args.device,
           "measured_by": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "planner.LiveBytes + resident tensors",
           "rows": rows}
    path = results_path(f"planner_{args.device}")
    print(f"{'model':<14}{'method':<8}{'config':<58}{'predicted GiB':>14}{'measured GiB':>14}{'ratio':>8}")
    for name, cfg, method in configurations(args.device):
        if args.only and args.only not in name:
            continue
        spec = TINY if name == "tiny" else load_model_spec(name)
        cfg = cfg.validated()
        pred = predict(spec, cfg, "fused" if method == "fused" else "naive")
        label = (f"S={cfg.seq_len} B={cfg.batch}+{cfg.replay_batch} k={cfg.k} "
                 f"{'full' if cfg.full else 'lora' + str(cfg.lora_rank)} ckpt={int(cfg.checkpointing)} "
                 f"mb={cfg.micro_batch}")
        row = dict(model=spec.name, method=method, config=label, predicted_allocated=pred.allocated,
                   predicted_parts=pred.parts, predicted_phase=pred.phase)
        if rows:
            write_result(path, out)  # the rows so far: a run stopped by a time limit keeps what it measured
        if args.device == "cuda":
            gc.collect()  # the previous configuration's model and optimizer, also after a failure
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info()
            if pred.allocated > 0.9 * free:
                row.update(measured=None, skipped=f"predicted {pred.allocated / GiB:.1f} GiB > 90% of free {free / GiB:.1f} GiB")
                rows.append(row)
                print(f"{spec.name[-14:]:<14}{method:<8}{label:<58}{pred.allocated / GiB:>14.2f}{'skipped':>14}")
                continue
        try:
            peak, seconds = measure(spec, cfg, method, args.device)
        except Exception as exc:  # recorded, and the next configuration runs (the traceback is dropped here)
            kind = "OOM" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
            row.update(measured=None, error=f"{kind}: {exc}"[:300])
            rows.append(row)
            print(f"{spec.name[-14:]:<14}{method:<8}{label:<58}{pred.allocated / GiB:>14.2f}{kind[:13]:>14}")
            continue
        row.update(measured=peak, ratio=peak / pred.allocated, step_seconds=seconds)
        rows.append(row)
        print(f"{spec.name[-14:]:<14}{method:<8}{label:<58}{pred.allocated / GiB:>14.3f}{peak / GiB:>14.3f}"
              f"{peak / pred.allocated:>8.2f}")
    write_result(path, out)
    print(f"results: {path}")
    return 0 if not any("error" in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
