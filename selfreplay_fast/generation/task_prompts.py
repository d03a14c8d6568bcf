"""Replay prompted from the task data: each task example's prefix becomes a prompt of
``generate_replay(prompts=task_prompts(...))``, so the replay covers the model's behaviour on the kind of
input the fine-tune will see, not only on text started from BOS.

The prefix of a row is, by its form (the forms of TRL datasets and of ``selfreplay cache``/``audit`` data):

* ``{"prompt": "..."}`` (prompt-completion): the whole prompt, encoded as ``generate_replay`` encodes a
  string prompt (``add_special_tokens=True``); a conversational prompt (a list of messages) is rendered
  through the chat template with the assistant header (``add_generation_prompt=True``);
* ``{"messages": [...]}``: the conversation before its last assistant message, rendered the same way;
* ``{"text": "..."}`` or ``{"input_ids": [...]}``: the first ``prompt_tokens`` tokens (``text`` encoded as
  the cache and audit commands encode it, special tokens included).

The completion, when a row has one, is never part of the prompt: the model writes its own.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import List, Sequence

__all__ = ["task_prompts"]


def task_prompts(task, tokenizer=None, *, prompt_tokens: int = 32) -> List[List[int]]:
    """One prompt (a token-id list) per example of ``task``: a ``.jsonl`` path or a list of row dicts.

    Args:
        task: the task data, one JSON object a line (see the module docstring for the forms).
        tokenizer: the model's tokenizer; needed for string fields and chat messages.
        prompt_tokens: the prefix length taken from ``text``/``input_ids`` rows (``prompt`` and ``messages``
            rows give their whole prompt).

    Errors name ``task`` and, for a file, the line.
    """
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, numbers.Integral) or prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be an int >= 1, got {prompt_tokens!r}")
    prompts = [_row_prompt(row, where, tokenizer, int(prompt_tokens)) for row, where in _rows(task)]
    if not prompts:
        raise ValueError("task: holds no example (it is empty or blank)")
    return prompts


def _rows(task):
    """(row, where-for-messages) pairs of a .jsonl path or a list of dicts."""
    if isinstance(task, (str, os.PathLike)):
        path = os.fspath(task)
        if not os.path.isfile(path):
            raise ValueError(f"task: {path} is not a file")
        rows = []
        try:
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append((json.loads(line), f"task: {path}:{number}"))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"task: {path}:{number} is not JSON ({exc.msg})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"task: {path} is not UTF-8 text ({exc.reason})") from None
        return rows
    if isinstance(task, Sequence) and not isinstance(task, (str, bytes)):
        return [(row, f"task[{i}]") for i, row in enumerate(task)]
    raise TypeError(f"task must be a .jsonl path or a list of row dicts, got {type(task).__name__}")


def _row_prompt(row, where, tokenizer, prompt_tokens) -> List[int]:
    if not isinstance(row, dict) or not ({"prompt", "messages", "text", "input_ids"} & row.keys()):
        raise ValueError(f'{where}: expected an object with "prompt", "messages", "text" or "input_ids"')
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            ids = _encode(tokenizer, prompt, where, '"prompt"', special=True)
        elif _is_conversation(prompt):
            ids = _render(tokenizer, prompt, where)
        else:
            raise ValueError(f'{where}: "prompt" must be a string or a list of {{"role", "content"}} messages')
    elif "messages" in row:
        messages = row["messages"]
        if not _is_conversation(messages) or not messages:
            raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} messages')
        last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        if last_answer == 0:
            raise ValueError(f'{where}: "messages" starts with the assistant: no prompt precedes its answer')
        ids = _render(tokenizer, messages[:last_answer], where)
    elif "input_ids" in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
            raise ValueError(f'{where}: "input_ids" must be a list of integers')
        ids = [int(t) for t in ids][:prompt_tokens]
    else:
        if not isinstance(row["text"], str):
            raise ValueError(f'{where}: "text" must be a string')
        ids = _encode(tokenizer, row["text"], where, '"text"', special=True)[:prompt_tokens]
    if not ids:
        raise ValueError(f"{where}: the prompt has no tokens")
    return ids


def _is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)


def _encode(tokenizer, text, where, field, *, special) -> List[int]:
    if tokenizer is None:
        raise ValueError(f"{where}: {field} is text, which needs tokenizer= (or give input_ids)")
    return [int(t) for t in tokenizer(text, add_special_tokens=special)["input_ids"]]


def _render(tokenizer, messages, where) -> List[int]:
    if tokenizer is None or getattr(tokenizer, "chat_template", None) in (None, "", {}):
        raise ValueError(f"{where}: chat messages need tokenizer= with a chat_template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _encode(tokenizer, text, where, "the rendered conversation", special=False)  # the template's own specials
