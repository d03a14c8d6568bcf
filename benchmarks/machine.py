"""Machine description stored with every benchmark result, so a number always names its machine."""

from __future__ import annotations

import json
import os
import platform
import socket
from datetime import datetime, timezone

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Quick (smoke) runs land here, never beside the committed results; benchmarks/.gitignore ignores it.
SCRATCH_DIR = os.path.join(RESULTS_DIR, "scratch")
RUN_MODES = ("full", "quick")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> dict:
    info = {
        "hostname": socket.gethostname(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def machine_label(machine: dict) -> str:
    """A result's machine in a few words: the GPU, else the CPU and its core count."""
    if machine.get("gpu"):
        return machine["gpu"]
    if machine.get("cpu"):
        return f"{machine['cpu']} ({machine.get('cpu_count', '?')} cores)"
    return "machine not recorded"


def results_dir(quick: bool) -> str:
    """Where a run writes by default: benchmarks/results/ for a full run, its git-ignored scratch/ for a
    quick one (quick numbers must never replace the committed ones)."""
    return SCRATCH_DIR if quick else RESULTS_DIR


def results_path(name: str, quick: bool = False, out_dir: str = None) -> str:
    """<out_dir>/<name>.json (default: :func:`results_dir`), the folder created if missing."""
    folder = out_dir or results_dir(quick)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}.json")


def run_record(quick: bool, note: str = None) -> dict:
    """What every result JSON says about its run besides the machine: quick or full, when, the load the
    machine was under as it started (1, 5, 15-minute load averages: on a shared machine, read the timings
    against them) and an optional note."""
    record = {"mode": "quick" if quick else "full", "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "load_average_at_start": list(os.getloadavg())}
    if note:
        record["note"] = note
    return record


def write_result(path: str, result: dict) -> None:
    """Write a result JSON atomically (temp file + rename): benchmarks rewrite it after every row, so a
    run stopped by a time limit leaves the last complete version, never a truncated file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def written_bytes(folder: str) -> int:
    """Bytes of every file under ``folder``: what a run wrote to disk, read from the files themselves (the
    cache format's bytes per token change with its version, so never from a formula)."""
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total
