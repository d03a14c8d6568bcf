"""Summary of the benchmark results against the project's goals: ``python -m benchmarks.summary [--device cuda]``."""

from __future__ import annotations

import argparse
import glob
import json
import os

from benchmarks.machine import RESULTS_DIR

CPU_GOAL_TOKENS = 4096


def _load(name):
    path = os.path.join(RESULTS_DIR, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def kl_rows(device):
    result = _load(f"kl_{device}.json")
    if result is None:
        return []
    by = {}
    for r in result["results"]:
        if "error" not in r:
            by.setdefault(r["tokens"], {})[r["impl"]] = r
    fused = "fused_triton" if device == "cuda" else "fused_torch"
    rows = []
    for tokens, impls in sorted(by.items()):
        if fused not in impls:
            continue
        f = impls[fused]
        if "naive" in impls:
            n = impls["naive"]
            goal_shape = device == "cpu" and tokens == CPU_GOAL_TOKENS  # the CPU goals are at N = 4096
            rows.append((f"KL N={tokens}: {fused} time / naive", f"{f['time_s_median'] / n['time_s_median']:.2f}x",
                         "<= 1x" if goal_shape else "-"))
            rows.append((f"KL N={tokens}: {fused} extra memory / naive",
                         f"{f['extra_peak_bytes'] / n['extra_peak_bytes']:.1%}", "<= 10%" if goal_shape else "-"))
        if "bare_matmuls" in impls:
            b = impls["bare_matmuls"]
            rows.append((f"KL N={tokens}: {fused} time / 3 bare matmuls",
                         f"{f['time_s_median'] / b['time_s_median']:.2f}x", "<= 1.25x"))
            # The goal counts the memory beyond the gradients every implementation returns (older results
            # without returned_grad_bytes show the whole figure).
            beyond = f["extra_peak_bytes"] - f.get("returned_grad_bytes", 0)
            rows.append((f"KL N={tokens}: {fused} extra memory beyond the returned gradients",
                         f"{beyond / 2**20:.0f} MiB", "<= 512 MB"))
    return rows


def topk_rows(device):
    result = _load(f"topk_{device}.json")
    if result is None:
        return []
    by = {r["impl"]: r for r in result["results"]}
    rows = [("top-k extension time / torch", f"{by['extension']['ratio_to_torch']:.2f}x", "<= 0.5x" if device == "cpu" else "-")]
    if "read" in by:
        rows.append(("top-k extension time / one read of the logits",
                     f"{by['extension']['median_s'] / by['read']['median_s']:.2f}x", "<= 1.5x"))
    return rows


def generate_rows(device):
    rows = []
    for path in sorted(glob.glob(os.path.join(RESULTS_DIR, f"generate_{device}_batch*.json"))):
        with open(path) as f:
            result = json.load(f)
        batch = result["config"]["batch_size"]
        rows.append((f"generate_replay / HF generate, batch {batch}", f"{result['results']['speedup_vs_hf']:.2f}x",
                     ">= 2x" if device == "cpu" else ">= 3x at batch 256"))
        spec = result["results"].get("speculative")
        if spec and "error" in spec:
            rows.append((f"speculative / plain, batch {spec['batch_size']}", f"failed: {spec['error']}", ">= 1.5x"))
        elif spec:
            rows.append((f"speculative / plain, batch {spec['batch_size']} (acceptance {spec['speculative']['acceptance_rate']:.2f})",
                         f"{spec['speedup_vs_plain']:.2f}x", "-" if device == "cpu" else ">= 1.5x"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    rows = kl_rows(args.device) + topk_rows(args.device) + generate_rows(args.device)
    print("| measurement | value | goal |")
    print("|---|---|---|")
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")


if __name__ == "__main__":
    main()
