"""``selfreplay generate``: sample a replay buffer from a model into a directory (resumable)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from ._arguments import (
    UsageError, check_device, existing_directory, non_negative_int, output_directory, positive_float, positive_int,
)
from ._buffer_progress import (
    buffer_totals, interrupted_note, new_shard_entries, read_buffer_metadata, resume_line, shard_entries, sum_entries,
)
from ._model_dir import (
    check_token_ids, check_top_k, config_max_positions, config_vocab_size, hub_progress_bars, read_model_config,
)
from ._replay_source import add_source_arguments, check_source_arguments, source_prompts

SETTINGS_KEY = "generation"  # where generate_replay keeps its settings in metadata.json


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to an ``argparse`` subparsers object; sets ``handler=run``."""
    parser = subparsers.add_parser(
        "generate",
        help="sample replay sequences from a model and cache its top-k teacher",
        description=(
            "Sample sequences from MODEL (prompted with BOS alone, the lines of --prompts-file, task prefixes with "
            "--source task, or self-dialogues through the chat template with --source self-dialogue) and record "
            "the model's top-k log-probs at every sampled position into a sharded replay buffer in OUT. "
            "Rerunning the same command resumes after the last complete shard (also after Ctrl-C)."
        ),
    )
    parser.add_argument("--model", required=True, type=existing_directory, help="local Hugging Face model directory")
    parser.add_argument("--out", required=True, type=output_directory, help="output directory (created; a rerun resumes into it)")
    parser.add_argument("--num-sequences", type=positive_int, required=True, help="sequences to generate")
    parser.add_argument("--max-new-tokens", type=positive_int, required=True, help="generated tokens per sequence at most")
    parser.add_argument("--top-k", type=positive_int, default=64, help="teacher log-probs kept per position (default 64)")
    drafting = parser.add_mutually_exclusive_group()
    drafting.add_argument("--draft", type=existing_directory, default=None,
                          help="draft model directory for speculative decoding (same vocabulary; default: no draft)")
    drafting.add_argument("--ngram-draft", action="store_true", help="speculative decoding with the model-free n-gram drafter")
    parser.add_argument("--num-draft-tokens", type=positive_int, default=4, help="draft tokens per speculative step (default 4)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="decode slots (default 64)")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="base seed (default 0)")
    parser.add_argument("--shard-size", type=positive_int, default=1024, help="sequences per shard, the unit of resumption (default 1024)")
    parser.add_argument("--sampled-draws", type=positive_int, default=None, help="record a 'sampled' teacher of N draws instead of top-k (default: top-k)")
    parser.add_argument("--logprob-dtype", choices=["float32", "float16"], default="float16",
                        help="stored log-prob dtype (float16: half the bytes, loss within 1e-3; see docs/design.md)")
    add_source_arguments(parser)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--backend", choices=["native", "vllm"], default="native",
                        help="native: this library's decode loop; vllm: a vllm.LLM engine (needs vllm installed; no "
                             "drafts or sampled teacher) (default native)")
    parser.add_argument("--vllm-engine-args", type=_json_object, default=None,
                        help='with --backend vllm, extra vllm.LLM arguments as a JSON object, e.g. '
                             '\'{"tensor_parallel_size": 2}\' (default: none)')
    parser.add_argument("--rank", type=non_negative_int, default=None,
                        help="data parallel: this process's rank, 0 to --world-size - 1 (default: $RANK, as torchrun sets it)")
    parser.add_argument("--world-size", type=positive_int, default=None,
                        help="data parallel: how many processes fill OUT together, each generating its own shards; "
                             "the buffer equals a single-process run's (default: $WORLD_SIZE, else 1)")
    parser.set_defaults(handler=run, on_interrupt=saved_so_far)
    return parser


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object of vllm.LLM arguments")
    return value


