"""``selfreplay generate``: sample a replay buffer from a model into a directory (resumable)."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to an ``argparse`` subparsers object; sets ``handler=run``."""
    parser = subparsers.add_parser(
        "generate",
        help="sample replay sequences from a model and cache its top-k teacher",
        description=(
            "Sample sequences from MODEL (prompted with BOS alone unless --prompts-file is given) and record "
            "the model's top-k log-probs at every sampled position into a sharded replay buffer in OUT. "
            "Rerunning the same command resumes after the last complete shard."
        ),
    )
    parser.add_argument("--model", required=True, help="model path or name for AutoModelForCausalLM.from_pretrained")
    parser.add_argument("--out", required=True, help="output directory (created; a rerun resumes into it)")
    parser.add_argument("--num-sequences", type=int, required=True, help="sequences to generate")
    parser.add_argument("--max-new-tokens", type=int, required=True, help="generated tokens per sequence at most")
    parser.add_argument("--top-k", type=int, default=64, help="teacher log-probs kept per position (default 64)")
    parser.add_argument("--draft", default=None, help="draft model path for speculative decoding (same vocabulary)")
    parser.add_argument("--ngram-draft", action="store_true", help="speculative decoding with the model-free n-gram drafter")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="draft tokens per speculative step (default 4)")
    parser.add_argument("--batch-size", type=int, default=64, help="decode slots (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--shard-size", type=int, default=1024, help="sequences per shard, the unit of resumption (default 1024)")
    parser.add_argument("--sampled-draws", type=int, default=None, help="record a 'sampled' teacher of N draws instead of top-k")
    parser.add_argument("--logprob-dtype", choices=["float32", "float16"], default="float32", help="stored log-prob dtype")
    parser.add_argument("--prompts-file", default=None, help="text file, one prompt per line (default: BOS only)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)
    return parser


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # a bare model directory without tokenizer files: ids come from the config
        return None


def run(args) -> int:
    from ..generation import generate_replay, load_model_for_generation
    from ..replay_buffer import read_metadata

    if args.draft is not None and args.ngram_draft:
        raise SystemExit("selfreplay generate: pass either --draft or --ngram-draft, not both")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model_for_generation(args.model, device=device, dtype=dtype)
    tokenizer = _load_tokenizer(args.model)
    draft_model = load_model_for_generation(args.draft, device=device, dtype=dtype) if args.draft else None
    prompts = None
    if args.prompts_file is not None:
        with open(args.prompts_file, "r", encoding="utf-8") as handle:
            prompts = [line.rstrip("\n") for line in handle if line.strip()]
        if tokenizer is None:
            raise SystemExit(f"selfreplay generate: --prompts-file needs a tokenizer, and none loads from {args.model}")
    # The buffer is only written, never needed here: keep just the shard being generated in memory.
    generate_replay(
        model,
        num_sequences=args.num_sequences,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        batch_size=args.batch_size,
        temperature=args.temperature,
        prompts=prompts,
        draft_model=draft_model,
        drafter="ngram" if args.ngram_draft else None,
        num_draft_tokens=args.num_draft_tokens,
        seed=args.seed,
        out_dir=args.out,
        progress=not args.no_progress,
        shard_size=args.shard_size,
        tokenizer=tokenizer,
        sampled_draws=args.sampled_draws,
        logprob_dtype=args.logprob_dtype,
        keep_in_memory=False,
    )
    meta = read_metadata(args.out)
    summary = {"out": args.out, "sequences": meta["num_sequences"], "tokens": meta["num_tokens"], "k": meta["k"],
               "vocab_size": meta["vocab_size"], "complete": meta["complete"]}
    stats = meta.get("generation_stats") or {}  # absent when a rerun found the buffer already complete
    summary.update({key: value for key, value in stats.items() if value is not None})
    print(json.dumps(summary, sort_keys=True), file=sys.stdout)
    return 0
