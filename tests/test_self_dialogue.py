"""Replay sources beyond BOS on the native backend: self-dialogues through a chat template (the model writes
the user turn and the answer) and prompts from the task data.

Self-dialogues are checked against references written here, not the library's: the template structure
parsed token by token, the sampled dialogues against the dialogue process's exact distribution
(enumerated with plain forward passes, chi-square), the recorded teacher against a plain forward pass over
each stored sequence, the inserted template tokens masked as prompt tokens are, and the buffer trained
on. tests/test_vllm_sampling.py runs the same checks on the vLLM backend with these helpers.
"""

import json
import os
import re

import pytest
import torch

from test_generation import chi_square_pvalue, one_thread, tiny_llama  # noqa: F401 (one_thread: autouse fixture)

from selfreplay_fast import ReplayBuffer, SelfDialogue, cli, fused_replay_kl, generate_replay, task_prompts
from selfreplay_fast.reference import reference_replay_kl

# The dialogue tokenizer's vocabulary is the tiny test models' (test_generation: BOS 0, EOS 4, 5 tokens).
BOS_TOKEN, IM_START, IM_END, WORD, EOS_TOKEN = range(5)
DIALOGUE_VOCAB = 5
# ChatML-like: "<s><|im_start|> CONTENT<|im_end|> w " per user turn, "<|im_start|> w " starts the answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{% if m['role'] != 'user' %} w{% endif %} "
    "{{ m['content'] }}<|im_end|> w {% endfor %}{% if add_generation_prompt %}<|im_start|> w {% endif %}"
)
# The pieces, by hand from the template: opening, end-of-turn, the rest of the turn's close, the header.
OPENING, END_OF_TURN, TURN_CLOSE, HEADER = [BOS_TOKEN, IM_START], IM_END, [WORD], [IM_START, WORD]


