"""The forgetting experiment of Marek et al. (2026), small enough for a laptop CPU.

1. Pretrain a tiny Llama-shaped byte-level model on text A (English prose: standard-library docstrings).
2. Fine-tune it on text B (Python code: the same library's source without docstrings):
   (a) plainly, (b) with self-generated replay — ``generate_replay`` samples text from the pretrained
   model itself, prompted with BOS alone, recording its top-k distribution, and every fine-tuning step
   adds lambda * ``fused_replay_kl`` (tail mode) toward that cached teacher — and optionally (c) plainly
   at a lower learning rate.
3. Report the loss on held-out A before and after (the forgetting) and on held-out B after.

Every loss here, the task's too, goes through ``fused_replay_kl``: a label is a k = 1 teacher with
probability 1, for which the tail-mode KL is exactly the cross-entropy. No full logits are kept.
"""

from __future__ import annotations

import copy
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from .demo_data import BOS, EOS, VOCAB_SIZE, TextSplit, evaluation_windows, load_texts, random_windows, split
from .model_glue import ReplayKLLoss, task_nll


@dataclass
class DemoConfig:
    seed: int = 0
    device: str = "cpu"
    seq_len: int = 64
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    finetune_steps: int = 200
    finetune_lr: float = 3e-3
    low_lr: Optional[float] = 3e-4  # run (c) at this learning rate; None skips it
    batch_size: int = 16
    replay_batch_size: int = 8  # the paper: about half the task batch
    replay_weight: float = 2.5  # lambda; the paper used 1 to 10
    replay_sequences: int = 384
    replay_top_k: int = 16
    eval_windows: int = 48
    eval_every: int = 25
    out_dir: str = "selfreplay_demo"
    progress: bool = True


