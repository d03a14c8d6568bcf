"""Replay generation throughput: ``generate_replay`` (native and vLLM backends) vs Hugging Face ``generate``,
same model/batch/length/k.

    python -m benchmarks.bench_generate                  # CPU: tiny Llama (hidden 64, 2 layers, vocab 32000)
    python -m benchmarks.bench_generate --device cuda    # GPU: 1B Llama-shaped model (random weights), batch 256

Both sides sample from the full distribution (HF: ``do_sample=True, top_k=0, top_p=1.0``, timed with
``output_scores=True`` and without scores, its fastest loop), start from BOS and generate exactly ``max_new_tokens`` tokens per sequence (the
model has no EOS, so neither side stops early and continuous batching gains nothing: this measures
the decode loop itself). ``generate_replay`` additionally records the top-k teacher and tail mass at
every position and writes the buffer to a temporary folder (timed, and its files' bytes reported); HF keeps
its dense fp32 scores in memory and writes nothing. Tokens/s counts generated tokens; every measurement
is the median of ``--repeats`` interleaved rounds after a warm-up.

The vLLM row (``backend="vllm"``, same model saved with ``save_pretrained``, same batch as
``max_num_seqs``, same k) runs in the interpreter that has vLLM (``--vllm-python``; by default the
repository's .venv-vllm, else this one if it imports vllm) through benchmarks/vllm_row.py; without one
the row is skipped with the reason printed and recorded. The engine's start-up is not timed.
With ``--speculative`` it also times speculative decoding with a draft made of the target's first
``--draft-layers`` layers. ``--num-sequences N`` times N sequences per run in ``--batch-size`` slots
(continuous batching; HF in calls of ``--batch-size``) and ``--no-hf-scores`` times HF without scores only,
e.g. the byte-level case of issue 12: ``--vocab 258 --layers 4 --top-k 32 --max-new-tokens 127
--batch-size 512 --num-sequences 2048 --no-hf-scores --no-vllm``. Writes JSON with machine info to benchmarks/results/generate_<device>.json
(``--quick``: 16 new tokens, one round, into the git-ignored benchmarks/results/scratch/).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.machine import machine_info, results_path, run_record, write_result, written_bytes
from benchmarks.vllm_row import VllmWorker, find_vllm_python

PRESETS = {
    # head dim 32: the smallest vLLM's CPU attention takes
    "cpu": dict(vocab=32000, hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, batch_size=32,
                max_new_tokens=128, dtype="float32"),
    # 1B Llama-shaped (Llama-3.2-1B dimensions), random weights
    "cuda": dict(vocab=128256, hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, batch_size=256,
                 max_new_tokens=256, dtype="bfloat16"),
}


def build_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.max_new_tokens + 16), bos_token_id=1, eos_token_id=None,
        pad_token_id=0, tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    # Initialized on the device, in its dtype: 1.2B parameters drawn on the CPU in fp32 take a minute.
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def draft_from(model, num_layers):
    """A layer-skip draft: the target's embeddings, first ``num_layers`` layers, norm and head."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:num_layers]
    draft.config.num_hidden_layers = num_layers
    return draft.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_hf(model, batch_size, max_new_tokens, device, scores=True, num_sequences=None):
    """HF ``generate``, with its dense scores (``scores``) or without (its fastest sampling loop);
    ``num_sequences`` (default ``batch_size``) in calls of ``batch_size`` sequences."""
    num_sequences = num_sequences or batch_size
    generated, held = 0, 0
    sync(device)
    start = time.perf_counter()
    for first in range(0, num_sequences, batch_size):
        batch = min(batch_size, num_sequences - first)
        inputs = torch.full((batch, 1), 1, dtype=torch.long, device=device)
        with torch.inference_mode():
            out = model.generate(
                inputs, attention_mask=torch.ones_like(inputs), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                max_new_tokens=max_new_tokens, output_scores=scores, return_dict_in_generate=True, pad_token_id=0,
            )
        generated += (out.sequences.shape[1] - 1) * batch
        if scores:
            held = max(held, sum(s.numel() * s.element_size() for s in out.scores))
        del out
    sync(device)
    seconds = time.perf_counter() - start
    assert generated == num_sequences * max_new_tokens, "HF stopped early"
    # Nothing is written; the dense fp32 scores it holds in memory instead (per call) are the comparison's point.
    if not scores:
        return generated / seconds, {"bytes_written": 0}
    return generated / seconds, {"bytes_written": 0, "dense_scores_bytes": held}