def dialogue_tokenizer(chat_template=CHAT_TEMPLATE):
    """A word-level tokenizer over the tiny models' 5 ids with a ChatML-like chat template (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab = {"<s>": BOS_TOKEN, "<|im_start|>": IM_START, "<|im_end|>": IM_END, "w": WORD, "</s>": EOS_TOKEN}
    # unk is <s>, so that "w" stays an ordinary token (the end-of-turn must be a special one)
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<s>")
    tokenizer.add_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tokenizer.chat_template = chat_template
    assert len(tokenizer) == DIALOGUE_VOCAB
    return tokenizer


def dialogue_model():
    """The peaky tiny Llama of the vLLM tests (64 wide: vLLM's CPU attention needs head dim >= 32)."""
    return tiny_llama(0, hidden=64, logit_scale=12.0, max_positions=64)


@pytest.fixture(scope="module")
def model():
    return dialogue_model()


def parse_dialogue(seq, max_user, max_new):
    """(positions of the tokens the model generated, how the user turn ended), asserting the template
    structure exactly: opening, user turn (ended by the end-of-turn, by EOS, or cut at max_user tokens and
    closed by an inserted end-of-turn), then turn close, header and an answer of 1..max_new tokens that
    ends at EOS or the end-of-turn or at the budget."""
    assert seq[:len(OPENING)] == OPENING
    start = len(OPENING)
    stops = [j for j in range(start, min(len(seq), start + max_user)) if seq[j] in (END_OF_TURN, EOS_TOKEN)]
    if stops and seq[stops[0]] == EOS_TOKEN:  # the model ended the text in its user turn
        assert len(seq) == stops[0] + 1
        return list(range(start, len(seq))), "eos"
    if stops:
        end, how = stops[0], "end_of_turn"
        generated = list(range(start, end + 1))
    else:  # cut at the budget: the end-of-turn is the library's
        end, how = start + max_user, "cut"
        assert seq[end] == END_OF_TURN
        generated = list(range(start, end))
    after = end + 1
    assert seq[after:after + len(TURN_CLOSE) + len(HEADER)] == TURN_CLOSE + HEADER
    answer = seq[after + len(TURN_CLOSE) + len(HEADER):]
    assert 1 <= len(answer) <= max_new
    assert not any(t in (END_OF_TURN, EOS_TOKEN) for t in answer[:-1])
    assert len(answer) == max_new or answer[-1] in (END_OF_TURN, EOS_TOKEN)
    return generated + list(range(len(seq) - len(answer), len(seq))), how


@torch.no_grad()
def exact_dialogue_probs(model, max_user, max_new, temperature=1.0):
    """{dialogue tokens: probability} of the self-dialogue process, from plain forward passes over every prefix."""
    probs = {}

    def dist(prefix):
        return torch.softmax(model(torch.tensor([prefix])).logits[0, -1].double() / temperature, -1).tolist()

    def answer(prefix, n, prob):
        for token, p in enumerate(dist(prefix)):
            seq = prefix + [token]
            if token in (END_OF_TURN, EOS_TOKEN) or n + 1 == max_new:
                probs[tuple(seq)] = probs.get(tuple(seq), 0.0) + prob * p
            else:
                answer(seq, n + 1, prob * p)

    def user(prefix, n, prob):
        for token, p in enumerate(dist(prefix)):
            seq = prefix + [token]
            if token == EOS_TOKEN:
                probs[tuple(seq)] = probs.get(tuple(seq), 0.0) + prob * p
            elif token == END_OF_TURN:
                answer(seq + TURN_CLOSE + HEADER, 0, prob * p)
            elif n + 1 == max_user:
                answer(seq + [END_OF_TURN] + TURN_CLOSE + HEADER, 0, prob * p)
            else:
                user(seq, n + 1, prob * p)

    user(list(OPENING), 0, 1.0)
    assert abs(sum(probs.values()) - 1) < 1e-9
    return probs


@torch.no_grad()
def check_dialogue_buffer(model, buffer, max_user, max_new, temperature=1.0, atol=2e-5):
    """Asserts every sequence's structure, that exactly the generated tokens' rows hold a teacher (the inserted
    template tokens' rows none, as prompt rows), and that each teacher row is the model's own distribution
    given the stored prefix (a plain forward pass); returns how many user turns ended each way."""
    ways = {"end_of_turn": 0, "cut": 0, "eos": 0}
    k = buffer.k
    for i, seq in enumerate(buffer.sequences()):
        generated, how = parse_dialogue(seq, max_user, max_new)
        ways[how] += 1
        n = len(seq)
        rows = torch.tensor(generated) - 1  # row j predicts token j + 1
        expected = torch.zeros(n, dtype=torch.bool)
        expected[rows] = True
        assert torch.equal(buffer.teacher_ids[i, :n, 0] >= 0, expected), (i, seq)
        assert (buffer.teacher_ids[i, :n][~expected] == -1).all()
        assert (buffer.sampled_logprobs[i, :n][~expected] == 0).all()
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double() / temperature, -1)[rows]
        cached_ids = buffer.teacher_ids[i, rows].long()
        top = logp.topk(k, dim=-1).values
        torch.testing.assert_close(logp.gather(1, cached_ids), top, atol=atol, rtol=0)
        torch.testing.assert_close(buffer.teacher_logprobs[i, rows].double(), top, atol=atol, rtol=0)
        tail = logp.scatter(1, cached_ids, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(buffer.teacher_tail_logprob[i, rows].double().exp(), tail.exp(), atol=atol, rtol=0)
        sampled = logp[torch.arange(len(rows)), torch.tensor(seq)[rows + 1]]
        torch.testing.assert_close(buffer.sampled_logprobs[i, rows].double(), sampled, atol=atol, rtol=0)
    return ways


def check_trains(model, other, out_dir, temperature=1.0):
    """The buffer opens and fused_replay_kl takes it: 0 for the model itself (at the buffer's temperature),
    the float64 reference's value and gradients for another model."""
    opened = ReplayBuffer.open(out_dir, expected_vocab_size=DIALOGUE_VOCAB)
    weight = other.lm_head.weight
    for batch in opened.batches(5, shuffle=True, seed=0):
        teacher = dict(mask=batch["mask"], teacher_tail_logprob=batch["teacher_tail_logprob"], temperature=temperature)
        with torch.no_grad():
            own = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            kl_own = fused_replay_kl(own, model.lm_head.weight, batch["teacher_ids"], batch["teacher_logprobs"], **teacher)
        assert abs(float(kl_own)) < 1e-4
        hidden = other.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        hidden = hidden.detach().requires_grad_(True)
        kl = fused_replay_kl(hidden, weight, batch["teacher_ids"], batch["teacher_logprobs"], **teacher)
        ref = reference_replay_kl(hidden.double(), weight.double(), batch["teacher_ids"], batch["teacher_logprobs"],
                                  **teacher)
        assert float(kl.detach()) > 1e-3
        torch.testing.assert_close(kl.double(), ref, atol=1e-5, rtol=1e-4)
        kl.backward()
        assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0
        weight.grad = None
    return opened


# ----------------------------------------------------------------------------------------------------
# The template pieces
# ----------------------------------------------------------------------------------------------------


def test_template_pieces_are_the_templates():
    dialogue = SelfDialogue(dialogue_tokenizer())
    assert (dialogue.opening, dialogue.end_of_turn, dialogue.turn_close, dialogue.assistant_header) == (
        OPENING, END_OF_TURN, TURN_CLOSE, HEADER)
    # A whole rendered conversation is the pieces around its contents (here each "w").
    tokenizer = dialogue_tokenizer()
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "w"}, {"role": "assistant", "content": "w"}],
                                             tokenize=False)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == (
        OPENING + [WORD, END_OF_TURN] + TURN_CLOSE + HEADER + [WORD, END_OF_TURN] + TURN_CLOSE)


