"""benchmarks.summary renders every goal from result JSONs: the measured value, pass/FAIL against the goal,
"not measured" (no result, or a result at another shape), and the run (machine, date, quick/full) of each row.
Synthetic results with known ratios; no timing."""

import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
H200 = {"gpu": "NVIDIA H200", "cpu": "Intel Xeon", "cpu_count": 16, "date_utc": "2026-12-01T10:00:00+00:00"}
EPYC = {"cpu": "AMD EPYC", "cpu_count": 2, "date_utc": "2026-11-23T01:46:34+00:00"}


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.syspath_prepend(REPO)


def _write(folder, name, result):
    (folder / name).write_text(json.dumps(result))


def _kl_row(impl, tokens, seconds, extra_mib, grad_mib=0):
    return {"impl": impl, "tokens": tokens, "time_s_median": seconds, "extra_peak_bytes": extra_mib * MIB,
            "returned_grad_bytes": grad_mib * MIB}


def _rows_by_goal(folder, device=None):
    from benchmarks.summary import goal_rows

    return {row[0]: row[1:] for row in goal_rows(str(folder), device)}


def test_gpu_goals_pass_fail_and_run_labels(tmp_path):
    _write(tmp_path, "kl_cuda.json", {
        "config": {"dim": 4096, "vocab": 128256}, "machine": H200,
        "run": {"mode": "full", "date_utc": "2026-12-01T10:05:00+00:00"},
        "results": [_kl_row("fused_triton", 8192, 0.060, 1624, grad_mib=1024),  # 600 MiB beyond the gradients
                    _kl_row("bare_matmuls", 8192, 0.050, 1024), _kl_row("fused_triton", 2048, 0.5, 1)],
    })
    _write(tmp_path, "generate_cuda_batch256.json", {
        "config": {"batch_size": 256}, "machine": H200, "run": {"mode": "quick", "date_utc": "2026-12-01T11:00:00+00:00"},
        "results": {"speedup_vs_hf": 3.2,
                    "speculative": {"batch_size": 8, "speedup_vs_plain": 1.4, "speculative": {"acceptance_rate": 0.7}}},
    })
    rows = _rows_by_goal(tmp_path, "cuda")
    kl_time = rows["[cuda] KL fwd+bwd time / three bare bf16 matmuls (N=8192, D=4096, V=128256)"]
    assert kl_time == ("1.20x", "<= 1.25x", "pass", "NVIDIA H200, 2026-12-01, full (kl_cuda.json)")
    kl_mem = rows["[cuda] KL extra memory beyond the returned gradients (N=8192, D=4096, V=128256)"]
    assert kl_mem == ("600 MiB", "<= 512 MiB", "FAIL", "NVIDIA H200, 2026-12-01, full (kl_cuda.json)")
    gen = rows["[cuda] generate_replay / HF generate (output_scores), 1B model, batch 256 (batch 256)"]
    assert gen == ("3.20x", ">= 3x", "pass", "NVIDIA H200, 2026-12-01, quick (generate_cuda_batch256.json)")
    spec = rows["[cuda] speculative / plain generate_replay, batch <= 8 (batch 8, acceptance 0.70)"]
    assert spec[:3] == ("1.40x", ">= 1.5x", "FAIL") and ", quick (" in spec[3]
    topk = rows["[cuda] top-k log-probs (extension) / one read of the logits"]
    assert topk == ("-", "<= 1.5x", "not measured (no result)", "-")
    assert not any(name.startswith("[cpu]") for name in rows)


def test_result_at_another_shape_does_not_stand_in(tmp_path):
    # a quick KL run (small vocabulary) at the same token count: the CPU goals stay unmeasured
    _write(tmp_path, "kl_cpu.json", {
        "config": {"dim": 256, "vocab": 8192}, "machine": EPYC, "run": {"mode": "quick", "date_utc": "2026-12-02"},
        "results": [_kl_row("naive", 4096, 2.0, 100), _kl_row("fused_torch", 4096, 1.0, 5)],
    })
    rows = _rows_by_goal(tmp_path, "cpu")
    row = rows["[cpu] KL fwd+bwd time, fused_torch / naive (N=4096, D=256, V=65536)"]
    assert row == ("-", "<= 1x", "not measured (the result is at D=256, V=8192)", "AMD EPYC (2 cores), 2026-12-02, quick (kl_cpu.json)")


def test_cpu_goals_every_batch_and_unrecorded_mode(tmp_path):
    _write(tmp_path, "kl_cpu.json", {
        "config": {"dim": 256, "vocab": 65536}, "machine": EPYC, "run": {"mode": "full", "date_utc": "2026-11-23"},
        "results": [_kl_row("naive", 4096, 2.0, 1000), _kl_row("fused_torch", 4096, 2.2, 50),
                    _kl_row("naive", 1024, 1.0, 10)],
    })
    _write(tmp_path, "topk_cpu.json", {"machine": EPYC, "results": [{"impl": "extension", "median_s": 0.06},
                                                                    {"impl": "torch", "median_s": 0.2}]})
    for batch, speedup in ((64, 4.0), (8, 1.9)):
        _write(tmp_path, f"generate_cpu_batch{batch}.json", {"config": {"batch_size": batch}, "machine": EPYC,
                                                             "run": {"mode": "full"}, "results": {"speedup_vs_hf": speedup}})
    from benchmarks.summary import goal_rows, render

    rows = goal_rows(str(tmp_path), "cpu")
    by = {row[0]: row[1:4] for row in rows}
    assert by["[cpu] KL fwd+bwd time, fused_torch / naive (N=4096, D=256, V=65536)"] == ("1.10x", "<= 1x", "FAIL")
    assert by["[cpu] KL extra peak memory, fused_torch / naive (N=4096, D=256, V=65536)"] == ("5.0%", "<= 10%", "pass")
    assert by["[cpu] top-k log-probs (extension) / torch log_softmax + topk"] == ("0.30x", "<= 0.5x", "pass")
    gen = [row for row in rows if "every batch" in row[0]]
    assert [(row[0].rsplit("(", 1)[1], row[1], row[3]) for row in gen] == [("batch 8)", "1.90x", "FAIL"), ("batch 64)", "4.00x", "pass")]
    # a result without a run record (older files) says so instead of passing for full or quick
    topk_run = next(row[4] for row in rows if "top-k" in row[0])
    assert topk_run == "AMD EPYC (2 cores), 2026-11-23, mode not recorded (topk_cpu.json)"
    text = render(rows).splitlines()
    assert text[0] == "| goal | measured | target | status | run (machine, date, mode, file) |"
    assert len(text) == 2 + len(rows) and all(line.count(" | ") == 4 for line in text[2:])


def test_every_goal_has_a_row_without_results(tmp_path):
    from benchmarks.summary import GOALS, goal_rows

    rows = goal_rows(str(tmp_path))
    assert len(rows) == len(GOALS) and all(row[3].startswith("not measured") for row in rows)
    assert {g.device for g in GOALS} == {"cpu", "cuda"}
