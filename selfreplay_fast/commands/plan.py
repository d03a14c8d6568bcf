"""``selfreplay plan``: predicted peak GPU memory of a replay fine-tuning step, naive vs selfreplay-fast."""

from __future__ import annotations

import argparse
import json

from ._arguments import UsageError, positive_float


def register(subparsers) -> None:
    from ..planner import DEFAULT_CHUNK_BYTES, LINEAR_MODULES, MiB, OPTIMIZERS, PRESETS

    p = subparsers.add_parser(
        "plan",
        help="predict the peak GPU memory of a replay fine-tuning step (naive replay-KL vs selfreplay-fast)",
        description=(
            "Memory model of one training step with a replay KL (formulas and assumptions: "
            "selfreplay_fast/planner.py). Naive: a frozen teacher copy + dense fp32 logits; selfreplay-fast: "
            "a cached top-k teacher and fused_replay_kl's chunked buffers. Predictions, pending GPU validation "
            "(benchmarks/validate_planner.py)."
        ),
    )
    p.add_argument("--model", required=True, help=f"a preset ({', '.join(PRESETS)}) or a local HF config.json / model directory")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="task sequences per step")
    p.add_argument("--replay-batch", type=int, default=None, help="replay sequences per step (default: batch // 2, at least 1)")
    p.add_argument("--k", type=int, default=64, help="cached teacher slots per position")
    train = p.add_mutually_exclusive_group()
    train.add_argument("--lora-rank", type=int, default=16, help="LoRA adapter rank")
    train.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--lora-targets", default=",".join(LINEAR_MODULES), help="comma-separated linear layers with adapters")
    p.add_argument("--lora-dtype", default="fp32", help="adapter dtype (peft keeps fp32 adapters by default)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True, help="gradient checkpointing")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="optimizer whose states are counted")
    p.add_argument("--dtype", default="bf16", help="parameter (and activation) dtype: bf16, fp16 or fp32")
    p.add_argument("--chunk-mib", type=positive_float, default=DEFAULT_CHUNK_BYTES / MiB, help="fused_replay_kl's fp32 logits chunk")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="gradient accumulation: at most this many sequences per forward/backward pass (default: one joint pass)")
    p.add_argument("--budget-gb", type=positive_float, default=24.0, help="GPU memory budget in GiB (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--markdown", action="store_true", help="the table as markdown")
    p.set_defaults(handler=run)


def config_from_args(args):
    from ..planner import MiB, PlanConfig

    return PlanConfig(
        seq_len=args.seq_len, batch=args.batch, replay_batch=args.replay_batch, k=args.k,
        lora_rank=None if args.full else args.lora_rank,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        lora_dtype=args.lora_dtype, checkpointing=args.checkpointing, optimizer=args.optimizer,
        param_dtype=args.dtype, chunk_bytes=int(args.chunk_mib * MiB),
        micro_batch=args.micro_batch, budget_gib=args.budget_gb,
    ).validated()


def run(args) -> int:
    from ..planner import describe, fit_flags, format_table, load_model_spec, plan, plan_dict, predict, suggest_fit

    try:
        spec = load_model_spec(args.model)
        cfg = config_from_args(args)
    except ValueError as exc:  # the planner's messages name the argument
        raise UsageError(str(exc)) from None
    preds = plan(spec, cfg)
    fix = None if preds["selfreplay-fast"].fits else suggest_fit(spec, cfg)
    if args.json:
        out = plan_dict(spec, cfg, preds)
        if fix is not None:
            out["fits_with"] = {"flags": fit_flags(cfg, fix), "description": describe(fix),
                                "total": predict(spec, fix, "fused").total}
        print(json.dumps(out, indent=2))
        return 0
    print(format_table(spec, cfg, preds, markdown=args.markdown))
    if not preds["selfreplay-fast"].fits:
        if fix is None:
            print("selfreplay-fast does not fit the budget under any of the settings tried "
                  "(checkpointing, micro-batches of 2 and 1, adapters in the parameter dtype)")
        else:
            print(f"selfreplay-fast fits with {fit_flags(cfg, fix)}: {describe(fix)} "
                  f"(total {predict(spec, fix, 'fused').total / (1 << 30):.2f} GiB)")
    print("Predictions (estimates pending GPU validation: benchmarks/validate_planner.py); formulas in selfreplay_fast/planner.py.")
    return 0
