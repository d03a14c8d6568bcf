"""The ``selfreplay`` command line: ordinary mistakes get one line (exit 2) before any model loads,
failures while running one line (exit 1), Ctrl-C what is saved and how to resume (exit 130), and the
closing summary tells this run's counts from the buffer's."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selfreplay_fast import ReplayBuffer, cli, generation

VOCAB = 48
MAX_POSITIONS = 64


def _tiny_model(seed=0, vocab=VOCAB):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _save_word_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0").save_pretrained(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model without tokenizer files."""
    path = tmp_path_factory.mktemp("model")
    _tiny_model().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("model_tok")
    _tiny_model().save_pretrained(path)
    _save_word_tokenizer(path)
    return str(path)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model weights are loaded."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(generation, "load_model_for_generation", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _one_line_error(capsys, command, code, rc):
    captured = capsys.readouterr()
    assert rc == code, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"selfreplay {command}: error: "), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


def _last_line(text):  # the lines above it, if any, are library warnings
    return text.strip().splitlines()[-1]


def _last_json(out):
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------ usage errors, before any model loads


def _files(tmp_path):
    """Input files of every kind of damage, by name."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    text_jsonl = tmp_path / "text.jsonl"
    text_jsonl.write_text(json.dumps({"input_ids": [3, 4]}) + "\n" + json.dumps({"text": "w3 w4"}) + "\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps({"input_ids": [3, 4]}) + "\n{not json\n")
    out_of_vocab = tmp_path / "oov.jsonl"
    out_of_vocab.write_text(json.dumps({"input_ids": [3, VOCAB]}) + "\n")
    negative_id = tmp_path / "negative.jsonl"
    negative_id.write_text(json.dumps({"input_ids": [3, -1]}) + "\n")
    empty_ids = tmp_path / "empty_ids.jsonl"
    empty_ids.write_text(json.dumps({"input_ids": []}) + "\n")
    not_ids = tmp_path / "not_ids.jsonl"
    not_ids.write_text(json.dumps({"input_ids": "3 4"}) + "\n")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00{")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w3 w4\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    other_vocab = tmp_path / "other_vocab"
    _tiny_model(vocab=VOCAB + 3).config.save_pretrained(other_vocab)
    return {name: str(path) for name, path in locals().items() if name != "tmp_path"}


GENERATE_CASES = [
    # (extra argv, the argument the message must name, a phrase it must hold)
    (["--num-sequences", "-1"], "--num-sequences", ">= 1"),
    (["--num-sequences", "0"], "--num-sequences", ">= 1"),
    (["--num-sequences", "2.5"], "--num-sequences", "integer"),
    (["--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    (["--max-new-tokens", str(MAX_POSITIONS)], "--max-new-tokens", "max_position_embeddings"),
    (["--top-k", "0"], "--top-k", ">= 1"),
    (["--top-k", str(VOCAB + 1)], "--top-k", f"vocabulary size {VOCAB}"),
    (["--temperature", "0"], "--temperature", "> 0"),
    (["--temperature", "-1"], "--temperature", "> 0"),
    (["--temperature", "nan"], "--temperature", "finite"),
    (["--temperature", "inf"], "--temperature", "finite"),
    (["--batch-size", "0"], "--batch-size", ">= 1"),
    (["--shard-size", "-3"], "--shard-size", ">= 1"),
    (["--seed", "-1"], "--seed", ">= 0"),
    (["--sampled-draws", "0"], "--sampled-draws", ">= 1"),
    (["--num-draft-tokens", "0"], "--num-draft-tokens", ">= 1"),
    (["--device", "cuda:99"], "--device", "torch sees"),
    (["--device", "gpu"], "--device", "not a torch device"),
    (["--draft", "{other_vocab}"], "--draft", "vocabulary"),
    (["--draft", "{model}", "--ngram-draft"], "--ngram-draft", "not allowed"),
    (["--prompts-file", "{tmp}/missing.txt"], "--prompts-file", "no such file"),
    (["--prompts-file", "{prompts}"], "--prompts-file", "tokenizer"),  # the model has no tokenizer files
    (["--out", "{a_file}"], "--out", "is a file"),
]


def _fill(argv, files, model):
    return [a.format(model=model, tmp=os.path.dirname(files["empty"]), **files) for a in argv]


@pytest.mark.parametrize("extra,flag,phrase", GENERATE_CASES)
def test_generate_argument_errors(extra, flag, phrase, model_dir, tmp_path, capsys, no_model_load):
    files = _files(tmp_path)
    argv = ["generate", "--model", model_dir, "--out", str(tmp_path / "out"), "--num-sequences", "4",
            "--max-new-tokens", "3", "--top-k", "4", "--device", "cpu", "--no-progress"]
    line = _one_line_error(capsys, "generate", 2, cli.main(argv + _fill(extra, files, model_dir)))
    assert flag in line and phrase in line
    assert not os.path.exists(tmp_path / "out")  # nothing written either


@pytest.mark.parametrize("model_arg,phrase", [
    ("{tmp}/missing", "no such directory"),
    ("{a_file}", "is a file"),
    ("{no_config}", "not a Hugging Face model directory"),
    ("{bad_config}", "not a readable model config"),
])
@pytest.mark.parametrize("command", ["generate", "cache"])
def test_model_directory_errors_say_so_plainly(command, model_arg, phrase, tmp_path, capsys, no_model_load):
    files = _files(tmp_path)
    model = _fill([model_arg], files, "")[0]
    tail = ["--num-sequences", "2", "--max-new-tokens", "3"] if command == "generate" else ["--data", files["text_jsonl"]]
    line = _one_line_error(capsys, command, 2, cli.main([command, "--model", model, "--out", str(tmp_path / "o")] + tail))
    assert "--model" in line and phrase in line and "Repo id" not in line


PROMPTS_CASES = [
    ("{empty}", "holds no prompt"),
    ("{blank}", "holds no prompt"),
    ("{binary}", "not UTF-8"),
]


@pytest.mark.parametrize("prompts,phrase", PROMPTS_CASES)
def test_bad_prompts_files(prompts, phrase, model_with_tokenizer, tmp_path, capsys, no_model_load):
    files = _files(tmp_path)
    argv = ["generate", "--model", model_with_tokenizer, "--out", str(tmp_path / "out"), "--num-sequences", "2",
            "--max-new-tokens", "3", "--top-k", "4", "--prompts-file", _fill([prompts], files, "")[0]]
    line = _one_line_error(capsys, "generate", 2, cli.main(argv))
    assert "--prompts-file" in line and phrase in line


CACHE_CASES = [
    (["--max-length", "-1"], "--max-length", ">= 1"),
    (["--max-length", "0"], "--max-length", ">= 1"),
    (["--top-k", "0"], "--top-k", ">= 1"),
    (["--top-k", str(VOCAB + 1)], "--top-k", f"vocabulary size {VOCAB}"),
    (["--temperature", "nan"], "--temperature", "finite"),
    (["--batch-size", "0"], "--batch-size", ">= 1"),
    (["--shard-size", "0"], "--shard-size", ">= 1"),
    (["--device", "cuda:99"], "--device", "torch sees"),
    (["--data", "{tmp}/missing.jsonl"], "--data", "no such file"),
    (["--data", "{empty}"], "--data", "holds no sequence"),
    (["--data", "{blank}"], "--data", "holds no sequence"),
    (["--data", "{bad_json}"], "--data", "bad.jsonl:2: not valid JSON"),
    (["--data", "{text_jsonl}"], "--data", 'text.jsonl:2: "text" needs a tokenizer'),
    (["--data", "{out_of_vocab}"], "--data", f"oov.jsonl:1: token id {VOCAB} is outside"),
    (["--data", "{negative_id}"], "--data", "negative.jsonl:1: token id -1 is outside"),
    (["--data", "{empty_ids}"], "--data", "empty_ids.jsonl:1: the sequence has no tokens"),
    (["--data", "{not_ids}"], "--data", "not_ids.jsonl:1: \"input_ids\" must be a list of integers"),
    (["--data", "{binary}"], "--data", "not UTF-8"),
]


@pytest.mark.parametrize("extra,flag,phrase", CACHE_CASES)
def test_cache_argument_errors(extra, flag, phrase, model_dir, tmp_path, capsys, no_model_load):
    files = _files(tmp_path)
    data = tmp_path / "ok.jsonl"
    data.write_text(json.dumps({"input_ids": [3, 4, 5]}) + "\n")
    argv = ["cache", "--model", model_dir, "--data", str(data), "--out", str(tmp_path / "out"), "--top-k", "4",
            "--no-progress"]
    line = _one_line_error(capsys, "cache", 2, cli.main(argv + _fill(extra, files, model_dir)))
    assert flag in line and phrase in line
    assert not os.path.exists(tmp_path / "out")


DEMO_CASES = [
    (["--seq-len", "1"], "--seq-len", ">= 2"),
    (["--replay-top-k", "259"], "--replay-top-k", "258"),
    (["--replay-top-k", "0"], "--replay-top-k", ">= 1"),
    (["--num-heads", "3"], "--num-heads", "even"),
    (["--hidden-size", "30", "--num-heads", "2"], "--num-heads", "even"),  # head dimension 15
    (["--learning-rates", "0"], "--learning-rates", "> 0"),
    (["--learning-rates", "1e-3,nan"], "--learning-rates", "finite"),
    (["--replay-weights", "-1"], "--replay-weights", ">= 0"),
    (["--replay-weights", "0,inf"], "--replay-weights", "finite"),
    (["--seed", "-2"], "--seed", ">= 0"),
    (["--finetune-steps", "0"], "--finetune-steps", ">= 1"),
    (["--replay-sequences", "-4"], "--replay-sequences", ">= 1"),
    (["--device", "cuda:99"], "--device", "torch sees"),
]


@pytest.mark.parametrize("extra,flag,phrase", DEMO_CASES)
def test_demo_argument_errors(extra, flag, phrase, tmp_path, capsys, monkeypatch):
    from selfreplay_fast import demo

    monkeypatch.setattr(demo, "run_demo", lambda cfg: pytest.fail("the demo ran despite a bad argument"))
    line = _one_line_error(capsys, "demo", 2, cli.main(["demo", "--out-dir", str(tmp_path)] + extra))
    assert flag in line and phrase in line


@pytest.mark.parametrize("extra,flag", [
    (["--chunk-mib", "inf"], "--chunk-mib"),
    (["--chunk-mib", "nan"], "--chunk-mib"),
    (["--chunk-mib", "-1"], "--chunk-mib"),
    (["--budget-gb", "nan"], "--budget-gb"),
    (["--seq-len", "0"], "--seq-len"),
    (["--optimizer", "adam"], "--optimizer"),
])
def test_plan_argument_errors(extra, flag, capsys):
    line = _one_line_error(capsys, "plan", 2, cli.main(["plan", "--model", "llama-3.1-8b"] + extra))
    assert flag in line


def test_missing_command_and_arguments(capsys):
    assert cli.main([]) == 2
    assert capsys.readouterr().err.strip() == "selfreplay: error: the following arguments are required: COMMAND (see selfreplay --help)"
    line = _one_line_error(capsys, "generate", 2, cli.main(["generate", "--out", "x"]))
    assert "--model" in line and "--num-sequences" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_adds_the_traceback(where, model_dir, tmp_path, capsys, no_model_load):
    argv = ["generate", "--model", model_dir, "--out", str(tmp_path / "o"), "--num-sequences", "2",
            "--max-new-tokens", "3", "--top-k", str(VOCAB + 1)]
    argv = ["--debug"] + argv if where == "before" else argv + ["--debug"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("selfreplay generate: error: argument --top-k")


# ------------------------------------------------------------------ runtime errors: one line, exit 1


def test_runtime_errors_are_one_line(model_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    argv = ["generate", "--model", model_dir, "--out", str(foreign), "--num-sequences", "2", "--max-new-tokens", "3",
            "--top-k", "4", "--device", "cpu", "--no-progress"]
    line = _one_line_error(capsys, "generate", 1, cli.main(argv))
    assert "not empty" in line and str(foreign) in line
    assert (foreign / "notes.txt").read_text() == "mine"

    no_weights = tmp_path / "no_weights"
    _tiny_model().config.save_pretrained(no_weights)  # config.json alone
    argv[2], argv[4] = str(no_weights), str(tmp_path / "out")
    line = _one_line_error(capsys, "generate", 1, cli.main(argv))
    assert str(no_weights) in line


def test_a_bug_is_one_line_with_a_pointer_to_debug(capsys, monkeypatch):
    from selfreplay_fast.commands import plan

    def broken(args):
        raise AttributeError("'NoneType' object has no attribute 'x'")

    monkeypatch.setattr(plan, "run", broken)
    line = _one_line_error(capsys, "plan", 1, cli.main(["plan", "--model", "llama-3.1-8b"]))
    assert "AttributeError" in line and "--debug" in line
    assert cli.main(["plan", "--model", "llama-3.1-8b", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------ summaries, resumption and Ctrl-C


def _generate_argv(model, out, n=6, extra=()):
    return ["generate", "--model", model, "--out", str(out), "--num-sequences", str(n), "--max-new-tokens", "5",
            "--top-k", "4", "--batch-size", "2", "--shard-size", "2", "--seed", "7", "--device", "cpu",
            "--no-progress", *extra]


def _same_buffers(a, b):
    for name in ("input_ids", "lengths", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_generate_summary_separates_this_run_from_the_buffer(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_generate_argv(model_dir, out)) == 0
    captured = capsys.readouterr()
    assert "resuming" not in captured.err  # a fresh directory
    summary = _last_json(captured.out)
    buffer = ReplayBuffer.load(str(out), expected_vocab_size=VOCAB)
    assert summary["buffer"] == {"sequences": 6, "tokens": buffer.num_tokens, "shards": 3, "complete": True, "k": 4,
                                 "vocab_size": VOCAB}
    first = summary["this_run"]
    assert first["sequences"] == 6 and first["tokens"] == buffer.num_tokens
    assert first["generated_tokens"] == buffer.num_tokens - 6  # every sequence is BOS + generated tokens

    assert cli.main(_generate_argv(model_dir, out)) == 0  # the same command again: nothing left to do
    captured = capsys.readouterr()
    assert "resuming: 6 of 6 sequences done" in captured.err
    again = _last_json(captured.out)
    assert again["buffer"] == summary["buffer"]
    assert again["this_run"]["sequences"] == 0 and again["this_run"]["generated_tokens"] == 0


def _interrupt_after_first_shard(monkeypatch):
    """generate_replay as the CLI calls it, with a Ctrl-C right after the first shard is saved."""
    original = generation.generate_replay

    def ctrl_c(shard, out_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "generate_replay", lambda *a, **kw: original(*a, on_shard_written=ctrl_c, **kw))
    return original


def test_interrupted_generate_says_what_is_saved_and_resumes(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    original = _interrupt_after_first_shard(monkeypatch)
    assert cli.main(_generate_argv(model_dir, out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and _last_line(err) == (f"selfreplay generate: interrupted: 2 of 6 sequences are safely saved in {out}; "
                           "rerun the same command to resume")
    monkeypatch.setattr(generation, "generate_replay", original)

    assert cli.main(_generate_argv(model_dir, out)) == 0
    captured = capsys.readouterr()
    assert "resuming: 2 of 6 sequences done" in captured.err
    summary = _last_json(captured.out)
    assert summary["this_run"]["sequences"] == 4 and summary["buffer"]["sequences"] == 6
    resumed = ReplayBuffer.load(str(out), expected_vocab_size=VOCAB)
    assert summary["this_run"]["tokens"] == resumed.num_tokens - int(resumed.lengths[:2].sum())

    assert cli.main(_generate_argv(model_dir, tmp_path / "straight")) == 0
    _same_buffers(resumed, ReplayBuffer.load(str(tmp_path / "straight"), expected_vocab_size=VOCAB))


def test_interrupted_before_any_shard(model_dir, tmp_path, capsys, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "load_model_for_generation", ctrl_c)
    assert cli.main(_generate_argv(model_dir, tmp_path / "out")) == 130
    assert _last_line(capsys.readouterr().err) == f"selfreplay generate: interrupted: no sequence was saved in {tmp_path / 'out'} yet"


def test_no_resume_line_for_another_runs_buffer(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_generate_argv(model_dir, out)) == 0
    capsys.readouterr()
    line = _one_line_error(capsys, "generate", 1, cli.main(_generate_argv(model_dir, out, extra=["--seed", "8"])))
    assert "seed" in line  # the writer refuses the other settings, and no "resuming:" came before


def test_generate_with_a_prompts_file_resumes(model_with_tokenizer, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6\n\nw7\n")
    out = tmp_path / "out"
    argv = _generate_argv(model_with_tokenizer, out, extra=["--prompts-file", str(prompts)])
    original = _interrupt_after_first_shard(monkeypatch)
    assert cli.main(argv) == 130
    monkeypatch.setattr(generation, "generate_replay", original)
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "resuming: 2 of 6 sequences done" in capsys.readouterr().err
    buffer = ReplayBuffer.load(str(out), expected_vocab_size=VOCAB)
    starts = [seq[:2] if i % 2 == 0 else seq[:1] for i, seq in enumerate(buffer.sequences())]
    assert starts == [[5, 6], [7]] * 3


def _interrupt_at_forward(monkeypatch, number):
    """The CLI's model, with a Ctrl-C at its ``number``-th forward pass (counted at the first layer,
    which every pass goes through)."""
    original = generation.load_model_for_generation
    calls = [0]

    def count(module, inputs):
        calls[0] += 1
        if calls[0] == number:
            raise KeyboardInterrupt

    def load(*args, **kwargs):
        model = original(*args, **kwargs)
        model.model.layers[0].register_forward_pre_hook(count)
        return model

    monkeypatch.setattr(generation, "load_model_for_generation", load)
    return original


def test_cache_interrupt_resume_and_summary(model_with_tokenizer, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data.jsonl"
    records = [{"input_ids": [3, 4, 5, 6, 7]}, {"text": "w8 w9 w10"}, {"input_ids": [11, 12]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    argv = ["cache", "--model", model_with_tokenizer, "--data", str(data), "--out", str(out), "--top-k", "4",
            "--batch-size", "2", "--shard-size", "2", "--max-length", "4", "--no-progress"]
    original = _interrupt_at_forward(monkeypatch, 2)  # one pass per shard: the second shard is cut short
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and _last_line(err) == (
        f"selfreplay cache: interrupted: 2 of 3 sequences are safely saved in {out}; rerun the same command to resume")
    monkeypatch.setattr(generation, "load_model_for_generation", original)

    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "resuming: 2 of 3 sequences done" in captured.err
    summary = _last_json(captured.out)
    buffer = ReplayBuffer.load(str(out), expected_vocab_size=VOCAB)
    assert buffer.lengths.tolist() == [4, 3, 2]  # --max-length 4 cuts the first sequence, and only it
    assert buffer.input_ids[0, :4].tolist() == [3, 4, 5, 6] and buffer.input_ids[1, :3].tolist() == [8, 9, 10]
    assert summary["this_run"]["sequences"] == 1 and summary["this_run"]["tokens"] == 2
    assert summary["buffer"] == {"sequences": 3, "tokens": 9, "teacher_rows": buffer.num_teacher_rows, "shards": 2,
                                 "complete": True, "k": 4, "vocab_size": VOCAB}
    assert buffer.num_teacher_rows == 3 + 2 + 1  # a teacher for every next token


# ------------------------------------------------------------------ a real Ctrl-C (SIGINT) in a subprocess

_SLOW_SHARDS = """
import sys, time
import selfreplay_fast.generation as generation
from selfreplay_fast import cli
original = generation.generate_replay
# a pause after each saved shard, so that the signal surely arrives mid-run
generation.generate_replay = lambda *a, **kw: original(*a, on_shard_written=lambda s, d: time.sleep(3), **kw)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigint_reports_saved_sequences_and_a_rerun_resumes(model_dir, tmp_path):
    out = tmp_path / "out"
    argv = _generate_argv(model_dir, out, n=12)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SHARDS, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            meta_path = out / "metadata.json"
            if meta_path.exists() and json.loads(meta_path.read_text()).get("num_sequences", 0) > 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = json.loads((out / "metadata.json").read_text())["num_sequences"]
    assert proc.returncode == 130, stderr
    assert 0 < saved < 12 and "Traceback" not in stderr and stdout == ""
    assert stderr.strip().splitlines()[-1] == (
        f"selfreplay generate: interrupted: {saved} of 12 sequences are safely saved in {out}; "
        "rerun the same command to resume")

    rerun = subprocess.run([sys.executable, "-m", "selfreplay_fast.cli", *argv], capture_output=True, text=True,
                           env=env, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {saved} of 12 sequences done" in rerun.stderr
    summary = _last_json(rerun.stdout)
    assert summary["this_run"]["sequences"] == 12 - saved and summary["buffer"]["sequences"] == 12
    assert summary["buffer"]["complete"] is True


def test_summary_counters_without_per_shard_stats():
    from selfreplay_fast.commands.generate import run_summary

    def entry(n, tokens, **stats):
        return {"file": "x", "num_sequences": n, "num_tokens": tokens, **({"stats": stats} if stats else {})}

    before = {"shards": [entry(2, 9, sequences=2, generated_tokens=7, seconds=1.0)]}
    shards = before["shards"] + [entry(2, 10), entry(1, 4)]
    after = {"shards": shards, "num_sequences": 5, "num_tokens": 23, "complete": True, "k": 4, "vocab_size": 48,
             "generation_stats": {"sequences": 3, "generated_tokens": 11, "seconds": 2.0, "target_forwards": 6}}
    summary = run_summary("out", before, after)
    assert summary["this_run"] == {"sequences": 3, "tokens": 14, "generated_tokens": 11, "seconds": 2.0,
                                   "tokens_per_second": 5.5, "target_forwards": 6, "draft_proposed": 0,
                                   "draft_accepted": 0, "host_checks": 0}
    assert summary["buffer"] == {"sequences": 5, "tokens": 23, "shards": 3, "complete": True, "k": 4, "vocab_size": 48}
