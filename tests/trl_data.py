"""A tiny word-level tokenizer with a chat template, and TRL datasets of every form, for the TRL tests.

Vocabulary (size VOCAB of test_training.tiny_model): pad, bos, eos, the role words user / assistant, then the
words w5 ... w60. The chat template marks the assistant turns with {% generation %}, as TRL's
assistant-only loss needs.
"""

import torch

from test_training import VOCAB

ROLES = ("user", "assistant")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} eos {% endgeneration %}"
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"pad": 0, "bos": 1, "eos": 2, "user": 3, "assistant": 4, **{f"w{i}": i for i in range(5, VOCAB)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="pad"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="pad", bos_token="bos", eos_token="eos",
                                        unk_token="pad")
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == VOCAB
    return tokenizer


def _words(g, low, high):
    n = int(torch.randint(low, high, (1,), generator=g))
    return " ".join(f"w{int(i)}" for i in torch.randint(5, VOCAB, (n,), generator=g))


def rows(form, n=8, seed=0):
    """``n`` rows of a TRL dataset form: "text", "prompt_completion" or "messages"."""
    g = torch.Generator().manual_seed(seed)
    if form == "text":
        return [{"text": _words(g, 4, 12)} for _ in range(n)]
    if form == "prompt_completion":
        # the completion starts with a space: TRL concatenates prompt + completion as text
        return [{"prompt": _words(g, 3, 8), "completion": " " + _words(g, 2, 6)} for _ in range(n)]
    if form == "messages":
        return [{"messages": [{"role": "user", "content": _words(g, 2, 6)},
                              {"role": "assistant", "content": _words(g, 2, 5)},
                              {"role": "user", "content": _words(g, 1, 4)},
                              {"role": "assistant", "content": _words(g, 1, 4)}]} for _ in range(n)]
    raise ValueError(form)


def trained_words(form, row):
    """The number of tokens whose label counts under TRL's default loss of the form (completion-only for
    prompt-completion, assistant-only for messages as the tests configure): computed from the words, not TRL."""
    if form == "text":
        return len(row["text"].split())  # + eos appended, - the first token, which nothing predicts
    if form == "prompt_completion":
        return len(row["completion"].split()) + 1  # the completion and its eos
    return sum(len(m["content"].split()) + 1 for m in row["messages"] if m["role"] == "assistant")
