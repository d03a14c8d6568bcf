"""``selfreplay cache``: a teacher cache of existing text (real replay data, or the fine-tuning data)."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache",
        help="record a model's top-k teacher at every token of a JSONL corpus",
        description=(
            "Runs the model over every sequence of --data (JSONL: one object per line with \"input_ids\" (a list "
            "of token ids) or \"text\" (tokenized with the model directory's tokenizer)) and writes its top-k "
            "log-probs and tail mass at every position to a replay buffer in --out. Rerunning the same command "
            "resumes after the last complete shard."
        ),
    )
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", required=True, help="JSONL file")
    p.add_argument("--out", required=True, help="output directory (a rerun resumes into it)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=None, help="truncate sequences to this many tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run)


def read_jsonl_sequences(path: str, tokenizer_source=None, max_length=None):
    """Token-id lists from a JSONL file of {"input_ids": [...]} or {"text": "..."} objects."""
    tokenizer = None
    sequences = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not ({"input_ids", "text"} & set(record)):
                raise ValueError(f'{path}:{line_no}: expected an object with "input_ids" or "text"')
            if "input_ids" in record:
                ids = record["input_ids"]
                if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                    raise ValueError(f'{path}:{line_no}: "input_ids" must be a list of integers')
            else:
                if tokenizer is None:
                    if tokenizer_source is None:
                        raise ValueError(f'{path}:{line_no}: "text" needs a tokenizer (none given)')
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
                ids = tokenizer(record["text"])["input_ids"]
            if max_length is not None:
                ids = ids[:max_length]
            if ids:
                sequences.append(ids)
    if not sequences:
        raise ValueError(f"{path}: no sequences found")
    return sequences


def run(args) -> int:
    import torch

    from ..generation import load_model_for_generation
    from ..teacher_cache import build_teacher_cache

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model_for_generation(args.model, device=args.device, dtype=dtype)
    sequences = read_jsonl_sequences(args.data, args.model, args.max_length)
    buffer = build_teacher_cache(
        model, sequences, args.top_k, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
        temperature=args.temperature, progress=not args.no_progress,
    )
    print(json.dumps({"out": args.out, "sequences": len(buffer), "teacher_rows": buffer.num_teacher_rows,
                      "k": buffer.k, "vocab_size": buffer.vocab_size}))
    return 0
