"""``selfreplay cache``: a teacher cache of existing text (real replay data, or the fine-tuning data)."""

from __future__ import annotations

import json
import sys
import time

from ._arguments import (
    UsageError, check_device, existing_directory, existing_file, non_negative_int, output_directory, positive_float,
    positive_int,
)
from ._buffer_progress import (
    buffer_totals, interrupted_note, new_shard_entries, read_buffer_metadata, resume_line, shard_entries, sum_entries,
)
from ._model_dir import check_token_ids, check_top_k, hub_progress_bars, read_model_config
from .generate import _data_parallel_rank, _json_object

SETTINGS_KEY = "teacher_cache"  # where build_teacher_cache keeps its settings in metadata.json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache",
        help="record a model's top-k teacher at every token of a JSONL corpus",
        description=(
            "Runs the model over every sequence of --data (JSONL: one object per line with \"input_ids\" (a list "
            "of token ids) or \"text\" (tokenized with the model directory's tokenizer)) and writes its top-k "
            "log-probs and tail mass at every position to a replay buffer in --out. Rerunning the same command "
            "resumes after the last complete shard (also after Ctrl-C)."
        ),
    )
    p.add_argument("--model", required=True, type=existing_directory, help="local Hugging Face model directory")
    p.add_argument("--data", required=True, type=existing_file, help="JSONL file")
    p.add_argument("--out", required=True, type=output_directory, help="output directory (a rerun resumes into it)")
    p.add_argument("--top-k", type=positive_int, default=64, help="teacher log-probs kept per position")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    p.add_argument("--shard-size", type=positive_int, default=1024,
                   help="sequences per shard, the unit of resumption")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="the model's logits are divided by it")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="truncate sequences to this many tokens (default: no truncation)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--backend", choices=["native", "vllm"], default="native",
                   help="native: the model's forward pass here; vllm: a vllm.LLM engine's prompt log-probs (needs vllm "
                        "installed; temperature 1 only) (default native)")
    p.add_argument("--vllm-engine-args", type=_json_object, default=None,
                   help='with --backend vllm, extra vllm.LLM arguments as a JSON object (default: none)')
    p.add_argument("--logprob-dtype", choices=["float32", "float16"], default="float16",
                   help="stored log-prob dtype (float16: half the bytes, loss within 1e-3; see docs/design.md)")
    p.add_argument("--rank", type=non_negative_int, default=None,
                   help="data parallel: this process's rank, 0 to --world-size - 1 (default: $RANK, as torchrun sets it)")
    p.add_argument("--world-size", type=positive_int, default=None,
                   help="data parallel: how many processes fill OUT together, each computing its own shards; the "
                        "buffer equals a single-process run's (default: $WORLD_SIZE, else 1)")
    p.set_defaults(handler=run, on_interrupt=saved_so_far)


def cli_settings(args) -> dict:
    """The settings of ``build_teacher_cache`` (as its metadata.json records them) that the arguments fix."""
    return {"model_name": args.model, "k": args.top_k, "temperature": args.temperature, "shard_size": args.shard_size,
            "logprob_dtype": args.logprob_dtype}


def saved_so_far(args) -> str:
    return interrupted_note(args.out, SETTINGS_KEY, cli_settings(args))