def time_ours(model, batch_size, max_new_tokens, top_k, device, draft=None, num_draft_tokens=4, write=False,
              num_sequences=None):
    """One ``generate_replay`` run of ``num_sequences`` (default ``batch_size``) sequences in ``batch_size``
    slots; ``write``: into a fresh temporary folder (timed), whose bytes are reported."""
    from selfreplay_fast.generation import generate_replay

    num_sequences = num_sequences or batch_size
    folder = tempfile.mkdtemp(prefix="bench_native_") if write else None
    try:
        sync(device)
        start = time.perf_counter()
        buffer = generate_replay(
            model, num_sequences=num_sequences, max_new_tokens=max_new_tokens, top_k=top_k, batch_size=batch_size,
            progress=False, eos_token_id=[], draft_model=draft, num_draft_tokens=num_draft_tokens, shard_size=num_sequences,
            out_dir=os.path.join(folder, "replay") if write else None,
        )
        sync(device)
        seconds = time.perf_counter() - start
        generated = buffer.num_tokens - len(buffer)
        assert generated == num_sequences * max_new_tokens
        stats = buffer.generation_stats
        extra = {"target_forwards": stats.target_forwards, "host_checks": stats.host_checks}
        if write:
            size = written_bytes(folder)
            extra.update(bytes_written=size, bytes_per_token=size / generated)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if draft is not None:
        extra["acceptance_rate"] = stats.acceptance_rate
    return generated / seconds, extra


def measure_interleaved(fns, repeats, optional=()):
    """Run each of ``fns`` once per round, ``repeats`` rounds: on a shared machine a burst of load
    then hits all contenders alike instead of one of them. A contender named in ``optional`` that raises
    is recorded as ``{"error": ...}`` and leaves the later rounds; any other error propagates."""
    runs = {name: [] for name in fns}
    errors = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                runs[name].append(fn())
            except Exception as exc:
                if name not in optional:
                    raise
                errors[name] = f"{type(exc).__name__}: {exc}"
                print(f"{name} failed, left out: {errors[name]}", file=sys.stderr)
    out = {}
    for name, results in runs.items():
        if name in errors:
            out[name] = {"error": errors[name]}
            continue
        rates = [r[0] for r in results]
        out[name] = {"tokens_per_s_median": statistics.median(rates), "tokens_per_s_runs": rates, **results[-1][1]}
    return out


