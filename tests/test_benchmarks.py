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
                         "--speculative", "--spec-batch-size", "2", "--no-vllm", "--out", str(out)])
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


def test_bench_generate_more_sequences_than_slots_without_hf_scores(tmp_path):
    """--num-sequences 5 in 2 slots: generate_replay refills its slots, HF runs 3 calls (2, 2, 1); with
    --no-hf-scores only HF's no-scores loop is timed and the ratio is against it."""
    from benchmarks import bench_generate

    out = tmp_path / "generate.json"
    bench_generate.main(["--batch-size", "2", "--num-sequences", "5", "--max-new-tokens", "3", "--repeats", "1",
                         "--vocab", "300", "--top-k", "4", "--no-vllm", "--no-hf-scores", "--out", str(out)])
    report = json.loads(out.read_text())
    results = report["results"]
    assert report["config"]["num_sequences"] == 5 and report["config"]["batch_size"] == 2
    assert "hf_generate" not in results and "speedup_vs_hf" not in results
    assert results["speedup_vs_hf_no_scores"] == pytest.approx(
        results["generate_replay"]["tokens_per_s_median"] / results["hf_generate_no_scores"]["tokens_per_s_median"])
    assert results["generate_replay"]["bytes_written"] > 0
    with pytest.raises(SystemExit):  # the vLLM row times one batch only
        bench_generate.main(["--batch-size", "2", "--num-sequences", "5", "--out", str(tmp_path / "x.json")])


# ----------------------------------------------------------------------------------------------------
# Quick runs never touch the committed results; every result says which run it comes from
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def results_dirs(tmp_path, monkeypatch):
    """benchmarks/results/ and its scratch/ moved to tmp_path, as the path logic reads them."""
    from benchmarks import machine

    results = tmp_path / "results"
    monkeypatch.setattr(machine, "RESULTS_DIR", str(results))
    monkeypatch.setattr(machine, "SCRATCH_DIR", str(results / "scratch"))
    return results


def _files_under(folder):
    return sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder) for f in files)


def test_quick_entry_point_writes_only_to_scratch(results_dirs, monkeypatch):
    from benchmarks import __main__ as entry
    from benchmarks import bench_kl

    monkeypatch.setattr(bench_kl, "QUICK", {"tokens": "8", "vocab": 64, "repeats": 1})  # tinier than a smoke run
    assert entry.main(["--quick", "--only", "kl", "--no-plots"]) == 0
    assert _files_under(results_dirs) == ["scratch/kl_cpu.json"]
    result = json.loads((results_dirs / "scratch" / "kl_cpu.json").read_text())
    assert result["run"]["mode"] == "quick" and result["run"]["date_utc"].startswith("20")
    assert result["machine"]["cpu_count"] >= 1 and result["config"]["vocab"] == 64
    assert [(r["impl"], r["tokens"]) for r in result["results"]] == [("naive", 8), ("fused_torch", 8)]


def test_result_paths_full_quick_and_explicit(results_dirs, tmp_path):
    from benchmarks.machine import results_path

    assert results_path("kl_cpu") == str(results_dirs / "kl_cpu.json")
    assert results_path("kl_cpu", quick=True) == str(results_dirs / "scratch" / "kl_cpu.json")
    assert results_path("kl_cpu", quick=True, out_dir=str(tmp_path / "mine")) == str(tmp_path / "mine" / "kl_cpu.json")


def test_scratch_is_git_ignored():
    from benchmarks.machine import RESULTS_DIR, SCRATCH_DIR

    assert os.path.dirname(SCRATCH_DIR) == RESULTS_DIR
    probe = os.path.join(os.path.relpath(SCRATCH_DIR, REPO), "kl_cpu.json")
    import subprocess

    ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO)
    committed = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/kl_cpu.json"], cwd=REPO)
    assert ignored.returncode == 0 and committed.returncode == 1


def test_quick_generate_is_labelled_and_goes_to_scratch(results_dirs):
    from benchmarks import bench_generate

    bench_generate.main(["--quick", "--batch-size", "2", "--max-new-tokens", "4", "--vocab", "300", "--no-vllm"])
    assert _files_under(results_dirs) == ["scratch/generate_cpu.json"]
    report = json.loads((results_dirs / "scratch" / "generate_cpu.json").read_text())
    assert report["run"]["mode"] == "quick" and report["config"]["repeats"] == 1
    native = report["results"]["generate_replay"]
    # read from the files written: positive, and per generated token (2 sequences x 4 tokens)
    assert native["bytes_written"] > 0 and native["bytes_per_token"] == pytest.approx(native["bytes_written"] / 8)
    hf = report["results"]["hf_generate"]
    assert hf["bytes_written"] == 0 and hf["dense_scores_bytes"] == 4 * 2 * 300 * 4  # 4 steps x [2, 300] fp32
    assert report["results"]["generate_replay_vllm"] == {"skipped": "--no-vllm"}


