"""The project's goals against the benchmark results: ``python -m benchmarks.summary [--device cuda] [--results DIR]``.

One row per goal (per measured batch where a goal holds at every batch): the measured value, the goal, the
status (``pass``, ``FAIL``, or ``not measured`` with why) and the run it comes from (machine, date, quick or
full, file). A goal is measured only by a result at the goal's own shape: a quick run or another size leaves
it "not measured" instead of standing in for it. Quick runs write to benchmarks/results/scratch/
(``--results benchmarks/results/scratch`` reads them); their rows say "quick".
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from dataclasses import dataclass
from typing import Callable, List, Optional

from benchmarks.machine import RESULTS_DIR, machine_label

MIB = 2**20


@dataclass
class Measured:
    value: Optional[float]  # None: the result exists but cannot give the value (``note`` says why)
    source: dict  # the result JSON it comes from
    file: str
    note: str = ""


@dataclass
class Goal:
    name: str
    device: str
    target: str  # as printed
    passes: Callable[[float], bool]
    measure: Callable[[str], List[Measured]]  # results folder -> measurements (empty: not measured)
    unit: Callable[[float], str]
    missing: str = "no result"  # why it is not measured when measure finds nothing


def _load(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _kl_pair(folder, device, tokens, dim, vocab, fused, base, value):
    result = _load(folder, f"kl_{device}.json")
    if result is None:
        return []
    cfg = result["config"]
    file = f"kl_{device}.json"
    if (cfg["dim"], cfg["vocab"]) != (dim, vocab):  # another shape (a quick run) never stands in for the goal's
        return [Measured(None, result, file, f"the result is at D={cfg['dim']}, V={cfg['vocab']}")]
    by = {r["impl"]: r for r in result["results"] if r["tokens"] == tokens}
    if fused not in by or base not in by:
        return [Measured(None, result, file, f"no N={tokens} {fused}/{base} rows")]
    for impl in (fused, base):
        if "error" in by[impl]:
            return [Measured(None, result, file, f"{impl} failed: {by[impl]['error']}")]
    return [Measured(value(by[fused], by[base]), result, file)]


def _extra_beyond_grads(row):
    return row["extra_peak_bytes"] - row.get("returned_grad_bytes", 0)


def _topk(folder, device, impl, base):
    result = _load(folder, f"topk_{device}.json")
    if result is None:
        return []
    by = {r["impl"]: r for r in result["results"]}
    if impl not in by or base not in by:
        return [Measured(None, result, f"topk_{device}.json", f"no {base} row")]
    return [Measured(by[impl]["median_s"] / by[base]["median_s"], result, f"topk_{device}.json")]


def _generate_files(folder, device):
    found = []
    for path in glob.glob(os.path.join(folder, f"generate_{device}_batch*.json")):
        with open(path) as f:
            found.append((os.path.basename(path), json.load(f)))
    return sorted(found, key=lambda item: item[1]["config"]["batch_size"])


def _generate_speedup(folder, device, batch=None):
    out = []
    for file, result in _generate_files(folder, device):
        if batch is None or result["config"]["batch_size"] == batch:
            out.append(Measured(result["results"]["speedup_vs_hf"], result, file, f"batch {result['config']['batch_size']}"))
    return out


def _generate_speedup_no_scores(folder, device):
    out = []
    for file, result in _generate_files(folder, device):
        batch = result["config"]["batch_size"]
        if "speedup_vs_hf_no_scores" not in result["results"]:
            out.append(Measured(None, result, file, f"batch {batch}: the run predates the HF contender without scores"))
        else:
            out.append(Measured(result["results"]["speedup_vs_hf_no_scores"], result, file, f"batch {batch}"))
    return out


def _speculative(folder, device, max_batch):
    out = []
    for file, result in _generate_files(folder, device):
        spec = result["results"].get("speculative")
        if not spec or spec["batch_size"] > max_batch:
            continue
        if "error" in spec:
            out.append(Measured(None, result, file, f"batch {spec['batch_size']}: failed: {spec['error']}"))
        else:
            out.append(Measured(spec["speedup_vs_plain"], result, file, f"batch {spec['batch_size']}, acceptance "
                                f"{spec['speculative']['acceptance_rate']:.2f}"))
    return out


def _ratio(x):
    return f"{x:.2f}x"


HEADLINE = dict(tokens=8192, dim=4096, vocab=128256)  # the Llama-3-8B head, bf16, k=64
CPU_KL = dict(tokens=4096, dim=256, vocab=65536)  # the CPU goals' shape (issue #2)

GOALS = [
    Goal("KL fwd+bwd time / three bare bf16 matmuls (N=8192, D=4096, V=128256)", "cuda", "<= 1.25x",
         lambda v: v <= 1.25,
         lambda d: _kl_pair(d, "cuda", **HEADLINE, fused="fused_triton", base="bare_matmuls",
                            value=lambda f, b: f["time_s_median"] / b["time_s_median"]), _ratio),
    Goal("KL extra memory beyond the returned gradients (N=8192, D=4096, V=128256)", "cuda", "<= 512 MiB",
         lambda v: v <= 512 * MIB,
         lambda d: _kl_pair(d, "cuda", **HEADLINE, fused="fused_triton", base="bare_matmuls",
                            value=lambda f, b: _extra_beyond_grads(f)), lambda v: f"{v / MIB:.0f} MiB"),
    Goal("generate_replay / HF generate (output_scores), 1B model, batch 256", "cuda", ">= 3x",
         lambda v: v >= 3, lambda d: _generate_speedup(d, "cuda", batch=256), _ratio),
    Goal("speculative / plain generate_replay, batch <= 8", "cuda", ">= 1.5x",
         lambda v: v >= 1.5, lambda d: _speculative(d, "cuda", max_batch=8), _ratio),
    Goal("top-k log-probs (extension) / one read of the logits", "cuda", "<= 1.5x",
         lambda v: v <= 1.5, lambda d: _topk(d, "cuda", "extension", "read"), _ratio),
    Goal("KL fwd+bwd time, fused_torch / naive (N=4096, D=256, V=65536)", "cpu", "<= 1x",
         lambda v: v <= 1.0,
         lambda d: _kl_pair(d, "cpu", **CPU_KL, fused="fused_torch", base="naive",
                            value=lambda f, b: f["time_s_median"] / b["time_s_median"]), _ratio),
    Goal("KL extra peak memory, fused_torch / naive (N=4096, D=256, V=65536)", "cpu", "<= 10%",
         lambda v: v <= 0.10,
         lambda d: _kl_pair(d, "cpu", **CPU_KL, fused="fused_torch", base="naive",
                            value=lambda f, b: f["extra_peak_bytes"] / b["extra_peak_bytes"]), lambda v: f"{v:.1%}"),
    Goal("top-k log-probs (extension) / torch log_softmax + topk", "cpu", "<= 0.5x",
         lambda v: v <= 0.5, lambda d: _topk(d, "cpu", "extension", "torch"), _ratio),
    Goal("generate_replay / HF generate (output_scores), every batch", "cpu", ">= 2x",
         lambda v: v >= 2, lambda d: _generate_speedup(d, "cpu"), _ratio),
    Goal("generate_replay / HF generate without scores, equal batch (issue #12)", "cpu", ">= 1.5x",
         lambda v: v >= 1.5, lambda d: _generate_speedup_no_scores(d, "cpu"), _ratio),
]


def run_label(result, file):
    """machine, date, quick/full and file of a result: where a row's number comes from."""
    machine = result.get("machine", {})
    run = result.get("run", {})
    date = (run.get("date_utc") or machine.get("date_utc") or "date not recorded")[:10]
    mode = run.get("mode", "mode not recorded")
    return f"{machine_label(machine)}, {date}, {mode} ({file})"


def goal_rows(folder: str = RESULTS_DIR, device: Optional[str] = None):
    """(goal, measured, target, status, run) for every goal (of ``device``, or all)."""
    rows = []
    for goal in GOALS:
        if device is not None and goal.device != device:
            continue
        name = f"[{goal.device}] {goal.name}"
        measured = goal.measure(folder)
        if not measured:
            rows.append((name, "-", goal.target, f"not measured ({goal.missing})", "-"))
        for m in measured:
            label = name + (f" ({m.note})" if m.note and m.value is not None else "")
            if m.value is None:
                rows.append((label, "-", goal.target, f"not measured ({m.note})", run_label(m.source, m.file)))
            else:
                status = "pass" if goal.passes(m.value) else "FAIL"
                rows.append((label, goal.unit(m.value), goal.target, status, run_label(m.source, m.file)))
    return rows


def render(rows) -> str:
    lines = ["| goal | measured | target | status | run (machine, date, mode, file) |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.split(":")[0])
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="only this device's goals (default: all)")
    parser.add_argument("--results", default=RESULTS_DIR, help="results folder (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.results):
        parser.error(f"--results: {args.results} is not a folder")
    print(render(goal_rows(args.results, args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