@dataclass
class RunResult:
    name: str
    loss_a: float
    loss_b: float
    curve_steps: List[int] = field(default_factory=list)
    curve_a: List[float] = field(default_factory=list)
    curve_b: List[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class DemoResult:
    config: DemoConfig
    before_a: float
    before_b: float
    runs: Dict[str, RunResult]
    replay_tokens: int
    replay_seconds: float
    peak_memory_bytes: int
    total_seconds: float
    plot_path: Optional[str] = None

    def forgetting(self, run: str) -> float:
        return self.runs[run].loss_a - self.before_a

    def forgetting_removed(self, run: str = "replay") -> float:
        """Fraction of plain fine-tuning's forgetting that ``run`` avoids."""
        return 1.0 - self.forgetting(run) / self.forgetting("plain")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["forgetting_removed"] = self.forgetting_removed()
        d["loss_b_vs_plain"] = self.runs["replay"].loss_b / self.runs["plain"].loss_b - 1.0
        return d


def build_model(cfg: DemoConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=cfg.hidden_size, intermediate_size=3 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(256, cfg.seq_len), bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config).to(cfg.device)


def next_token_loss(model, windows: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of every next byte, as fused_replay_kl against a k = 1 teacher (the label)."""
    return task_nll(model, windows, reduction=reduction)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total = sum(next_token_loss(model, windows[i : i + batch], "sum").item() for i in range(0, len(windows), batch))
    model.train()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def _bar(total, desc, cfg):
    return tqdm(total=total, desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)


def pretrain(model, text: TextSplit, cfg: DemoConfig) -> None:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(cfg.pretrain_steps))
    with _bar(cfg.pretrain_steps, "pretrain on A (prose)", cfg) as bar:
        for _ in range(cfg.pretrain_steps):
            batch = random_windows(text.train, cfg.batch_size, cfg.seq_len, g).to(cfg.device)
            loss = next_token_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()


def _warmup_cosine(steps: int, warmup: int = 20):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def finetune(model, name: str, text_b: TextSplit, eval_a, eval_b, cfg: DemoConfig, lr: float, replay=None) -> RunResult:
    """Fine-tune on B; with ``replay`` (a ReplayBuffer) add replay_weight * KL on a replay batch."""
    g = torch.Generator().manual_seed(cfg.seed + 2)  # the same task batches for every run
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    result = RunResult(name, math.nan, math.nan)
    replay_iter = _cycle_batches(replay, cfg) if replay is not None else None
    replay_kl = ReplayKLLoss(mode="tail")
    start = time.perf_counter()
    with _bar(cfg.finetune_steps, f"fine-tune on B: {name}", cfg) as bar:
        for step in range(cfg.finetune_steps + 1):
            if step % cfg.eval_every == 0 or step == cfg.finetune_steps:
                result.curve_steps.append(step)
                result.curve_a.append(evaluate(model, eval_a))
                result.curve_b.append(evaluate(model, eval_b))
            if step == cfg.finetune_steps:
                break
            batch = random_windows(text_b.train, cfg.batch_size, cfg.seq_len, g).to(cfg.device)
            loss = next_token_loss(model, batch)
            postfix = {"task": f"{loss.item():.3f}"}
            if replay_iter is not None:
                kl = replay_kl(model, next(replay_iter))
                loss = loss + cfg.replay_weight * kl
                postfix["replay_kl"] = f"{kl.item():.4f}"
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(postfix)
            bar.update()
    result.loss_a, result.loss_b = result.curve_a[-1], result.curve_b[-1]
    result.seconds = time.perf_counter() - start
    return result


def _cycle_batches(buffer, cfg: DemoConfig):
    epoch = 0
    while True:
        for batch in buffer.batches(cfg.replay_batch_size, shuffle=True, seed=cfg.seed + epoch, device=cfg.device):
            yield batch
        epoch += 1


def _peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_demo(cfg: DemoConfig) -> DemoResult:
    from .generation import generate_replay

    start = time.perf_counter()
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    prose, code = load_texts()
    text_a, text_b = split(prose), split(code)
    eval_a = evaluation_windows(text_a.heldout, cfg.eval_windows, cfg.seq_len).to(cfg.device)
    eval_b = evaluation_windows(text_b.heldout, cfg.eval_windows, cfg.seq_len).to(cfg.device)

    model = build_model(cfg)
    pretrain(model, text_a, cfg)
    before_a, before_b = evaluate(model, eval_a), evaluate(model, eval_b)

    replay_start = time.perf_counter()
    model.eval()
    replay = generate_replay(
        model, num_sequences=cfg.replay_sequences, max_new_tokens=cfg.seq_len - 1, top_k=cfg.replay_top_k,
        batch_size=min(64, cfg.replay_sequences), seed=cfg.seed, progress=cfg.progress,
    )
    model.train()
    replay_seconds = time.perf_counter() - replay_start
    replay_tokens = int((replay.lengths - 1).clamp_min(0).sum())

    runs = {}
    plans = [("plain", cfg.finetune_lr, None), ("replay", cfg.finetune_lr, replay)]
    if cfg.low_lr is not None:
        plans.append((f"plain, lr {cfg.low_lr:g}", cfg.low_lr, None))
    for name, lr, buf in plans:
        runs[name] = finetune(copy.deepcopy(model), name, text_b, eval_a, eval_b, cfg, lr, buf)

    result = DemoResult(cfg, before_a, before_b, runs, replay_tokens, replay_seconds, _peak_memory(cfg.device),
                        time.perf_counter() - start)
    os.makedirs(cfg.out_dir, exist_ok=True)
    result.plot_path = plot(result, os.path.join(cfg.out_dir, "demo_losses.png"))
    return result


def format_table(result: DemoResult) -> str:
    lines = [
        "| run | loss on A (prose) | forgetting | loss on B (code) | forgetting removed |",
        "|---|---|---|---|---|",
        f"| pretrained | {result.before_a:.3f} | - | {result.before_b:.3f} | - |",
    ]
    for name, run in result.runs.items():
        removed = "-" if name == "plain" else f"{result.forgetting_removed(name):.0%}"
        lines.append(f"| {name} | {run.loss_a:.3f} | {result.forgetting(name):+.3f} | {run.loss_b:.3f} | {removed} |")
    replay, plain = result.runs["replay"], result.runs["plain"]
    lines += [
        "",
        f"loss on B with replay vs plain: {replay.loss_b / plain.loss_b - 1:+.1%}",
        f"replay: {result.replay_tokens} tokens generated in {result.replay_seconds:.1f} s",
        f"peak memory: {result.peak_memory_bytes / 2**20:.0f} MiB ({'GPU' if result.config.device.startswith('cuda') else 'process RSS'})",
        f"total time: {result.total_seconds:.0f} s",
    ]
    return "\n".join(lines)


def plot(result: DemoResult, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for name, run in result.runs.items():
        axes[0].plot(run.curve_steps, run.curve_a, marker="o", ms=3, label=name)
        axes[1].plot(run.curve_steps, run.curve_b, marker="o", ms=3, label=name)
    axes[0].axhline(result.before_a, color="gray", ls="--", lw=1, label="before fine-tuning")
    axes[0].set_title("held-out loss on A (prose): forgetting")
    axes[1].set_title("held-out loss on B (code): learning")
    for ax in axes:
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("nats per byte")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