@pytest.mark.parametrize("template, match", [
    (None, "no chat_template"),
    ("{% for m in messages %}{{ m['content'] }} w {% endfor %}{% if add_generation_prompt %}w {% endif %}",
     "renders nothing before"),
    ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} w {% endfor %}{% if add_generation_prompt %}"
     "<|im_start|> {% endif %}", "not a special end-of-turn token"),
    ("{{ bos_token }}{% for m in messages %}<|im_start|> {{ m['content'] }}<|im_end|>{% endfor %}", "no assistant header"),
    ("{{ bos_token }}<|im_start|> hi<|im_end|> <|im_start|> ", "verbatim once"),
])
def test_templates_a_dialogue_cannot_use_are_refused(template, match):
    with pytest.raises(ValueError, match=match):
        SelfDialogue(dialogue_tokenizer(template))
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        SelfDialogue(None)
    with pytest.raises(ValueError, match="max_user_tokens must be None or an int >= 1"):
        SelfDialogue(dialogue_tokenizer(), max_user_tokens=0)


# ----------------------------------------------------------------------------------------------------
# Dialogues: structure, distribution, teacher, masks, training, resume
# ----------------------------------------------------------------------------------------------------


def test_dialogues_follow_the_dialogue_process(model):
    exact = exact_dialogue_probs(model, max_user=2, max_new=2)
    buffer = generate_replay(model, num_sequences=3000, max_new_tokens=2, top_k=3, batch_size=256, seed=1,
                             prompts=SelfDialogue(dialogue_tokenizer(), max_user_tokens=2), progress=False)
    assert chi_square_pvalue(buffer, [], exact) > 1e-3
    # The same test rejects the dialogues of another model: it can fail.
    assert chi_square_pvalue(buffer, [], exact_dialogue_probs(tiny_llama(1, hidden=64, logit_scale=12.0), 2, 2)) < 1e-3


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_dialogue_structure_teacher_and_masks(model, temperature, tmp_path):
    max_user, max_new = 6, 5
    out = str(tmp_path / "buf")
    buffer = generate_replay(model, num_sequences=60, max_new_tokens=max_new, top_k=3, batch_size=16, shard_size=25,
                             temperature=temperature, prompts=SelfDialogue(dialogue_tokenizer(), max_user_tokens=max_user),
                             seed=3, out_dir=out, logprob_dtype=torch.float32, progress=False)
    ways = check_dialogue_buffer(model, buffer, max_user, max_new, temperature)
    print(ways)
    assert all(count >= 3 for count in ways.values())  # every way a user turn ends is exercised
    buffer.validate()
    generation = buffer.metadata["generation"]
    assert generation["self_dialogue"] == {"opening": OPENING, "end_of_turn": END_OF_TURN, "turn_close": TURN_CLOSE,
                                           "assistant_header": HEADER, "max_user_tokens": max_user}
    # Stats count each dialogue once and every generated token (the teacher rows) once.
    stats = buffer.generation_stats
    assert stats.sequences == 60 and stats.generated_tokens == int((buffer.teacher_ids[..., 0] >= 0).sum())
    check_trains(model, tiny_llama(1, hidden=64, logit_scale=12.0), out, temperature)


