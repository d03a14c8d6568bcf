"""Every code block of README.md runs as written.

Python blocks run one by one, each in a fresh namespace holding what the README's prose says the reader
has (a causal LM ``model``, a ``task_loader``, an ``optimizer``, a ``train_dataset`` with its ``collator``, a
replay ``batch``, an initialized ``dist``, for the TRL block a ``tokenizer`` and a conversational ``chat_dataset``), on a tiny random Llama, in a temporary working directory (the
blocks write ``replay/`` and ``run/``). The bash blocks are the quickstart: the test command must be the one
``.ci/run`` runs, and the demo command installs the same way.
"""

import os
import re

import pytest
import torch

import selfreplay_fast as sf
from text_data import RandomTexts, collate_padded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 97


def _blocks(language):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(rf"```{language}\n(.*?)```", text, re.S)]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=320,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                                        initializer_range=0.2))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The blocks' working directory, with the README's replay buffer generated once (a block that calls
    generate_replay with the same arguments then reuses it, as a rerun does)."""
    directory = tmp_path_factory.mktemp("readme")
    sf.generate_replay(_model(), num_sequences=1_000, max_new_tokens=128, top_k=64, out_dir=str(directory / "replay"),
                       progress=False)
    return directory


@pytest.fixture
def dist(tmp_path):
    """A one-process gloo group for the block that all-reduces, taken down after it (later tests must not see
    a process group)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


PYTHON_BLOCKS = _blocks("python")


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_written(line, code, workdir, request, monkeypatch):
    monkeypatch.chdir(workdir)
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_dataset = RandomTexts(128, VOCAB, min_len=5, max_len=20)  # the Trainer block: 3 epochs of 4 steps, one log at step 10
    replay = sf.ReplayBuffer.load(str(workdir / "replay"))
    namespace = {
        "sf": sf, "torch": torch, "model": model, "replay": replay,
        "task_loader": torch.utils.data.DataLoader(train_dataset, batch_size=4, collate_fn=collate_padded),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "train_dataset": train_dataset, "collator": collate_padded, "batch": next(replay.batches(4)),
    }
    if "dist." in code:
        namespace["dist"] = request.getfixturevalue("dist")
    if "chat_dataset" in code:  # a word-level tokenizer with a chat template, and TRL's conversational form
        from datasets import Dataset
        from trl_data import rows, tiny_tokenizer

        namespace["tokenizer"] = tiny_tokenizer(VOCAB)
        namespace["chat_dataset"] = Dataset.from_list(rows("messages", 32, vocab_size=VOCAB))
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    # Each block did its work: trained, measured, or computed a loss with gradients.
    if "optimizer.step()" in code:
        trained = namespace["model"]
        changed = [n for n, p in trained.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
        assert changed and all(torch.isfinite(p).all() for p in trained.parameters())
    if "trainer.train()" in code:
        assert any("replay_kl" in entry for entry in namespace["trainer"].state.log_history)
        lora_b = [p for n, p in namespace["model"].named_parameters() if "lora_B" in n]  # initialized to 0
        assert lora_b and any(p.abs().sum() > 0 for p in lora_b) and all(torch.isfinite(p).all() for p in lora_b)
    if "replay_stream" in code:
        assert namespace["replay_stream"].position == len(namespace["task_loader"])
    if "measure_forgetting" in code:
        report = namespace["report"]  # of the original model itself: no drift, up to rounding
        assert report.num_sequences == 100 and abs(report.replay_kl.value) < 1e-6 and report.replay_nll.value > 1
    if code.startswith("hidden = sf.last_hidden_states"):
        assert torch.isfinite(namespace["kl"])
    if "ReplayStep(model" in code:
        assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()


def _ci_test_command():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.startswith("pip install") and "pytest" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_quickstart_commands():
    (_, demo), (_, tests) = _blocks("bash")
    # CI runs the README's test command (its pip calls with -q, which only quiets pip)
    assert tests.strip() == _ci_test_command().replace("pip install -q ", "pip install ")
    install, run = demo.strip().rsplit(" && ", 1)
    assert run == "selfreplay demo"
    # the same two-step install as the tests' (torch first, then the package against it), with the plot extra
    assert install.replace('".[plot]"', '".[test]"') == tests.strip().rsplit(" && ", 1)[0].replace(" triton==3.8.0", "")
