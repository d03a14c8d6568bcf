"""One entry point for every benchmark: ``python -m benchmarks [--device cuda] [--only kl,topk,generate]``.

Runs the KL, top-k and generation benchmarks beside their baselines (each writes its JSON, with the
machine's description, to benchmarks/results/), sweeps the generation batch size, and renders the plots
(benchmarks/results/*.png) that the README shows.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import bench_generate, bench_kl, bench_topk, plots
from benchmarks.machine import results_path

GENERATE_BATCHES = {"cpu": [8, 32, 64], "cuda": [32, 128, 256]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", default="kl,topk,generate", help="comma-separated subset of kl, topk, generate")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - {"kl", "topk", "generate"}
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}")
    dev = ["--device", args.device]

    if "kl" in only:
        kl_args = dev + (["--tokens", "256,512", "--vocab", "8192", "--repeats", "1"] if args.quick else [])
        bench_kl.main(kl_args + ["--out", results_path(f"kl_{args.device}")])
    if "topk" in only:
        topk_args = dev + (["--n", "256", "--repeats", "2"] if args.quick else [])
        bench_topk.main(topk_args + ["--out", results_path(f"topk_{args.device}")])
    if "generate" in only:
        batches = GENERATE_BATCHES[args.device][:2] if args.quick else GENERATE_BATCHES[args.device]
        for batch in batches:
            gen_args = dev + ["--batch-size", str(batch)]
            if args.quick:
                gen_args += ["--max-new-tokens", "16", "--repeats", "1"]
            if batch == batches[-1]:
                gen_args += ["--speculative"]
            bench_generate.main(gen_args + ["--out", results_path(f"generate_{args.device}_batch{batch}")])
    if not args.no_plots:
        for path in plots.render_all(args.device):
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
