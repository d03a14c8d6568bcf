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
               eval_every=2, low_lr=None, out_dir=str(tmp_path), progress=False)
    cfg.update(over)
    return DemoConfig(**cfg)


def test_demo_runs_and_is_deterministic(tmp_path):
    first = run_demo(_tiny(tmp_path / "a"))
    second = run_demo(_tiny(tmp_path / "b"))
    assert set(first.runs) == {"plain", "replay"}
    for name in first.runs:
        assert first.runs[name].curve_a == second.runs[name].curve_a
        assert first.runs[name].curve_b == second.runs[name].curve_b
        assert first.runs[name].curve_steps == [0, 2, 4]
    assert first.replay_tokens > 0 and first.before_a > 0
    # fine-tuning on B without replay must change the loss on A
    assert first.runs["plain"].loss_a != first.before_a


def test_demo_cli_prints_table_and_writes_results(tmp_path, capsys):
    argv = ["demo", "--out-dir", str(tmp_path), "--pretrain-steps", "3", "--finetune-steps", "2",
            "--replay-sequences", "4", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
            "--seq-len", "16", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| plain |" in out and "| replay |" in out and "| plain, lr 0.0003 |" in out
    result = json.loads((tmp_path / "demo_result.json").read_text())
    assert set(result["runs"]) == {"plain", "replay", "plain, lr 0.0003"}
    assert result["config"]["hidden_size"] == 32
    assert (tmp_path / "demo_losses.png").exists()