def test_written_bytes_counts_every_file(tmp_path):
    from benchmarks.machine import written_bytes

    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 7)
    assert written_bytes(str(tmp_path)) == 17


# ----------------------------------------------------------------------------------------------------
# The headline KL row runs first
# ----------------------------------------------------------------------------------------------------


def test_kl_headline_row_runs_first():
    from benchmarks import bench_kl

    order = bench_kl.run_order(bench_kl.DEFAULT_TOKENS["cuda"], bench_kl.IMPLS_CUDA)
    assert order[:2] == [(8192, "fused_triton"), (8192, "bare_matmuls")]
    assert [t for t, _ in order] == sorted((t for t, _ in order), reverse=True)
    assert bench_kl.run_order(bench_kl.DEFAULT_TOKENS["cpu"], bench_kl.IMPLS_CPU)[0] == (4096, "naive")
    # the GPU suite's kl step gives its token counts explicitly: the headline first there too
    with open(os.path.join(REPO, "benchmarks", "gpu_suite.sh")) as f:
        suite = f.read()
    kl_step = suite[suite.index("bench_kl --device cuda"):].split(";;")[0]
    tokens = kl_step.split("--tokens", 1)[1].split()[0]
    assert tokens.split(",")[0] == "8192"


# ----------------------------------------------------------------------------------------------------
# The vLLM row: skipped with a reason, and the worker protocol (a stand-in interpreter: no vLLM needed)
# ----------------------------------------------------------------------------------------------------


def test_generate_skips_vllm_row_with_reason(tmp_path, capsys):
    from benchmarks import bench_generate

    out = tmp_path / "g.json"
    missing = str(tmp_path / "nope" / "python")
    bench_generate.main(["--batch-size", "2", "--max-new-tokens", "3", "--repeats", "1", "--vocab", "300",
                         "--vllm-python", missing, "--out", str(out)])
    skipped = json.loads(out.read_text())["results"]["generate_replay_vllm"]["skipped"]
    assert f"{missing} does not exist" in skipped
    assert f"vLLM row skipped: {skipped}" in capsys.readouterr().out


def _fake_python(tmp_path, body):
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_vllm_worker_protocol_reads_marked_lines_among_logs(tmp_path):
    from benchmarks.bench_generate import measure_interleaved
    from benchmarks.vllm_row import MARK, VllmWorker

    python = _fake_python(tmp_path, f"""echo "INFO engine log line"
echo '{MARK}{{"ready": true, "vllm": "stand-in"}}'
n=0
while read line; do n=$((n + 1)); echo "INFO step"; echo '{MARK}{{"tokens_per_s": '$n'.5, "bytes_written": 40}}'; done
""")
    worker = VllmWorker(python, str(tmp_path), batch_size=2, max_new_tokens=3, top_k=4, engine_args={})
    try:
        assert worker.ready == {"ready": True, "vllm": "stand-in"}
        out = measure_interleaved({"generate_replay_vllm": worker.run}, 3)
    finally:
        worker.close()
    assert out["generate_replay_vllm"] == {"tokens_per_s_median": 2.5, "tokens_per_s_runs": [1.5, 2.5, 3.5],
                                           "bytes_written": 40}


def test_vllm_worker_failure_is_recorded_not_fatal(tmp_path):
    from benchmarks.bench_generate import measure_interleaved
    from benchmarks.vllm_row import MARK, VllmWorker

    dead = _fake_python(tmp_path, 'echo "RuntimeError: no CPU attention for head dim 16" >&2\nexit 3\n')
    with pytest.raises(RuntimeError, match=r"exited \(3\): RuntimeError: no CPU attention for head dim 16"):
        VllmWorker(dead, str(tmp_path), batch_size=2, max_new_tokens=3, top_k=4, engine_args={})
    (tmp_path / "python").unlink()
    failing = _fake_python(tmp_path, f"echo '{MARK}{{\"ready\": true}}'\nread line\necho '{MARK}{{\"error\": \"OOM\"}}'\n")
    worker = VllmWorker(failing, str(tmp_path), batch_size=2, max_new_tokens=3, top_k=4, engine_args={})
    calls = []
    try:
        out = measure_interleaved({"other": lambda: calls.append(1) or (1.0, {}), "generate_replay_vllm": worker.run}, 2,
                                  optional=("generate_replay_vllm",))
    finally:
        worker.close()
    assert out["generate_replay_vllm"] == {"error": "RuntimeError: vLLM worker: OOM"} and len(calls) == 2
    with pytest.raises(ZeroDivisionError):  # a contender not named optional still fails the run
        measure_interleaved({"other": lambda: 1 / 0}, 1, optional=("generate_replay_vllm",))
