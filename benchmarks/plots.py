"""Plots of the benchmark results in benchmarks/results/ (PNG files next to the JSON they come from)."""

from __future__ import annotations

import glob
import json
import os

from benchmarks.machine import RESULTS_DIR, machine_label


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _load(path):
    with open(path) as f:
        return json.load(f)


def _machine_label(result) -> str:
    return machine_label(result["machine"])


def plot_kl(device: str, folder: str = RESULTS_DIR):
    path = os.path.join(folder, f"kl_{device}.json")
    if not os.path.exists(path):
        return None
    result = _load(path)
    plt = _pyplot()
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [r for r in result["results"] if "error" not in r]
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in mine]
        ax_time.plot(tokens, [r["time_s_median"] * 1e3 for r in mine], marker="o", label=impl)
        ax_mem.plot(tokens, [r["extra_peak_bytes"] / 2**20 for r in mine], marker="o", label=impl)
    cfg = result["config"]
    ax_time.set_title("forward + backward time")
    ax_time.set_ylabel("ms")
    ax_mem.set_title("extra peak memory")
    ax_mem.set_ylabel("MiB")
    for ax in (ax_time, ax_mem):
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"replay KL, D={cfg['dim']} V={cfg['vocab']} k={cfg['k']} {cfg['dtype']} — {_machine_label(result)}",
                 fontsize=9)
    fig.tight_layout()
    out = path[:-5] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_generate(device: str, folder: str = RESULTS_DIR):
    paths = glob.glob(os.path.join(folder, f"generate_{device}_batch*.json"))
    if not paths:
        return None
    runs = sorted((_load(p) for p in paths), key=lambda r: r["config"]["batch_size"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    batches = [r["config"]["batch_size"] for r in runs]
    for name, label in (("generate_replay", "selfreplay generate_replay (+ top-k teacher)"),
                        ("generate_replay_vllm", "generate_replay, backend=\"vllm\""),
                        ("hf_generate", "HF generate (output_scores)")):
        # rows a run skipped or lost (no vLLM, a failure) are left out, not drawn as zero
        points = [(b, r["results"][name]["tokens_per_s_median"]) for b, r in zip(batches, runs)
                  if "tokens_per_s_median" in r["results"].get(name, {})]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s")
    ax.grid(alpha=0.3)
    ax.legend()
    cfg = runs[0]["config"]
    ax.set_title(f"generation, {cfg['layers']}-layer d={cfg['hidden']} V={cfg['vocab']}, {cfg['max_new_tokens']} "
                 f"new tokens — {_machine_label(runs[0])}", fontsize=8)
    fig.tight_layout()
    out = os.path.join(folder, f"generate_{device}.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_topk(device: str, folder: str = RESULTS_DIR):
    path = os.path.join(folder, f"topk_{device}.json")
    if not os.path.exists(path):
        return None
    result = _load(path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = result["results"]
    ax.barh([r["impl"] for r in rows], [r["median_s"] * 1e3 for r in rows])
    ax.set_xlabel("ms (median)")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(f"top-k log-probs of [{result['config']['n']}, {result['config']['vocab']}] logits — "
                 f"{_machine_label(result)}", fontsize=8)
    fig.tight_layout()
    out = path[:-5] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def render_all(device: str, folder: str = RESULTS_DIR):
    """Every plot whose results exist in ``folder`` (the committed results by default; a quick run's scratch/)."""
    return [p for p in (plot_kl(device, folder), plot_topk(device, folder), plot_generate(device, folder)) if p]

