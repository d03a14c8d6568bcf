"""The demo's mechanics on a very short schedule (the full run's numbers are in the README)."""

import json

import pytest
import torch

from selfreplay_fast import cli
from selfreplay_fast.demo import DemoConfig, next_token_loss, run_demo
from selfreplay_fast.demo_data import BOS, VOCAB_SIZE, decode, encode, load_texts


@pytest.fixture(scope="module")
def texts():
    return load_texts()


def test_texts_ship_with_python_and_differ(texts):
    prose, code = texts
    assert len(prose) > 100_000 and len(code) > 100_000
    assert code.count("def ") > 1000 and prose.count("def ") < code.count("def ") / 10
    assert decode(encode(prose[:500])) == prose[:500]


def test_task_loss_is_the_cross_entropy():
    cfg = DemoConfig(hidden_size=32, num_layers=1, num_heads=2)
    from selfreplay_fast.demo import build_model

    model = build_model(cfg)
    windows = torch.randint(0, 256, (3, 9))
    windows[:, 0] = BOS
    logits = model(input_ids=windows).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), windows[:, 1:].reshape(-1))
    torch.testing.assert_close(next_token_loss(model, windows), expected, rtol=1e-5, atol=1e-6)


def _tiny(tmp_path, **over):
    cfg = dict(hidden_size=32, num_layers=1, num_heads=2, seq_len=24, pretrain_steps=6, finetune_steps=4,
               batch_size=4, replay_batch_size=2, replay_sequences=8, replay_top_k=4, eval_windows=4,
               task_windows=32, learning_rates=(3e-3,), replay_weights=(0.0, 2.5), max_task_cost=10.0,
               min_drift_removed=0.01, out_dir=str(tmp_path), progress=False)
    cfg.update(over)
    return DemoConfig(**cfg)


def test_demo_runs_through_the_audit_and_is_deterministic(tmp_path):
    first = run_demo(_tiny(tmp_path / "a"))
    second = run_demo(_tiny(tmp_path / "b"))
    # max_task_cost=10, min_drift_removed=0.01: the rule picks the run that removes the most drift
    assert set(first.runs) == {"plain", "replay", "NLL replay (no teacher)"}
    assert first.runs["replay"].replay_weight == 2.5 and first.runs["plain"].replay_weight == 0
    for name in first.runs:
        a, b = first.runs[name], second.runs[name]
        assert (a.loss_a, a.loss_b, a.drift) == (b.loss_a, b.loss_b, b.drift)
    assert first.replay_tokens > 0 and first.before_a > 0
    # fine-tuning on B without replay must change the loss on A, and drift from the pretrained model
    assert first.runs["plain"].loss_a != first.before_a and first.runs["plain"].drift > 0
    assert first.runs["replay"].drift < first.runs["plain"].drift  # the rule's pick removes drift
    # The audit's own report is the demo's grid, not the one-cell NLL baseline run after it.
    report = json.loads((tmp_path / "a" / "audit" / "audit.json").read_text())
    assert [(c["learning_rate"], c["replay_weight"], c["replay_loss"]) for c in report["cells"]] == [
        (3e-3, 0.0, "none"), (3e-3, 2.5, "kl")]


def test_demo_cli_prints_table_and_writes_results(tmp_path, capsys):
    argv = ["demo", "--out-dir", str(tmp_path), "--pretrain-steps", "3", "--finetune-steps", "4",
            "--replay-sequences", "8", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
            "--seq-len", "16", "--learning-rates", "0.003", "--replay-weights", "0,3", "--max-task-cost", "10",
            "--min-drift-removed", "0.01", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| plain |" in out and "| replay |" in out and "| NLL replay (no teacher) |" in out
    assert "drift estimate ranks the runs as their loss on A does:" in out and "audit: recommended:" in out
    result = json.loads((tmp_path / "demo_result.json").read_text())
    assert len(result["runs"]) == 3 and result["forgetting_removed"] > 0
    assert result["config"]["hidden_size"] == 32 and result["config"]["learning_rates"] == [0.003]
    assert (tmp_path / "demo_losses.png").exists() and (tmp_path / "audit" / "audit.json").exists()
    assert result["cpu_seconds"] > 0 and "s CPU" in out
    # what `selfreplay audit` reads: the very model the demo's audit ran on, and task B's windows
    from transformers import AutoModelForCausalLM

    from selfreplay_fast.fingerprint import weights_fingerprint

    saved = AutoModelForCausalLM.from_pretrained(result["model_dir"])
    settings = json.loads((tmp_path / "audit" / "settings.json").read_text())
    assert weights_fingerprint(saved) == settings["model_fingerprint"]
    rows = [json.loads(line)["input_ids"] for line in (tmp_path / "task_b.jsonl").read_text().splitlines()]
    assert len(rows) == result["config"]["task_windows"] and all(len(r) == 16 and r[0] == BOS for r in rows)


def test_demo_cli_refuses_a_grid_without_plain_runs(tmp_path, capsys):
    assert cli.main(["demo", "--out-dir", str(tmp_path), "--replay-weights", "1,3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --replay-weights: must include 0" in err
