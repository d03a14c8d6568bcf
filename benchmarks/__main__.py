"""One entry point for every benchmark: ``python -m benchmarks [--device cuda] [--only kl,topk,generate] [--quick]``.

Runs the KL, top-k and generation benchmarks beside their baselines (each writes its JSON, with the
machine's description and the run's mode and date), sweeps the generation batch size, and renders the
plots that the README shows. A full run writes to benchmarks/results/ (the committed results); a
``--quick`` run (smaller sizes, fewer repeats: a smoke run whose numbers mean nothing) writes to the
git-ignored benchmarks/results/scratch/ and can never replace them; ``--out DIR`` writes anywhere.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import bench_generate, bench_kl, bench_topk, plots
from benchmarks.machine import results_dir, results_path

GENERATE_BATCHES = {"cpu": [8, 32, 64], "cuda": [32, 128, 256]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", default="kl,topk,generate", help="comma-separated subset of kl, topk, generate")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and fewer repeats (a smoke run), into benchmarks/results/scratch/")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results/, scratch/ with --quick)")
    parser.add_argument("--vllm-python", default=None,
                        help="interpreter with vLLM for the generation benchmark's vLLM row (see bench_generate)")
    parser.add_argument("--no-vllm", action="store_true", help="leave the generation benchmark's vLLM row out")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - {"kl", "topk", "generate"}
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}")
    out_dir = args.out or results_dir(args.quick)
    common = ["--device", args.device] + (["--quick"] if args.quick else [])

    def out(name):
        return ["--out", results_path(name, out_dir=out_dir)]

    if "kl" in only:
        bench_kl.main(common + out(f"kl_{args.device}"))
    if "topk" in only:
        bench_topk.main(common + out(f"topk_{args.device}"))
    if "generate" in only:
        batches = GENERATE_BATCHES[args.device][:2] if args.quick else GENERATE_BATCHES[args.device]
        vllm = (["--vllm-python", args.vllm_python] if args.vllm_python else []) + (["--no-vllm"] if args.no_vllm else [])
        for batch in batches:
            gen_args = common + vllm + ["--batch-size", str(batch)]
            if batch == batches[-1]:
                gen_args += ["--speculative"]
            bench_generate.main(gen_args + out(f"generate_{args.device}_batch{batch}"))
    if not args.no_plots:
        for path in plots.render_all(args.device, out_dir):
            print(f"plot: {path}")
    print(f"results in {out_dir}" + (" (quick: scratch, not committed)" if args.quick and not args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
