"""Self-dialogue replay (SA-SFT 2026): the model writes a user turn and then answers it, through the
tokenizer's chat template, and its teacher is recorded on every token it wrote in both turns.

``generate_replay(model, prompts=SelfDialogue(tokenizer), ...)``, on either backend. The template is
cut into token-id pieces once (:meth:`SelfDialogue.resolve`), by rendering one user message holding a
sentinel string:

* ``opening``: what the template renders before a user message's content (BOS, a default system turn,
  the user header: whatever the template writes there);
* ``end_of_turn``: the first token after the content, which must be a special (added) token such as
  ``<|im_end|>`` or ``<|eot_id|>``: the model ends its user turn by emitting it;
* ``turn_close``: the rest of what follows the content (e.g. ChatML's newline);
* ``assistant_header``: what ``add_generation_prompt=True`` adds after that.

Each shard is generated in two phases through the backend's own shard generator (``run_phase``, the
native decode loop or the vLLM engine, so both backends share this code):

1. prompts = ``opening``; the model writes the user turn until ``end_of_turn`` or an EOS id, at most
   ``max_user_tokens`` tokens (the end-of-turn included). A turn that reaches the budget unclosed is
   closed by an *inserted* ``end_of_turn``. A turn ended by an EOS id that is not the end-of-turn ends the
   dialogue there: the sequence is the opening and the user turn, with no answer (the model ended the
   text, as a BOS replay sequence ends at EOS).
2. prompts = ``opening + user turn [+ inserted end_of_turn] + turn_close + assistant_header``; the model
   answers until an EOS id or ``end_of_turn``, at most ``max_new_tokens`` tokens.

What is recorded: the stored sequence is the whole dialogue. Every row that predicts a token the model
sampled holds its teacher (top-k + tail, or sampled draws) and the sampled token's log-prob: rows of the
user turn come from phase 1, rows of the answer from phase 2. A causal model's distribution at a user-turn
position depends only on the tokens before it, which are the same in both phases, so each row is the
model's own distribution given the stored prefix. Rows that predict tokens the library inserted (the
opening, an inserted end-of-turn, ``turn_close``, ``assistant_header``) carry no teacher (ids -1,
sampled log-prob 0), exactly as user prompt tokens are stored: the buffer's ``mask`` leaves them out of
every replay loss, and no teacher is computed for them.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from typing import Callable, List, Optional

import torch

__all__ = ["SelfDialogue", "PHASE_SEED_OFFSET"]

SENTINEL = "SelfReplayUserTurnSentinel"
# vLLM request rows of phase 2 are offset by this, so no phase-2 request shares a seed with a phase-1 one.
PHASE_SEED_OFFSET = 1 << 40


class SelfDialogue:
    """The self-dialogue source of :func:`generate_replay`: pass ``prompts=SelfDialogue(tokenizer)``.

    Args:
        tokenizer: a Hugging Face tokenizer with a ``chat_template`` whose user turns end with a special
            end-of-turn token.
        max_user_tokens: tokens the model may write in the user turn (its end-of-turn included); default:
            the run's ``max_new_tokens``, which bounds the answer.
    """

    def __init__(self, tokenizer, *, max_user_tokens: Optional[int] = None):
        if max_user_tokens is not None and (isinstance(max_user_tokens, bool)
                                            or not isinstance(max_user_tokens, numbers.Integral) or max_user_tokens < 1):
            raise ValueError(f"max_user_tokens must be None or an int >= 1, got {max_user_tokens!r}")
        self.tokenizer = tokenizer
        self.max_user_tokens = None if max_user_tokens is None else int(max_user_tokens)
        self.opening, self.end_of_turn, self.turn_close, self.assistant_header = template_pieces(tokenizer)

    # -- what a run records -------------------------------------------------------------------------

    def describe(self, max_new_tokens: int) -> dict:
        """The pieces and budgets, for the run's settings (a resume with another template is refused)."""
        return {"opening": self.opening, "end_of_turn": self.end_of_turn, "turn_close": self.turn_close,
                "assistant_header": self.assistant_header, "max_user_tokens": self.user_budget(max_new_tokens)}

    def digest(self) -> str:
        """sha256 of the template pieces (the run's ``prompts_sha256``; the budgets are settings of their own)."""
        pieces = [self.opening, self.end_of_turn, self.turn_close, self.assistant_header]
        return hashlib.sha256(("self-dialogue:" + json.dumps(pieces)).encode()).hexdigest()

    def user_budget(self, max_new_tokens: int) -> int:
        return self.max_user_tokens if self.max_user_tokens is not None else max_new_tokens

    def check_vocabulary(self, vocab_size: int) -> None:
        for name in ("opening", "turn_close", "assistant_header"):
            for t in getattr(self, name):
                if not 0 <= t < vocab_size:
                    raise ValueError(f"prompts: the chat template's {name} holds token {t}, outside the model's "
                                     f"vocabulary [0, {vocab_size})")
        if not 0 <= self.end_of_turn < vocab_size:
            raise ValueError(f"prompts: the chat template's end-of-turn token {self.end_of_turn} is outside the "
                             f"model's vocabulary [0, {vocab_size})")

    def longest_prompt(self, max_new_tokens: int) -> int:
        """The longest phase-2 prompt: the opening, a full user turn, an inserted end-of-turn, the rest."""
        return (len(self.opening) + self.user_budget(max_new_tokens) + 1 + len(self.turn_close)
                + len(self.assistant_header))

    # -- one shard -----------------------------------------------------------------------------------

    def generate(self, count: int, run_phase: Callable, eos_ids: List[int], max_new_tokens: int):
        """``count`` dialogues as one shard's per-sequence results (tokens, teacher ids, log-probs, tail,
        sampled log-probs), the form both backends' shard generators return.

        ``run_phase(prompts, stop_ids, max_new_tokens, rows)`` generates one phase: ``rows`` numbers the
        requests within the shard (the vLLM backend seeds request ``r`` from it; the native loop draws
        from the shard's generator in order and ignores it)."""
        eot = self.end_of_turn
        stops = sorted({eot, *eos_ids})  # both turns end at the end-of-turn or an EOS id
        first = run_phase([list(self.opening)] * count, stops, self.user_budget(max_new_tokens), list(range(count)))
        results = list(first)
        answering, answer_prompts = [], []
        for i, (tokens, *_) in enumerate(first):
            last = int(tokens[-1])
            if last != eot and last in eos_ids:
                continue  # the model ended the text inside its user turn: no answer
            turn = tokens.tolist() + ([] if last == eot else [eot])  # an unclosed turn: the end-of-turn inserted
            answering.append(i)
            answer_prompts.append(turn + self.turn_close + self.assistant_header)
        if answering:
            second = run_phase(answer_prompts, stops, max_new_tokens, [PHASE_SEED_OFFSET + i for i in answering])
            for i, answer in zip(answering, second):
                results[i] = merge_phases(first[i], answer)
        return results


