"""A tiny word-level tokenizer with a chat template, and TRL datasets of every form, for the TRL tests.

Vocabulary (size ``vocab_size``, default VOCAB of test_training.tiny_model): pad, bos, eos, the role words user / assistant, then the
words w5 ... w60. The chat template marks the assistant turns with {% generation %}, as TRL's
assistant-only loss needs.
"""

import torch

VOCAB = 61  # test_training.VOCAB

ROLES = ("user", "assistant")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} eos {% endgeneration %}"
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def tiny_tokenizer(vocab_size=VOCAB):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"pad": 0, "bos": 1, "eos": 2, "user": 3, "assistant": 4, **{f"w{i}": i for i in range(5, vocab_size)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="pad"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="pad", bos_token="bos", eos_token="eos",
                                        unk_token="pad")
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == vocab_size
    return tokenizer


def _words(g, low, high, vocab_size):
    n = int(torch.randint(low, high, (1,), generator=g))
    return " ".join(f"w{int(i)}" for i in torch.randint(5, vocab_size, (n,), generator=g))


def rows(form, n=8, seed=0, vocab_size=VOCAB):
    """``n`` rows of a TRL dataset form: "text", "prompt_completion" or "messages"."""
    g = torch.Generator().manual_seed(seed)

    def _w(low, high):
        return _words(g, low, high, vocab_size)

    if form == "text":
        return [{"text": _w(4, 12)} for _ in range(n)]
    if form == "prompt_completion":
        # the completion starts with a space: TRL concatenates prompt + completion as text
        return [{"prompt": _w(3, 8), "completion": " " + _w(2, 6)} for _ in range(n)]
    if form == "messages":
        return [{"messages": [{"role": "user", "content": _w(2, 6)},
                              {"role": "assistant", "content": _w(2, 5)},
                              {"role": "user", "content": _w(1, 4)},
                              {"role": "assistant", "content": _w(1, 4)}]} for _ in range(n)]
    raise ValueError(form)


def trained_words(form, row):
    """The number of tokens whose label counts under TRL's default loss of the form (completion-only for
    prompt-completion, assistant-only for messages as the tests configure): computed from the words, not TRL."""
    if form == "text":
        return len(row["text"].split())  # + eos appended, - the first token, which nothing predicts
    if form == "prompt_completion":
        return len(row["completion"].split()) + 1  # the completion and its eos
    return sum(len(m["content"].split()) + 1 for m in row["messages"] if m["role"] == "assistant")