def test_dialogue_run_resumes_to_the_uninterrupted_buffer(model, tmp_path):
    kwargs = dict(num_sequences=10, max_new_tokens=4, top_k=3, shard_size=4, seed=7, batch_size=3, progress=False,
                  prompts=SelfDialogue(dialogue_tokenizer(), max_user_tokens=3))
    straight = generate_replay(model, out_dir=str(tmp_path / "a"), **kwargs)

    class Interrupt(Exception):
        pass

    def stop(shard, out_dir):
        if shard == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        generate_replay(model, out_dir=str(tmp_path / "b"), on_shard_written=stop, **kwargs)
    calls = []
    resumed = generate_replay(model, out_dir=str(tmp_path / "b"), on_shard_written=lambda s, d: calls.append(s), **kwargs)
    assert calls == [2]
    for name in ("input_ids", "lengths", "teacher_ids", "teacher_logprobs", "sampled_logprobs"):
        assert torch.equal(getattr(straight, name), getattr(resumed, name)), name
    other = dict(kwargs, prompts=SelfDialogue(dialogue_tokenizer(), max_user_tokens=2))
    with pytest.raises(ValueError, match="other settings"):  # another user-turn budget is another buffer
        generate_replay(model, out_dir=str(tmp_path / "b"), **other)


def test_dialogue_with_speculative_decoding_keeps_the_structure(model):
    buffer = generate_replay(model, num_sequences=20, max_new_tokens=5, top_k=3, drafter="ngram", seed=2,
                             prompts=SelfDialogue(dialogue_tokenizer(), max_user_tokens=5), progress=False,
                             logprob_dtype=torch.float32)
    check_dialogue_buffer(model, buffer, 5, 5)


def test_dialogue_too_long_for_the_model_is_refused(model):
    with pytest.raises(ValueError, match="max_position_embeddings = 64"):
        generate_replay(model, num_sequences=2, max_new_tokens=30, top_k=3, progress=False,
                        prompts=SelfDialogue(dialogue_tokenizer(), max_user_tokens=30))


# ----------------------------------------------------------------------------------------------------
# Prompts from the task data
# ----------------------------------------------------------------------------------------------------


def test_task_prompts_take_each_examples_prefix(tmp_path):
    from trl_data import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # pad 0, bos 1, eos 2, user 3, assistant 4, then w5 ...; no special tokens added
    rows = [
        {"text": "w5 w6 w7 w8"},
        {"input_ids": [1, 9, 10, 11, 12]},
        {"prompt": "w20 w21 w22", "completion": " w30"},
        {"messages": [{"role": "user", "content": "w7"}, {"role": "assistant", "content": "w8"},
                      {"role": "user", "content": "w9"}, {"role": "assistant", "content": "w10"}]},
        {"prompt": [{"role": "user", "content": "w11"}], "completion": [{"role": "assistant", "content": "w12"}]},
    ]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    expected = [[5, 6, 7], [1, 9, 10], [20, 21, 22], [3, 7, 4, 8, 2, 3, 9, 4], [3, 11, 4]]
    assert task_prompts(str(path), tokenizer, prompt_tokens=3) == expected
    assert task_prompts(rows, tokenizer, prompt_tokens=3) == expected
    model = tiny_llama(0, vocab=len(tokenizer), max_positions=32)
    buffer = generate_replay(model, num_sequences=10, max_new_tokens=3, top_k=3, progress=False,
                             prompts=task_prompts(str(path), tokenizer, prompt_tokens=3))
    for i, seq in enumerate(buffer.sequences()):
        prompt = expected[i % len(expected)]
        assert seq[:len(prompt)] == prompt
        has_teacher = (buffer.teacher_ids[i, :len(seq), 0] >= 0).tolist()
        assert has_teacher == [False] * (len(prompt) - 1) + [True] * (len(seq) - len(prompt)) + [False]


