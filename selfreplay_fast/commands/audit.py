"""``selfreplay audit``: pilot fine-tunes over learning rates x replay weights, and whether replay will save you."""

from __future__ import annotations

import argparse

from ._arguments import (
    UsageError, check_device, existing_directory, existing_file, non_negative_float, non_negative_int, number_list,
    output_directory, positive_float, positive_int,
)

_DTYPES = ("float32", "bfloat16", "float16")


def _fraction(text: str) -> float:
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def register(subparsers) -> None:
    from ..audit import DEFAULT_REPLAY_WEIGHTS
    from ..model_glue import REPLAY_LOSSES

    p = subparsers.add_parser(
        "audit",
        help="pilot fine-tunes over learning rates x replay weights: will replay save this model from forgetting?",
        description=(
            "Short pilot fine-tunes of --model on a slice of --data over a grid of learning rates x replay weights "
            "(0 included), each measured by its held-out task loss and its drift from the original model (the KL to "
            "the cached teacher on held-out replay). Prints a table and a verdict: the learning rate and replay "
            "weight where replay removes most of the drift at little task cost, or the warning that the drift "
            "cannot be removed without a large task cost (capacity-bound). Writes audit.json, audit_table.md and "
            "audit_tradeoff.png to --out-dir; a rerun skips the cells already done."
        ),
    )
    p.add_argument("--model", required=True, type=existing_directory, help="Hugging Face model directory")
    p.add_argument("--data", required=True, type=existing_file,
                   help="task data, .jsonl: one {\"text\": ...} (needs the model's tokenizer) or {\"input_ids\": [...]} a line")
    p.add_argument("--replay", type=existing_directory, default=None,
                   help="replay buffer directory (default: generate replay from the model, BOS prompts, into OUT_DIR/replay)")
    p.add_argument("--out-dir", type=output_directory, default="selfreplay_audit", help="the audit's own directory")
    p.add_argument("--lora", action="store_true", help="pilots with LoRA adapters (peft) instead of full fine-tuning")
    p.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank, with --lora")
    p.add_argument("--learning-rates", type=number_list(positive_float), default=None,
                   help="comma-separated (default: 1e-5,3e-5,1e-4 full; 1e-4,3e-4,1e-3 with --lora)")
    p.add_argument("--replay-weights", type=number_list(non_negative_float),
                   default=",".join(f"{w:g}" for w in DEFAULT_REPLAY_WEIGHTS),
                   help="comma-separated replay weights, 0 included")
    p.add_argument("--replay-loss", choices=REPLAY_LOSSES, default="kl", help="the replay term")
    p.add_argument("--steps", type=positive_int, default=100, help="optimizer steps per pilot")
    p.add_argument("--batch-size", type=positive_int, default=8, help="task sequences per step")
    p.add_argument("--replay-batch-size", type=positive_int, default=None,
                   help="replay sequences per step (default: half the task batch)")
    p.add_argument("--task-holdout", type=_fraction, default=0.2, help="fraction of --data held out for the task loss")
    p.add_argument("--replay-holdout", type=_fraction, default=0.25, help="fraction of the replay held out for the drift")
    p.add_argument("--replay-sequences", type=positive_int, default=256, help="replay sequences to generate")
    p.add_argument("--replay-max-new-tokens", type=positive_int, default=128, help="tokens per generated sequence")
    p.add_argument("--replay-top-k", type=positive_int, default=32, help="teacher slots per generated position")
    p.add_argument("--max-length", type=positive_int, default=512, help="task sequences are cut to this many tokens")
    p.add_argument("--max-task-cost", type=non_negative_float, default=0.01,
                   help="verdict: the task-loss increase over the best plain run still called little (a fraction)")
    p.add_argument("--min-drift-removed", type=_fraction, default=0.8,
                   help="verdict: the fraction of the plain run's drift that counts as most of it")
    p.add_argument("--seed", type=non_negative_int, default=0, help="splits, batch order, LoRA init, generated replay")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu or cuda")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype the model's weights are loaded in")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from ..audit import audit
    from ._model_dir import check_top_k, hub_progress_bars, read_model_config

    device = check_device(None if args.device == "auto" else args.device)
    config = read_model_config(args.model)
    if args.replay is None:
        check_top_k(args.replay_top_k, config, "--replay-top-k")
    if 0 not in args.replay_weights:
        raise UsageError(f"argument --replay-weights: must include 0 (the plain runs the verdict compares with), "
                         f"got {','.join(f'{w:g}' for w in args.replay_weights)}")
    if not args.data.endswith(".jsonl"):
        raise UsageError(f"argument --data: expected a .jsonl file, got {args.data}")
    with hub_progress_bars(not args.no_progress):
        result = audit(
            args.model, args.data, out_dir=args.out_dir, replay=args.replay, lora=args.lora, lora_rank=args.lora_rank,
            learning_rates=args.learning_rates, replay_weights=args.replay_weights, replay_loss=args.replay_loss,
            steps=args.steps, batch_size=args.batch_size, replay_batch_size=args.replay_batch_size,
            task_holdout=args.task_holdout, replay_holdout=args.replay_holdout, replay_sequences=args.replay_sequences,
            replay_max_new_tokens=args.replay_max_new_tokens, replay_top_k=args.replay_top_k,
            max_length=args.max_length, max_task_cost=args.max_task_cost, min_drift_removed=args.min_drift_removed,
            seed=args.seed, device=device, dtype=getattr(torch, args.dtype), progress=not args.no_progress,
        )
    print(result.table)
    print(f"results: {result.json_path}" + (f"; plot: {result.plot_path}" if result.plot_path
                                             else " (pip install matplotlib for the plot)"))
    return 0
