"""Peak memory and time of forward+backward of the replay KL: fused vs naive full-logits PyTorch.

    python -m benchmarks.bench_kl                 # CPU defaults: D=256, V=65536, k=64, fp32
    python -m benchmarks.bench_kl --device cuda   # Llama-3-8B head: D=4096, V=128256, bf16

Every (implementation, token count) runs in its own subprocess so that peak memory is measured
cleanly (CPU: peak RSS over the process's resident size after the inputs exist; CUDA:
max_memory_allocated over the allocation after the inputs exist). "Extra" memory therefore includes
the gradients that are returned (grad_hidden, grad_weight), identical for all implementations.
On CUDA the run also times the three bare matmuls of the same shapes (the 6·N·D·V FLOP floor) and,
when liger_kernel is installed, Liger-Kernel's fused linear JSD fed a dense teacher head.

The largest token count runs first, and on CUDA the goal's pair (fused_triton, bare_matmuls) first
within it: a run cut short by a time cap loses the small rows, never the headline N=8192 row.
Prints a table and writes JSON with machine info to benchmarks/results/ (``--quick``: small sizes,
one repeat, into the git-ignored benchmarks/results/scratch/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.machine import machine_info, results_path, run_record, write_result

IMPLS_CPU = ["naive", "fused_torch"]
# The goal compares fused_triton with bare_matmuls: they run first at every token count.
IMPLS_CUDA = ["fused_triton", "bare_matmuls", "naive", "fused_torch", "liger_jsd"]
# Headline shape first (largest N): the CUDA row N=8192 at D=4096, V=128256 is the goal's; CPU's is N=4096.
DEFAULT_TOKENS = {"cuda": [8192, 4096, 2048], "cpu": [4096, 2048, 1024]}
QUICK = {"tokens": "512,256", "vocab": 8192, "repeats": 1}
TEACHER_MASS = 0.9
ID_STRIDE = 7919  # a prime: (offset + i * ID_STRIDE) % V are k distinct ids for any V it does not divide


def make_inputs(n, dim, vocab, k, dtype, device, seed=0):
    # Drawn where they are used: a 128256 x 4096 weight takes seconds to draw on the CPU, in every worker.
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, dim, generator=g, device=device) / math.sqrt(dim)).to(dtype)
    weight.requires_grad_(True)
    offset = torch.randint(0, vocab, (n, 1), generator=g, device=device)
    ids = (offset + torch.arange(k, device=device) * ID_STRIDE) % vocab
    logprobs = torch.log_softmax(torch.randn(n, k, generator=g, device=device), -1) + math.log(TEACHER_MASS)
    return hidden, weight, ids, logprobs


def naive_tail_kl(hidden, weight, ids, logprobs):
    """What one writes without this library: full fp32 logits, log-softmax, autograd."""
    log_q = (hidden @ weight.T).float().log_softmax(-1)
    log_q_teacher = log_q.gather(1, ids)
    p = logprobs.exp()
    log_one_minus_q = log_q.scatter(1, ids, float("-inf")).logsumexp(-1)
    r = (1 - p.sum(-1)).clamp_min(1e-12)
    return ((p * (logprobs - log_q_teacher)).sum(-1) + r * (r.log() - log_one_minus_q)).mean()


def _step_fn(impl, hidden, weight, ids, logprobs):
    from selfreplay_fast import fused_replay_kl, skip_value_checks

    if impl == "naive":
        return lambda: naive_tail_kl(hidden, weight, ids, logprobs).backward()
    if impl.startswith("fused"):
        which = impl.split("_")[1]

        def step():
            with skip_value_checks():  # a training loop validates its cache once, not every step
                fused_replay_kl(hidden, weight, ids, logprobs, impl=which).backward()

        return step
    if impl == "bare_matmuls":
        grad_logits = torch.empty(hidden.shape[0], weight.shape[0], device=hidden.device, dtype=hidden.dtype)

        hidden_grad = torch.empty_like(hidden)
        weight_grad = torch.empty_like(weight)

        def step():  # logits, then the two gradient matmuls, into preallocated outputs
            with torch.no_grad():
                torch.mm(hidden, weight.T, out=grad_logits)
                torch.mm(grad_logits, weight, out=hidden_grad)
                torch.mm(grad_logits.T, hidden, out=weight_grad)

        return step
    if impl == "liger_jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        teacher_weight = weight.detach().clone()
        loss_fn = LigerFusedLinearJSD(jsd_beta=0.0)  # beta = 0: forward KL(teacher || student)
        return lambda: loss_fn(hidden, weight, hidden.detach(), teacher_weight, None).backward()  # no labels to ignore
    raise ValueError(f"unknown implementation {impl!r}")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args):
    """Runs one (implementation, token count) and prints one JSON line."""
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    inputs = make_inputs(args.tokens, args.dim, args.vocab, args.k, dtype, device)
    step = _step_fn(args.impl, *inputs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()
    sync()
    if device.type == "cuda":
        extra = torch.cuda.max_memory_allocated() - base
    else:  # ru_maxrss is in KiB on Linux
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # The gradients handed back (grad_hidden, grad_weight: 1 GiB at the 8B head in bf16) are part of "extra"
    # for every implementation alike; the 512 MB goal is about the memory beyond them (docs/design.md, section 4).
    returned_grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in inputs if t.grad is not None)
    for t in inputs:
        t.grad = None
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        for t in inputs:
            t.grad = None
    print(json.dumps({"impl": args.impl, "tokens": args.tokens, "extra_peak_bytes": extra,
                      "returned_grad_bytes": returned_grad_bytes,
                      "time_s_median": statistics.median(times), "time_s_all": times}))


def run_order(token_counts, impls):
    """The (tokens, implementation) rows in the order they run: token counts as given (the defaults put the
    headline first), every implementation at one count before the next count."""
    return [(tokens, impl) for tokens in token_counts for impl in impls]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", default=None, help="comma-separated token counts")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK} unless given, labelled quick, into benchmarks/results/scratch/")
    parser.add_argument("--impls", default=None, help="comma-separated subset of the implementations")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: benchmarks/results/kl_<device>.json, scratch/ with --quick)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.repeats = args.repeats or 3
    cuda = args.device == "cuda"
    args.dim = args.dim or (4096 if cuda else 256)
    args.vocab = args.vocab or (128256 if cuda else 65536)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.worker:
        args.tokens = int(args.tokens)
        return worker(args)

    # In the order given (the defaults: largest first, see DEFAULT_TOKENS).
    token_counts = [int(t) for t in args.tokens.split(",")] if args.tokens else DEFAULT_TOKENS[args.device]
    impls = args.impls.split(",") if args.impls else (IMPLS_CUDA if cuda else IMPLS_CPU)
    rows = []
    path = args.out or results_path(f"kl_{args.device}", quick=args.quick)
    result = {
        "benchmark": "bench_kl",
        "config": {"dim": args.dim, "vocab": args.vocab, "k": args.k, "dtype": args.dtype,
                   "device": args.device, "repeats": args.repeats, "mode": "tail", "reduction": "mean"},
        "machine": machine_info(args.device),
        "run": run_record(args.quick),
        "results": rows,
    }
    for tokens, impl in run_order(token_counts, impls):
        cmd = [sys.executable, "-m", "benchmarks.bench_kl", "--worker", "--impl", impl, "--device", args.device,
               "--tokens", str(tokens), "--dim", str(args.dim), "--vocab", str(args.vocab), "--k", str(args.k),
               "--dtype", args.dtype, "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{impl:>13} N={tokens}: skipped ({reason})", file=sys.stderr)
            rows.append({"impl": impl, "tokens": tokens, "error": reason})
            write_result(path, result)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        write_result(path, result)  # after every row: a run stopped by a time limit keeps what it measured
        r = rows[-1]
        print(f"{impl:>13} N={tokens:>6}: {r['time_s_median'] * 1e3:9.1f} ms   extra peak "
              f"{r['extra_peak_bytes'] / 2**20:9.1f} MiB", flush=True)

    print("\n| tokens | implementation | fwd+bwd ms | extra peak MiB | time vs naive | memory vs naive |")
    print("|---|---|---|---|---|---|")
    for tokens in token_counts:
        naive = next((r for r in rows if r["tokens"] == tokens and r["impl"] == "naive" and "error" not in r), None)
        for r in rows:
            if r["tokens"] != tokens or "error" in r:
                continue
            t_ratio = f"{r['time_s_median'] / naive['time_s_median']:.2f}x" if naive else "-"
            m_ratio = f"{r['extra_peak_bytes'] / naive['extra_peak_bytes']:.1%}" if naive else "-"
            print(f"| {tokens} | {r['impl']} | {r['time_s_median'] * 1e3:.1f} | "
                  f"{r['extra_peak_bytes'] / 2**20:.1f} | {t_ratio} | {m_ratio} |")
    write_result(path, result)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
