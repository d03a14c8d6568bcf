"""Time of topk_logprobs (single streaming pass) against torch's log_softmax + topk.

    python -m benchmarks.bench_topk                  # CPU: N=2048, V=50257 (GPT-2), k=64, fp32
    python -m benchmarks.bench_topk --device cuda    # also one plain read of the logits (bandwidth floor)

Implementations, all on the same logits in one process, repeats interleaved so that a slow moment of a
shared machine does not fall on one implementation only:

* ``extension``: selfreplay_fast.topk_logprobs through the compiled kernel (ids, log-probs and tail);
* ``torch``: torch.log_softmax(x) then .topk(k): the baseline (it does not even compute the tail);
* ``torch+tail``: the baseline plus the tail log-mass (scatter -inf at the top k, logsumexp);
* ``fallback``: selfreplay_fast's own torch path (what runs without the extension);
* ``read`` (CUDA only): x.amax(-1), one plain read of the logits: the memory-bandwidth floor.

Prints a table (median and min seconds, ratio of medians to ``torch``) and writes JSON with machine info
to benchmarks/results/topk_<device>.json (``--quick``: N=256, 2 repeats, into the git-ignored
benchmarks/results/scratch/). The goal on CPU is extension <= 0.5x torch; on a GPU, extension within
1.5x of ``read``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.machine import machine_info, results_path, run_record, write_result
from selfreplay_fast import topk as topk_module

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_baseline(x, k):
    return torch.log_softmax(x.float(), dim=-1).topk(k, dim=-1)


def torch_with_tail(x, k):
    logp = torch.log_softmax(x.float(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)
    return values, ids, tail


def fallback(x, k):
    return topk_module._topk_logprobs_torch(x, k)


def plain_read(x, k):
    return x.amax(dim=-1)


def _timer(device):
    if device == "cuda":

        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

    else:

        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=None, help="rows (tokens; default 2048, --quick 256)")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=None, help="default 7, --quick 2")
    parser.add_argument("--quick", action="store_true", help="smoke run, labelled quick, into benchmarks/results/scratch/")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/topk_<device>.json)")
    args = parser.parse_args(argv)
    args.n = args.n or (256 if args.quick else 2048)
    args.repeats = args.repeats or (2 if args.quick else 7)

    if args.threads:
        torch.set_num_threads(args.threads)
    if not topk_module.extension_available():
        raise SystemExit("the compiled extension is not built: pip install --no-build-isolation -e .")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.vocab, generator=g).to(device=args.device, dtype=DTYPES[args.dtype])
    k = args.k
    impls = {
        "extension": lambda: topk_module.topk_logprobs(x, k),
        "torch": lambda: torch_baseline(x, k),
        "torch+tail": lambda: torch_with_tail(x, k),
        "fallback": lambda: fallback(x, k),
    }
    if args.device == "cuda":
        impls["read"] = lambda: plain_read(x, k)

    # Correctness first: the benchmark compares equal work.
    ids, logprobs, tail = impls["extension"]()
    ref_values, _, ref_tail = torch_with_tail(x, k)
    max_logprob_err = (logprobs - ref_values).abs().max().item()
    max_tail_err = (tail - ref_tail).abs().max().item()
    assert max_logprob_err < 1e-4 and max_tail_err < 1e-3, (max_logprob_err, max_tail_err)

    run = _timer(args.device)
    for fn in impls.values():  # warm-up (allocator, thread pool, CUDA context)
        run(fn)
    times = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name, fn in impls.items():
            times[name].append(run(fn))

    base = statistics.median(times["torch"])
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        rows.append(
            {"impl": name, "median_s": median, "min_s": min(ts), "ratio_to_torch": median / base, "times_s": ts}
        )
    logits_bytes = x.numel() * x.element_size()
    for row in rows:
        row["logits_read_GBps"] = logits_bytes / row["median_s"] / 1e9

    print(
        f"topk_logprobs on {args.device}: N={args.n} V={args.vocab} k={k} {args.dtype}, "
        f"{torch.get_num_threads()} torch threads, {args.repeats} repeats"
    )
    print(f"{'impl':<12} {'median s':>10} {'min s':>10} {'x torch':>8} {'GB/s':>8}")
    for row in rows:
        print(
            f"{row['impl']:<12} {row['median_s']:>10.4f} {row['min_s']:>10.4f} {row['ratio_to_torch']:>8.2f} "
            f"{row['logits_read_GBps']:>8.1f}"
        )
    if "read" in times:
        print(f"extension / read: {statistics.median(times['extension']) / statistics.median(times['read']):.2f}")

    path = args.out or results_path(f"topk_{args.device}", quick=args.quick)
    result = {
        "benchmark": "topk_logprobs",
        "config": {
            "device": args.device,
            "n": args.n,
            "vocab": args.vocab,
            "k": k,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
        },
        "check": {"max_abs_logprob_err": max_logprob_err, "max_abs_tail_err": max_tail_err},
        "results": rows,
        "machine": machine_info(args.device),
        "run": run_record(args.quick),
    }
    write_result(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