def merge_phases(user_turn, answer):
    """One dialogue's result: the answer phase's tokens and rows, with the user turn's teacher rows (which
    predict the user turn's tokens: rows ``0 .. n1 - 2``) taken from phase 1."""
    n1 = user_turn[0].numel()
    merged = [answer[0]]
    for mine, theirs in zip(user_turn[1:], answer[1:]):
        rows = theirs.clone()
        rows[: n1 - 1] = mine[: n1 - 1]
        merged.append(rows)
    return tuple(merged)


def template_pieces(tokenizer):
    """(opening, end_of_turn, turn_close, assistant_header) token ids of ``tokenizer``'s chat template."""
    if tokenizer is None:
        raise ValueError("tokenizer: a self-dialogue needs the model's tokenizer (its chat template); got None")
    if getattr(tokenizer, "chat_template", None) in (None, "", {}):
        raise ValueError("tokenizer: it has no chat_template, which a self-dialogue renders its turns through "
                         "(set tokenizer.chat_template, or replay from BOS or from prompts instead)")
    conversation = [{"role": "user", "content": SENTINEL}]
    try:
        turn = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
        with_header = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - a template that raises: say which input
        raise ValueError(f"tokenizer: its chat template cannot render a single user message "
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(turn, str) or turn.count(SENTINEL) != 1:
        raise ValueError("tokenizer: its chat template does not render a user message's content verbatim once; "
                         "a self-dialogue cannot tell where a user turn starts and ends")
    if not with_header.startswith(turn) or len(with_header) == len(turn):
        raise ValueError("tokenizer: its chat template adds no assistant header with add_generation_prompt=True "
                         "after a user turn; a self-dialogue needs one to start the answer")
    opening_text, close_text = turn.split(SENTINEL)

    def encode(text):
        # As apply_chat_template(tokenize=True) encodes: the template writes the special tokens itself.
        return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]] if text else []

    opening, close, header = encode(opening_text), encode(close_text), encode(with_header[len(turn):])
    if not opening:
        raise ValueError("tokenizer: its chat template renders nothing before a user message's content; a "
                         "self-dialogue needs at least one token to prompt the user turn with")
    special = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)
    if not close or close[0] not in special:
        what = "nothing" if not close else repr(tokenizer.convert_ids_to_tokens(close[0]))
        raise ValueError(f"tokenizer: its chat template ends a user turn with {what}, not a special end-of-turn "
                         "token, so a self-dialogue cannot tell when the model has finished the user turn")
    if not header:
        raise ValueError("tokenizer: its chat template's assistant header encodes to no token")
    return opening, close[0], close[1:], header


def as_self_dialogue(prompts) -> Optional[SelfDialogue]:
    return prompts if isinstance(prompts, SelfDialogue) else None