@pytest.mark.parametrize("content, kwargs, match", [
    ('{"text": "w5"}', dict(tokenizer=None), "needs tokenizer="),
    ('{"completion": "w5"}', {}, 'expected an object with "prompt"'),
    ('not json', {}, r"task.jsonl:1 is not JSON"),
    ('{"input_ids": [1, "a"]}', {}, '"input_ids" must be a list of integers'),
    ('{"messages": [{"role": "assistant", "content": "w5"}]}', {}, "starts with the assistant"),
    ('', {}, "holds no example"),
    ('{"text": "w5"}', dict(prompt_tokens=0), "prompt_tokens must be an int >= 1"),
])
def test_bad_task_data_is_refused(tmp_path, content, kwargs, match):
    from trl_data import tiny_tokenizer

    path = tmp_path / "task.jsonl"
    path.write_text(content)
    args = dict(tokenizer=tiny_tokenizer(), prompt_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        task_prompts(str(path), **args)
    with pytest.raises(ValueError, match="is not a file"):
        task_prompts(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------------------------------
# selfreplay generate --source
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dialogue_model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dialogue_model"))
    dialogue_model().save_pretrained(path)
    dialogue_tokenizer().save_pretrained(path)
    return path


COMMON = ["--num-sequences", "6", "--max-new-tokens", "4", "--top-k", "3", "--seed", "3", "--shard-size", "4",
          "--no-progress", "--logprob-dtype", "float32"]


def test_generate_command_self_dialogue_source(dialogue_model_dir, model, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["generate", "--model", dialogue_model_dir, "--out", out, *COMMON, "--source", "self-dialogue",
                     "--max-user-tokens", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["buffer"]["sequences"] == 6
    buffer = ReplayBuffer.load(out, expected_vocab_size=DIALOGUE_VOCAB)
    same = generate_replay(model, num_sequences=6, max_new_tokens=4, top_k=3, seed=3, shard_size=4, progress=False,
                           prompts=SelfDialogue(dialogue_tokenizer(), max_user_tokens=3))
    assert buffer.sequences() == same.sequences()
    check_dialogue_buffer(model, buffer, 3, 4)


def test_generate_command_task_source(dialogue_model_dir, model, tmp_path, capsys):
    data = tmp_path / "task.jsonl"
    data.write_text('{"input_ids": [0, 3, 3, 1, 3]}\n{"text": "<|im_start|> w"}\n')
    out = str(tmp_path / "out")
    assert cli.main(["generate", "--model", dialogue_model_dir, "--out", out, *COMMON, "--source", "task",
                     "--data", str(data), "--prompt-tokens", "3"]) == 0
    buffer = ReplayBuffer.load(out, expected_vocab_size=DIALOGUE_VOCAB)
    same = generate_replay(model, num_sequences=6, max_new_tokens=4, top_k=3, seed=3, shard_size=4, progress=False,
                           prompts=[[0, 3, 3], [1, 3]])
    assert buffer.sequences() == same.sequences()


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory):
    """The dialogue model with a tokenizer that has no chat template."""
    path = str(tmp_path_factory.mktemp("plain_model"))
    dialogue_model().save_pretrained(path)
    dialogue_tokenizer(chat_template=None).save_pretrained(path)
    return path


@pytest.mark.parametrize("extra, match", [
    (["--source", "task"], "argument --data: --source task needs a task .jsonl file"),
    (["--data", "{data}"], "argument --data: only applies with --source task"),
    (["--source", "self-dialogue", "--prompts-file", "{data}"], "argument --prompts-file: only applies with --source bos"),
    (["--max-user-tokens", "3"], "argument --max-user-tokens: only applies with --source self-dialogue"),
    (["--prompt-tokens", "3"], "argument --prompt-tokens: only applies with --source task"),
    (["--source", "task", "--data", "{bad}"], "argument --data: .*bad.jsonl:1 is not JSON"),
    (["--source", "task", "--data", "{missing}"], "argument --data"),
    (["--source", "dialogue"], "argument --source: invalid choice"),
])
def test_generate_command_refuses_bad_sources(dialogue_model_dir, tmp_path, capsys, extra, match):
    data, bad = tmp_path / "task.jsonl", tmp_path / "bad.jsonl"
    data.write_text('{"text": "w"}\n')
    bad.write_text("{oops\n")
    extra = [e.format(data=data, bad=bad, missing=tmp_path / "missing.jsonl") for e in extra]
    code = cli.main(["generate", "--model", dialogue_model_dir, "--out", str(tmp_path / "o"), *COMMON, *extra])
    assert code == cli.EXIT_USAGE_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not os.path.exists(tmp_path / "o")


def test_generate_command_needs_a_chat_template_for_self_dialogue(plain_model_dir, tmp_path, capsys):
    code = cli.main(["generate", "--model", plain_model_dir, "--out", str(tmp_path / "o"), *COMMON,
                     "--source", "self-dialogue"])
    assert code == cli.EXIT_USAGE_ERROR
    assert "argument --source: self-dialogue needs a chat template" in capsys.readouterr().err


def test_generate_help_documents_the_sources(capsys):
    assert cli.main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--source {bos,task,self-dialogue}", "(default: bos)", "--max-user-tokens", "--prompt-tokens",
                   "(default: 32)", "--data"):
        assert needle in text, needle
