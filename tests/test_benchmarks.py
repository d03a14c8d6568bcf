"""The benchmark scripts run end to end at tiny shapes and write complete result JSON (CPU paths; the GPU
suite runs the same code at real shapes)."""

import json
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    # `benchmarks` is a folder of the repository, not of the installed package; bench_kl's workers run
    # `python -m benchmarks.bench_kl` from the repository root.
    monkeypatch.syspath_prepend(REPO)
    monkeypatch.chdir(REPO)


def test_bench_kl_writes_every_row(tmp_path):
    from benchmarks import bench_kl

    out = tmp_path / "kl.json"
    bench_kl.main(["--device", "cpu", "--impls", "naive,fused_torch", "--tokens", "8,24", "--dim", "16",
                   "--vocab", "64", "--k", "4", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["config"] == {"dim": 16, "vocab": 64, "k": 4, "dtype": "fp32", "device": "cpu", "repeats": 1,
                                "mode": "tail", "reduction": "mean"}
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["cpu_count"] >= 1
    rows = result["results"]
    assert [(r["impl"], r["tokens"]) for r in rows] == [("naive", 8), ("fused_torch", 8), ("naive", 24), ("fused_torch", 24)]
    for r in rows:
        assert "error" not in r, r
        assert r["time_s_median"] > 0 and len(r["time_s_all"]) == 1 and r["extra_peak_bytes"] >= 0
        # grad_hidden [tokens, 16] and grad_weight [64, 16], fp32
        assert r["returned_grad_bytes"] == (r["tokens"] * 16 + 64 * 16) * 4
    assert not (tmp_path / "kl.json.tmp").exists()


def test_bench_generate_records_throughput_and_speculation(tmp_path):
    from benchmarks import bench_generate

    out = tmp_path / "generate.json"
    bench_generate.main(["--batch-size", "3", "--max-new-tokens", "6", "--repeats", "1", "--vocab", "300",
                         "--speculative", "--spec-batch-size", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    results = report["results"]
    assert report["config"]["batch_size"] == 3 and report["config"]["max_new_tokens"] == 6
    for name in ("hf_generate", "generate_replay"):
        assert results[name]["tokens_per_s_median"] > 0
    assert results["speedup_vs_hf"] == pytest.approx(
        results["generate_replay"]["tokens_per_s_median"] / results["hf_generate"]["tokens_per_s_median"])
    spec = results["speculative"]
    assert "error" not in spec and spec["batch_size"] == 2
    assert 0.0 <= spec["speculative"]["acceptance_rate"] <= 1.0 and spec["speculative"]["target_forwards"] >= 1
