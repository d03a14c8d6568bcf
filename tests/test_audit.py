"""sf.audit and `selfreplay audit`: pilots over learning rates x replay weights, the verdict's rule, its flip
between a model with spare capacity and one saturated on purpose, resumption, determinism, argument errors."""

import json
import math
import os
import sys

import pytest
import torch

import selfreplay_fast as sf
from selfreplay_fast import audit_pilot, cli
from selfreplay_fast.audit_pilot import CellResult
from selfreplay_fast.audit_report import verdict

import audit_cases as ac

GRID = dict(learning_rates=[1e-2, 3e-2], replay_weights=[0, 1, 3], steps=40, batch_size=16, replay_sequences=64,
            replay_max_new_tokens=ac.LENGTH - 1, replay_top_k=8, device="cpu", progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_models")
    return {"spare": ac.saved_model(root / "spare", 32), "saturated": ac.saved_model(root / "saturated", 2),
            "task": ac.task_file(root / "task.jsonl")}


def _cells(path):
    with open(path) as f:
        data = json.load(f)
    for cell in data["cells"]:
        cell.pop("seconds")
    return data


def test_verdict_flips_between_spare_capacity_and_a_saturated_model(models, tmp_path):
    spare = sf.audit(models["spare"], models["task"], out_dir=tmp_path / "spare", **GRID)
    saturated = sf.audit(models["saturated"], models["task"], out_dir=tmp_path / "saturated", **GRID)

    # spare capacity: plain fine-tuning drifts, replay removes nearly all of it at no task cost
    ref = spare.cell(*[(c.learning_rate, c.replay_weight) for c in spare.cells if c.key() == spare.verdict.reference][0])
    assert ref.plain and ref.drift > 0.005
    assert spare.verdict.kind == "replay-works", spare.table
    best = next(c for c in spare.cells if c.key() == spare.verdict.recommended)
    assert best.replay_weight > 0 and best.drift < 0.05 * ref.drift
    assert best.task_loss <= ref.task_loss * 1.01
    assert spare.before_task_loss > 2 * ref.task_loss  # the pilots did learn the task

    # saturated: the drift of the best plain run is large and every cell that removes most of it costs task loss
    assert saturated.verdict.kind == "capacity-bound", saturated.table
    assert saturated.verdict.recommended is None
    sref = next(c for c in saturated.cells if c.key() == saturated.verdict.reference)
    assert sref.drift > 20 * ref.drift
    for c in saturated.cells:
        if c.drift < 0.2 * sref.drift:
            assert c.task_loss > 1.05 * sref.task_loss, saturated.table
    assert "replay will not save you" in saturated.table

    # outputs: the table lists every cell, the JSON holds them, the plot was drawn
    assert len(spare.table.splitlines()) == 2 + 1 + 6 + 2
    data = _cells(spare.json_path)
    assert data["verdict"]["kind"] == "replay-works" and len(data["cells"]) == 6
    assert spare.plot_path and os.path.getsize(spare.plot_path) > 1000
    with open(os.path.join(tmp_path / "spare", "audit_table.md")) as f:
        assert f.read().strip() == spare.table.strip()


def test_cli_end_to_end_resumes_and_is_deterministic(models, tmp_path, capsys, monkeypatch):
    args = ["audit", "--model", models["spare"], "--data", models["task"], "--learning-rates", "0.01,0.03",
            "--replay-weights", "0,3", "--steps", "20", "--batch-size", "8", "--replay-sequences", "32",
            "--replay-max-new-tokens", str(ac.LENGTH - 1), "--replay-top-k", "8", "--device", "cpu", "--no-progress",
            "--seed", "3"]
    first = str(tmp_path / "first")
    assert cli.main(args + ["--out-dir", first]) == 0
    out = capsys.readouterr().out
    assert "| learning rate | replay weight |" in out and "verdict (" in out
    assert sorted(os.listdir(os.path.join(first, "cells"))) == sorted(
        audit_pilot.cell_key(lr, w) + ".json" for lr in (0.01, 0.03) for w in (0, 3))
    assert os.path.isdir(os.path.join(first, "replay"))  # the replay it generated, in its own directory

    # a rerun skips every finished cell; a lost cell is the only one run again
    ran = []
    real = audit_pilot.run_pilot

    def counting(*a, **kw):
        ran.append((kw["learning_rate"], kw["replay_weight"]))
        return real(*a, **kw)

    # sf.audit is the function; its module is selfreplay_fast.audit in sys.modules
    monkeypatch.setattr(sys.modules["selfreplay_fast.audit"], "run_pilot", counting)
    assert cli.main(args + ["--out-dir", first]) == 0
    assert ran == []
    os.remove(os.path.join(first, "cells", audit_pilot.cell_key(0.03, 3) + ".json"))
    assert cli.main(args + ["--out-dir", first]) == 0
    assert ran == [(0.03, 3.0)]
    capsys.readouterr()

    # the same seed elsewhere gives the same numbers (the rerun cell included); another seed does not
    second = str(tmp_path / "second")
    assert cli.main(args + ["--out-dir", second]) == 0
    a, b = _cells(os.path.join(first, "audit.json")), _cells(os.path.join(second, "audit.json"))
    assert a["cells"] == b["cells"] and a["verdict"] == b["verdict"]
    assert cli.main(args[:-1] + ["4", "--out-dir", str(tmp_path / "other")]) == 0
    c = _cells(os.path.join(tmp_path / "other", "audit.json"))
    assert [x["task_loss"] for x in c["cells"]] != [x["task_loss"] for x in a["cells"]]

    # a finished directory run with other settings is refused in one line, its cells untouched
    capsys.readouterr()
    changed = [("21" if a == "20" else a) for a in args]  # --steps 21: the finished cells are not its cells
    assert cli.main(changed + ["--out-dir", first]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings (pilot differ)" in err, err
    assert cli.main(args[:-1] + ["5", "--out-dir", first]) == 1  # another seed: the generated replay refuses first
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed: 3 there, 5 now" in err, err


@pytest.mark.parametrize("extra, message", [
    (["--replay-weights", "1,3"], "argument --replay-weights: must include 0"),
    (["--learning-rates", "0.01,x"], "argument --learning-rates: expected a number"),
    (["--learning-rates", "0.01,0.01"], "argument --learning-rates: values repeat"),
    (["--replay-weights", "0,-1"], "argument --replay-weights: expected a finite number >= 0"),
    (["--replay-top-k", "999"], "argument --replay-top-k: 999 exceeds the model's vocabulary size"),
    (["--device", "nonsense"], "argument --device: 'nonsense' is not a torch device"),
    (["--task-holdout", "1.5"], "argument --task-holdout: expected a fraction in (0, 1)"),
    (["--replay-loss", "mse"], "argument --replay-loss: invalid choice"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1"),
])
def test_bad_arguments_give_one_line_errors(models, tmp_path, capsys, extra, message):
    code = cli.main(["audit", "--model", models["spare"], "--data", models["task"], "--out-dir", str(tmp_path / "o"),
                     "--no-progress", "--replay-top-k", "8"] + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not os.path.exists(tmp_path / "o")


def test_bad_files_give_one_line_errors(models, tmp_path, capsys):
    base = ["audit", "--out-dir", str(tmp_path / "o"), "--no-progress", "--replay-top-k", "8", "--device", "cpu"]
    text = tmp_path / "task.txt"
    text.write_text("hello\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"input_ids": [1, 2, 3]}\nnot json\n')
    cases = [
        (["--model", str(tmp_path), "--data", models["task"]], 2, "is not a Hugging Face model directory"),
        (["--model", models["spare"], "--data", str(tmp_path / "none.jsonl")], 2, "argument --data: no such file"),
        (["--model", models["spare"], "--data", str(text)], 2, "argument --data: expected a .jsonl file"),
        (["--model", models["spare"], "--data", str(bad_json)], 1, "bad.jsonl:2 is not JSON"),
    ]
    for args, code, message in cases:
        assert cli.main(base + args) == code, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def _cell(lr, w, task, drift, se=0.001):
    return CellResult(learning_rate=lr, replay_weight=w, replay_loss="kl" if w else "none", task_loss=task,
                      drift=drift, drift_stderr=se, replay_nll=math.nan, seconds=0.0)


def test_the_verdict_rule():
    # reference: the plain run with the lowest task loss (lr 1e-3 here), its drift 1.0
    cells = [_cell(1e-4, 0, 2.10, 0.30), _cell(1e-3, 0, 2.00, 1.00), _cell(1e-3, 1, 2.01, 0.15),
             _cell(1e-3, 3, 2.016, 0.05), _cell(1e-3, 10, 2.10, 0.01)]
    v = verdict(cells, max_task_cost=0.01, min_drift_removed=0.8)
    assert v.kind == "replay-works" and v.reference == cells[1].key()
    assert v.recommended == cells[3].key()  # the most drift removed (95%) within +1% task loss
    assert "removes 95%" in v.message and "+0.8% task loss" in v.message
    # a tighter budget excludes it and the weight-1 cell (85%) is the best left
    assert verdict(cells, max_task_cost=0.006).recommended == cells[2].key()
    # nothing within budget removes 80%: capacity-bound, and the cheapest cell that does says the cost
    v = verdict(cells, max_task_cost=0.004)
    assert v.kind == "capacity-bound" and v.recommended is None and v.cheapest_fix == cells[2].key()
    assert "removing 85% costs +0.5% task loss" in v.message
    # a lower learning rate alone can be the answer
    cells2 = [_cell(1e-4, 0, 2.005, 0.1), _cell(1e-3, 0, 2.0, 1.0), _cell(1e-3, 1, 2.1, 0.5)]
    assert verdict(cells2).kind == "low-lr-works" and verdict(cells2).recommended == cells2[0].key()
    # no measurable drift
    assert verdict([_cell(1e-3, 0, 2.0, 0.001, se=0.002), _cell(1e-3, 1, 2.0, 0.0)]).kind == "no-drift"
    with pytest.raises(ValueError, match="replay_weights: the grid needs weight 0"):
        verdict([_cell(1e-3, 1, 2.0, 0.1)])


def test_library_argument_errors(models, tmp_path):
    with pytest.raises(ValueError, match="replay_weights must include 0"):
        sf.audit(models["spare"], models["task"], out_dir=tmp_path, replay_weights=[1, 2])
    with pytest.raises(ValueError, match="learning_rates: expected finite numbers > 0"):
        sf.audit(models["spare"], models["task"], out_dir=tmp_path, learning_rates=[0.0])
    with pytest.raises(ValueError, match="replay_loss must be one of"):
        sf.audit(models["spare"], models["task"], out_dir=tmp_path, replay_loss="mse")
    with pytest.raises(ValueError, match="task: expected at least 2 sequences"):
        sf.audit(models["spare"], [[1, 2]], out_dir=tmp_path, device="cpu")
    with pytest.raises(TypeError, match="lora must be True or False"):
        sf.audit(models["spare"], models["task"], out_dir=tmp_path, lora="yes")


def test_lora_pilots_train_only_adapters(models, tmp_path):
    pytest.importorskip("peft")
    model = ac.bigram_model(32)
    ac.pretrain_on_a(model, steps=60)
    # a 0-layer model has no linear layer but the head: give LoRA a layer to adapt
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    one_layer = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 1}))
    before = {n: p.detach().clone() for n, p in one_layer.named_parameters()}
    result = sf.audit(one_layer, models["task"], out_dir=tmp_path / "lora", lora=True, lora_rank=2,
                      **{**GRID, "learning_rates": [3e-2], "replay_weights": [0, 3], "steps": 10})
    assert len(result.cells) == 2 and all(math.isfinite(c.task_loss) and c.drift >= 0 for c in result.cells)
    assert result.cells[0].task_loss < result.before_task_loss  # the adapters learned something
    for n, p in one_layer.named_parameters():  # the original model is untouched
        assert torch.equal(p, before[n]), n