def start_vllm_worker(args, model, device):
    """The vLLM contender, or (None, the reason it is skipped). The model goes to disk for the engine."""
    python, reason = find_vllm_python(args.vllm_python)
    if python is None:
        return None, None, f"no vLLM: {reason}"
    model_dir = tempfile.mkdtemp(prefix="bench_vllm_model_")
    model.save_pretrained(model_dir)
    engine_args = {"dtype": args.dtype, "max_model_len": args.max_new_tokens + 8}
    if device.type == "cpu":  # eager (no compile time), little memory: the CPU engine's sizes
        engine_args.update(enforce_eager=True, gpu_memory_utilization=0.05)
    else:  # the HF and native contenders hold the same model on the same GPU
        engine_args.update(gpu_memory_utilization=0.5)
    engine_args.update(json.loads(args.vllm_engine_args or "{}"))
    print(f"vLLM row: {python}, engine {engine_args}", flush=True)
    try:
        worker = VllmWorker(python, model_dir, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            top_k=args.top_k, engine_args=engine_args)
    except Exception as exc:
        shutil.rmtree(model_dir, ignore_errors=True)
        return None, None, f"the vLLM engine did not start: {exc}"
    return worker, model_dir, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--num-sequences", type=int, default=None,
                        help="sequences per timed run, in --batch-size slots (HF: in calls of --batch-size; default: "
                             "one batch); native and HF only")
    parser.add_argument("--no-hf-scores", action="store_true",
                        help="leave out HF generate with output_scores (time only its no-scores loop)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (default 5, --quick 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 16 new tokens, one round, labelled quick, into benchmarks/results/scratch/")
    parser.add_argument("--vllm-python", default=None,
                        help="interpreter with vLLM for the vLLM row (default: .venv-vllm/bin/python, else this one)")
    parser.add_argument("--vllm-engine-args", default=None, help="JSON dict of vllm.LLM arguments overriding the defaults")
    parser.add_argument("--no-vllm", action="store_true", help="leave the vLLM row out")
    parser.add_argument("--note", default=None, help="a remark stored with the run (e.g. that the machine was shared)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on the CPU (default: leave torch's choice)")
    parser.add_argument("--speculative", action="store_true", help="also time speculative decoding")
    parser.add_argument("--spec-batch-size", type=int, default=8)
    parser.add_argument("--draft-layers", type=int, default=1)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--out", default=None, help="result file (default benchmarks/results/generate_<device>.json)")
    args = parser.parse_args(argv)
    if args.num_sequences is not None and not args.no_vllm:
        parser.error("--num-sequences is for the native and HF rows only: add --no-vllm")
    if args.quick and args.max_new_tokens is None:
        args.max_new_tokens = 16
    args.repeats = args.repeats or (1 if args.quick else 5)
    device = torch.device(args.device)
    run = run_record(args.quick, args.note)
    preset = PRESETS["cuda" if device.type == "cuda" else "cpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build_model(args, device, dtype)

    # warm-up (allocator, kernels, lazy imports)
    time_hf(model, args.batch_size, 4, device)
    time_ours(model, args.batch_size, 4, args.top_k, device)

    n = args.num_sequences
    contenders = {
        "hf_generate": lambda: time_hf(model, args.batch_size, args.max_new_tokens, device, num_sequences=n),
        "hf_generate_no_scores": lambda: time_hf(model, args.batch_size, args.max_new_tokens, device, scores=False,
                                                 num_sequences=n),
        "generate_replay": lambda: time_ours(model, args.batch_size, args.max_new_tokens, args.top_k, device, write=True,
                                             num_sequences=n),
    }
    if args.no_hf_scores:
        del contenders["hf_generate"]
    worker, model_dir, vllm_skip = (None, None, "--no-vllm") if args.no_vllm else start_vllm_worker(args, model, device)
    if worker is not None:
        contenders["generate_replay_vllm"] = worker.run
    else:
        print(f"vLLM row skipped: {vllm_skip}", flush=True)
    try:
        results = measure_interleaved(contenders, args.repeats, optional=("generate_replay_vllm",))
    finally:
        if worker is not None:
            worker.close()
            shutil.rmtree(model_dir, ignore_errors=True)
    hf_rate = results["hf_generate"]["tokens_per_s_median"] if "hf_generate" in results else None
    if hf_rate is not None:
        results["speedup_vs_hf"] = results["generate_replay"]["tokens_per_s_median"] / hf_rate
    results["speedup_vs_hf_no_scores"] = (results["generate_replay"]["tokens_per_s_median"]
                                          / results["hf_generate_no_scores"]["tokens_per_s_median"])
    if worker is None:
        results["generate_replay_vllm"] = {"skipped": vllm_skip}
    else:
        results["generate_replay_vllm"].update({k: v for k, v in worker.ready.items() if k != "ready"})
        if "error" not in results["generate_replay_vllm"] and hf_rate is not None:
            results["vllm_speedup_vs_hf"] = results["generate_replay_vllm"]["tokens_per_s_median"] / hf_rate
    import transformers

    report = {
        "benchmark": "bench_generate",
        "machine": {**machine_info(device.type), "transformers": transformers.__version__},
        "run": {**run, "load_average_at_end": list(os.getloadavg())},
        "config": {key: getattr(args, key) for key in
                   ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "batch_size", "num_sequences",
                    "max_new_tokens", "dtype", "top_k", "repeats", "threads")},
        "results": results,
    }
    path = args.out or results_path(f"generate_{device.type}", quick=args.quick)
    write_result(path, report)  # before the speculative part: its failure or a time limit keeps these numbers
    if args.speculative:
        b = args.spec_batch_size
        try:
            draft = draft_from(model, args.draft_layers)
            spec_runs = measure_interleaved({
                "plain": lambda: time_ours(model, b, args.max_new_tokens, args.top_k, device),
                "speculative": lambda: time_ours(model, b, args.max_new_tokens, args.top_k, device, draft,
                                                 args.num_draft_tokens),
            }, args.repeats)
        except Exception as exc:  # recorded, not fatal: the plain comparison above stands
            results["speculative"] = {"batch_size": b, "error": f"{type(exc).__name__}: {exc}"}
            print(f"speculative part failed: {exc!r}", file=sys.stderr)
        else:
            plain, spec = spec_runs["plain"], spec_runs["speculative"]
            results["speculative"] = {"batch_size": b, "draft_layers": args.draft_layers,
                                      "num_draft_tokens": args.num_draft_tokens, "plain": plain, "speculative": spec,
                                      "speedup_vs_plain": spec["tokens_per_s_median"] / plain["tokens_per_s_median"]}
        write_result(path, report)
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")
    if "error" in results.get("speculative", {}):
        sys.exit(1)


if __name__ == "__main__":
    main()
