"""``selfreplay demo``: forgetting, and its removal by self-generated replay, on a laptop CPU."""

from __future__ import annotations

import json
import os
from dataclasses import fields


def register(subparsers) -> None:
    from ..demo import DemoConfig

    defaults = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="pretrain a tiny model on prose, fine-tune it on code with and without self-generated replay",
        description=(
            "Runs the forgetting experiment small, with nothing downloaded: a tiny Llama-shaped byte model is "
            "pretrained on text A (English docstrings of the Python standard library), then fine-tuned on text B "
            "(the library's code) plainly and with self-generated replay + fused_replay_kl. Prints the table of "
            "losses and saves a plot."
        ),
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device, help="cpu or cuda (default: %(default)s)")
    p.add_argument("--out-dir", default=defaults.out_dir, help="where the plot and JSON go (default: %(default)s)")
    p.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    p.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps)
    p.add_argument("--finetune-lr", type=float, default=defaults.finetune_lr)
    p.add_argument("--replay-weight", type=float, default=defaults.replay_weight, help="lambda of the KL term")
    p.add_argument("--replay-sequences", type=int, default=defaults.replay_sequences)
    p.add_argument("--replay-top-k", type=int, default=defaults.replay_top_k)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per training window")
    p.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    p.add_argument("--num-layers", type=int, default=defaults.num_layers)
    p.add_argument("--num-heads", type=int, default=defaults.num_heads)
    p.add_argument("--no-low-lr", action="store_true", help="skip run (c), plain fine-tuning at a lower learning rate")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from ..demo import DemoConfig, format_table, run_demo

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("selfreplay demo: --device cuda was asked for but torch sees no CUDA device")
    names = {f.name for f in fields(DemoConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    cfg = DemoConfig(**overrides, progress=not args.no_progress)
    if args.no_low_lr:
        cfg.low_lr = None
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