def _check_backend(args) -> None:
    if args.backend == "native":
        if args.vllm_engine_args is not None:
            raise UsageError("argument --vllm-engine-args: only applies with --backend vllm")
        return
    for flag, used in (("--draft", args.draft is not None), ("--ngram-draft", args.ngram_draft),
                       ("--sampled-draws", args.sampled_draws is not None)):
        if used:
            raise UsageError(f"argument {flag}: not supported with --backend vllm (the native decode loop only)")


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # a bare model directory without tokenizer files: ids come from the config
        return None


def cli_settings(args) -> dict:
    """The settings of ``generate_replay`` (as its metadata.json records them) that the arguments fix."""
    return {
        "model_name": args.model,
        "num_sequences": args.num_sequences,
        "max_new_tokens": args.max_new_tokens,
        "k": args.top_k if args.sampled_draws is None else min(args.top_k, args.sampled_draws),
        "mode": "tail" if args.sampled_draws is None else "sampled",
        "sampled_draws": args.sampled_draws,
        "temperature": args.temperature,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "logprob_dtype": args.logprob_dtype,
    }


def saved_so_far(args) -> str:
    return interrupted_note(args.out, SETTINGS_KEY, cli_settings(args))


def read_prompts(path: str, tokenizer, config):
    """The prompts of ``--prompts-file`` (one per non-blank line) as token-id lists, encoded as
    ``generate_replay`` encodes string prompts, so that a resume recognizes the run either way."""
    if tokenizer is None:
        raise UsageError(f"argument --prompts-file: prompts need a tokenizer, and none loads from the --model directory")
    prompts = []
    try:
        with open(path, "r", encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                ids = list(tokenizer(line.rstrip("\n"), add_special_tokens=True)["input_ids"])
                if not ids:
                    raise UsageError(f"argument --prompts-file: {path}:{line_no}: the prompt encodes to no tokens")
                check_token_ids(ids, config, f"argument --prompts-file: {path}:{line_no}")
                prompts.append(ids)
    except UnicodeDecodeError as exc:
        raise UsageError(f"argument --prompts-file: {path} is not UTF-8 text ({exc.reason})") from None
    if not prompts:
        raise UsageError(f"argument --prompts-file: {path} holds no prompt (every line is blank)")
    return prompts


def _check_lengths(args, config, prompts) -> None:
    limit = config_max_positions(config)
    if hasattr(prompts, "longest_prompt"):  # a SelfDialogue: its longest answer prompt
        longest = prompts.longest_prompt(args.max_new_tokens)
    else:
        longest = max(len(p) for p in prompts) if prompts else 1  # BOS alone
    if limit is not None and longest + args.max_new_tokens > limit:
        raise UsageError(
            f"argument --max-new-tokens: the longest prompt ({longest} tokens) plus {args.max_new_tokens} new tokens "
            f"exceeds the model's max_position_embeddings = {limit}"
        )


def _data_parallel_rank(args):
    """(rank, world_size) from --rank/--world-size or the environment, the device of a torchrun rank."""
    from ..generation.shard_schedule import resolve_rank

    try:
        rank, world_size = resolve_rank(args.rank, args.world_size, out_dir=args.out)
    except ValueError as exc:
        flag = "--world-size" if str(exc).startswith("world_size") else "--rank"
        raise UsageError(f"argument {flag}: {exc}") from None
    local_rank = os.environ.get("LOCAL_RANK", "")
    if args.device is None and world_size > 1 and local_rank.isdigit() and args.backend == "native":
        import torch

        if torch.cuda.is_available():  # one GPU per local rank, as torchrun lays processes out
            args.device = f"cuda:{int(local_rank) % torch.cuda.device_count()}"
    return rank, world_size


def run_summary(out_dir: str, before, after, written=None) -> dict:
    """The closing summary: this run's counts apart from the whole buffer's (``written``: the indices of
    the shards this process wrote, for one rank of several)."""
    from ..generation import GenerationStats
    from ..generation.parallel_writer import OUT_OF_ORDER_FIELD
    from ..replay_buffer import parse_shard_file_name

    if written is None:
        new = new_shard_entries(before, after)
    else:
        entries = shard_entries(after) + [e for e in after.get(OUT_OF_ORDER_FIELD, []) if isinstance(e, dict)]
        new = [e for e in entries if (parse_shard_file_name(e.get("file")) or (-1,))[0] in written]
    this_run = {"sequences": sum_entries(new, "num_sequences"), "tokens": sum_entries(new, "num_tokens")}
    names = [f.name for f in fields(GenerationStats)]

    def counters_of(record: dict) -> GenerationStats:
        return GenerationStats(**{name: record[name] for name in names if name in record})

    stats = GenerationStats()
    if all(isinstance(entry.get("stats"), dict) for entry in new):
        for entry in new:  # each shard's entry holds the counters of the shard
            stats.add(counters_of(entry["stats"]))
    elif isinstance(after.get("generation_stats"), dict):  # the totals of the call that wrote the last shard
        stats = counters_of(after["generation_stats"])
    counters = stats.as_dict()
    counters.pop("sequences")
    this_run.update({key: value for key, value in counters.items() if value is not None})
    return {"out": out_dir, "this_run": this_run, "buffer": buffer_totals(after)}


def run(args) -> int:
    import torch

    # ---- everything that can be checked without the weights ----
    _check_backend(args)
    rank, world_size = _data_parallel_rank(args)
    check_source_arguments(args)
    device = check_device(args.device)
    config = read_model_config(args.model)
    check_top_k(args.top_k, config)
    if args.draft is not None:
        draft_vocab = config_vocab_size(read_model_config(args.draft, "--draft"))
        if None not in (draft_vocab, config_vocab_size(config)) and draft_vocab != config_vocab_size(config):
            raise UsageError(
                f"argument --draft: the draft model has a vocabulary of {draft_vocab} tokens, the model "
                f"{config_vocab_size(config)}: speculative decoding needs a shared vocabulary"
            )
    tokenizer = _load_tokenizer(args.model)
    prompts = source_prompts(args, tokenizer, config, read_prompts)
    _check_lengths(args, config, prompts)
    before = read_buffer_metadata(args.out)
    resuming = resume_line(args.out, SETTINGS_KEY, cli_settings(args))
    if resuming is not None:
        print(resuming, file=sys.stderr, flush=True)

    # ---- the run ----
    from ..generation import generate_replay, load_model_for_generation
    from ..replay_buffer import read_metadata

    written = []  # the shards this process writes (its rank's summary)
    parallel = dict(rank=rank, world_size=world_size)
    if world_size > 1:
        parallel["on_shard_written"] = lambda shard, _: written.append(shard)

    def summary():
        return run_summary(args.out, before, read_metadata(args.out), written if world_size > 1 else None)

    if args.backend == "vllm":  # the engine loads the weights itself (--device does not apply)
        engine_args = dict(args.vllm_engine_args or {})
        if args.dtype != "auto":
            engine_args.setdefault("dtype", args.dtype)
        generate_replay(
            args.model, num_sequences=args.num_sequences, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
            batch_size=args.batch_size, temperature=args.temperature, prompts=prompts, seed=args.seed, out_dir=args.out,
            progress=not args.no_progress, shard_size=args.shard_size, tokenizer=tokenizer,
            logprob_dtype=args.logprob_dtype, keep_in_memory=False, backend="vllm", vllm_engine_args=engine_args,
            **parallel,
        )
        print(json.dumps(summary(), sort_keys=True), file=sys.stdout)
        return 0
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    with hub_progress_bars(not args.no_progress):
        model = load_model_for_generation(args.model, device=device, dtype=dtype)
        draft_model = load_model_for_generation(args.draft, device=device, dtype=dtype) if args.draft else None
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
        **parallel,
    )
    print(json.dumps(summary(), sort_keys=True), file=sys.stdout)
    return 0