def _load_tokenizer(source, where: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - no tokenizer files, or unreadable ones: say which input needs one
        raise UsageError(f'{where}: "text" needs a tokenizer, and none loads from {source} ({type(exc).__name__})') from None


def read_jsonl_sequences(path: str, tokenizer_source=None, max_length=None, config=None, flag="--data"):
    """Token-id lists from a JSONL file of {"input_ids": [...]} or {"text": "..."} objects.

    Blank lines are skipped; anything else that is not such an object, an empty sequence, or (with
    ``config``) a token id outside the model's vocabulary is a UsageError naming ``flag`` and the line.
    """
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or an int >= 1, got {max_length!r}")
    tokenizer = None
    sequences = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                where = f"argument {flag}: {path}:{line_no}"
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{where}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not ({"input_ids", "text"} & set(record)):
                    raise UsageError(f'{where}: expected an object with "input_ids" or "text"')
                if "input_ids" in record:
                    ids = record["input_ids"]
                    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                        raise UsageError(f'{where}: "input_ids" must be a list of integers')
                else:
                    if not isinstance(record["text"], str):
                        raise UsageError(f'{where}: "text" must be a string')
                    if tokenizer is None:
                        if tokenizer_source is None:
                            raise UsageError(f'{where}: "text" needs a tokenizer (none given)')
                        tokenizer = _load_tokenizer(tokenizer_source, where)
                    ids = list(tokenizer(record["text"])["input_ids"])
                if not ids:
                    raise UsageError(f"{where}: the sequence has no tokens")
                if max_length is not None:
                    ids = ids[:max_length]
                if config is not None:
                    check_token_ids(ids, config, where)
                sequences.append(ids)
    except UnicodeDecodeError as exc:
        raise UsageError(f"argument {flag}: {path} is not UTF-8 text ({exc.reason})") from None
    if not sequences:
        raise UsageError(f"argument {flag}: {path} holds no sequence (it is empty or blank)")
    return sequences


def run(args) -> int:
    import torch

    # ---- everything that can be checked without the weights ----
    if args.backend == "native" and args.vllm_engine_args is not None:
        raise UsageError("argument --vllm-engine-args: only applies with --backend vllm")
    if args.backend == "vllm" and args.temperature != 1.0:
        raise UsageError("argument --temperature: only 1.0 with --backend vllm (vLLM's prompt log-probs are at temperature 1)")
    rank, world_size = _data_parallel_rank(args)
    device = check_device(args.device)
    config = read_model_config(args.model)
    check_top_k(args.top_k, config)
    sequences = read_jsonl_sequences(args.data, args.model, args.max_length, config)
    before = read_buffer_metadata(args.out)
    resuming = resume_line(args.out, SETTINGS_KEY, dict(cli_settings(args), num_sequences=len(sequences)))
    if resuming is not None:
        print(resuming, file=sys.stderr, flush=True)

    # ---- the run ----
    from ..generation import load_model_for_generation
    from ..replay_buffer import read_metadata
    from ..teacher_cache import build_teacher_cache

    start = time.perf_counter()
    if args.backend == "vllm":  # the engine loads the weights itself (--device does not apply)
        engine_args = dict(args.vllm_engine_args or {})
        if args.dtype != "auto":
            engine_args.setdefault("dtype", args.dtype)
        model, backend_args = args.model, dict(backend="vllm", vllm_engine_args=engine_args)
    else:
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        with hub_progress_bars(not args.no_progress):
            model = load_model_for_generation(args.model, device=device, dtype=dtype)
        start, backend_args = time.perf_counter(), {}
    buffer = build_teacher_cache(
        model, sequences, args.top_k, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
        temperature=args.temperature, progress=not args.no_progress, logprob_dtype=getattr(torch, args.logprob_dtype),
        rank=rank, world_size=world_size, **backend_args,
    )
    seconds = time.perf_counter() - start
    after = read_metadata(args.out)
    new = new_shard_entries(before, after)
    if world_size > 1:  # this rank's new shards only (other ranks' may be new too); no buffer in memory
        new = _rank_new_entries(before, after, rank, world_size, -(-len(sequences) // args.shard_size))
    summary = {
        "out": args.out,
        "this_run": {"sequences": sum_entries(new, "num_sequences"), "tokens": sum_entries(new, "num_tokens"),
                     "seconds": round(seconds, 3)},
        "buffer": buffer_totals(after),
    }
    if buffer is not None:
        summary["buffer"].update(sequences=len(buffer), teacher_rows=buffer.num_teacher_rows)
    print(json.dumps(summary, sort_keys=True))
    return 0


def _rank_new_entries(before, after, rank: int, world_size: int, num_shards: int):
    """The shards of rank ``rank``'s share that ``after`` holds (listed or written out of order) and
    ``before`` did not: what this rank computed."""
    from ..generation.parallel_writer import OUT_OF_ORDER_FIELD
    from ..generation.shard_schedule import rank_shards
    from ..replay_buffer import parse_shard_file_name

    def entries(metadata):
        if metadata is None:
            return []
        extra = metadata.get(OUT_OF_ORDER_FIELD, [])
        return shard_entries(metadata) + [e for e in (extra if isinstance(extra, list) else []) if isinstance(e, dict)]

    mine, old = set(rank_shards(num_shards, rank, world_size)), {e.get("file") for e in entries(before)}
    return [e for e in entries(after)
            if e.get("file") not in old and (parse_shard_file_name(e.get("file")) or (-1,))[0] in mine]
