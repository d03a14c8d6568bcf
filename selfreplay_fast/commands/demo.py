"""``selfreplay demo``: forgetting, and its removal by self-generated replay, on a laptop CPU."""

from __future__ import annotations

import json
import os
from dataclasses import fields

from ._arguments import (
    UsageError, check_device, non_negative_float, non_negative_int, number_list, output_directory, positive_float,
    positive_int,
)


def check_model_shape(args) -> None:
    """What argparse cannot see alone: the demo model's shape and the teacher's k."""
    from ..demo_data import VOCAB_SIZE

    if args.seq_len < 2:
        raise UsageError(f"argument --seq-len: expected >= 2 (a window generates seq_len - 1 tokens), got {args.seq_len}")
    if args.replay_top_k > VOCAB_SIZE:
        raise UsageError(f"argument --replay-top-k: {args.replay_top_k} exceeds the byte vocabulary of {VOCAB_SIZE} tokens")
    if args.hidden_size % args.num_heads or (args.hidden_size // args.num_heads) % 2:
        raise UsageError(
            f"argument --num-heads: --hidden-size {args.hidden_size} / --num-heads {args.num_heads} must be an even "
            "whole number (the head dimension, which rotary embeddings split in halves)"
        )


def register(subparsers) -> None:
    from ..demo import DemoConfig
    from ..demo_data import VOCAB_SIZE

    defaults = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="pretrain a tiny model on prose, fine-tune it on code with and without self-generated replay",
        description=(
            "Runs the forgetting experiment small, with nothing downloaded: a tiny Llama-shaped byte model is "
            "pretrained on text A (English docstrings of the Python standard library), then fine-tuned on text B "
            "(the library's code) by `selfreplay audit`'s pilots: plainly and with self-generated replay + "
            "fused_replay_kl over a grid of learning rates x replay weights; the replay run is the one the audit's "
            "rule recommends, beside the NLL-replay baseline. Prints the table of losses and drift estimates and "
            "saves a plot."
        ),
    )
    p.add_argument("--seed", type=non_negative_int, default=defaults.seed, help="seed of data, models and sampling")
    p.add_argument("--device", default=defaults.device, help="cpu or cuda (default: %(default)s)")
    p.add_argument("--out-dir", type=output_directory, default=defaults.out_dir,
                   help="where the plot and JSON go (default: %(default)s)")
    p.add_argument("--pretrain-steps", type=non_negative_int, default=defaults.pretrain_steps,
                   help="optimizer steps of pretraining on A")
    p.add_argument("--finetune-steps", type=positive_int, default=defaults.finetune_steps,
                   help="optimizer steps of each fine-tune on B")
    p.add_argument("--learning-rates", type=number_list(positive_float),
                   default=",".join(f"{x:g}" for x in defaults.learning_rates),
                   help="the audit's fine-tuning learning rates, comma-separated")
    p.add_argument("--replay-weights", type=number_list(non_negative_float),
                   default=",".join(f"{x:g}" for x in defaults.replay_weights),
                   help="the audit's replay weights (lambda of the KL term), comma-separated, 0 included")
    p.add_argument("--max-task-cost", type=non_negative_float, default=defaults.max_task_cost,
                   help="the audit's rule: the loss on B above the best plain run still called little (a fraction)")
    p.add_argument("--min-drift-removed", type=positive_float, default=defaults.min_drift_removed,
                   help="the audit's rule: the fraction of the plain run's drift that counts as most of it")
    p.add_argument("--replay-sequences", type=positive_int, default=defaults.replay_sequences,
                   help="replay sequences sampled from the pretrained model")
    p.add_argument("--replay-top-k", type=positive_int, default=defaults.replay_top_k,
                   help=f"teacher slots per position, at most the byte vocabulary ({VOCAB_SIZE})")
    p.add_argument("--seq-len", type=positive_int, default=defaults.seq_len, help="tokens per training window (>= 2)")
    p.add_argument("--hidden-size", type=positive_int, default=defaults.hidden_size, help="model width")
    p.add_argument("--num-layers", type=positive_int, default=defaults.num_layers, help="model depth")
    p.add_argument("--num-heads", type=positive_int, default=defaults.num_heads, help="must divide --hidden-size")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..demo import DemoConfig, format_table, run_demo

    check_device(args.device)
    check_model_shape(args)
    names = {f.name for f in fields(DemoConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    cfg = DemoConfig(**overrides, progress=not args.no_progress)
    if 0 not in args.replay_weights:
        raise UsageError("argument --replay-weights: must include 0 (the plain runs)")
    cfg.learning_rates, cfg.replay_weights = tuple(args.learning_rates), tuple(args.replay_weights)
    result = run_demo(cfg)
    print(format_table(result))
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "demo_result.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result.to_dict(), f, indent=2)
    os.replace(tmp, path)
    print(f"results: {path}" + (f"; plot: {result.plot_path}" if result.plot_path else " (pip install matplotlib for the plot)"))
    return 0
