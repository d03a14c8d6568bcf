"""``selfreplay generate --source``: what the replay sequences are prompted with (BOS, the task data's
prefixes, or self-dialogues through the chat template), checked before any model loads."""

from __future__ import annotations

from ._arguments import UsageError, existing_file, positive_int, one_line
from ._model_dir import check_token_ids

SOURCES = ("bos", "task", "self-dialogue")
DEFAULT_PROMPT_TOKENS = 32


def add_source_arguments(parser) -> None:
    parser.add_argument(
        "--source", choices=SOURCES, default="bos",
        help="what each sequence starts from: bos: BOS alone (or a line of --prompts-file); task: the prefix of a "
             "--data example; self-dialogue: the model writes a user turn and then answers it, through the "
             "tokenizer's chat template (the teacher is recorded on both turns, the template's tokens are "
             "masked like prompt tokens)")
    parser.add_argument("--prompts-file", type=existing_file, default=None,
                        help="with --source bos: text file, one prompt per line (default: BOS only)")
    parser.add_argument("--data", type=existing_file, default=None,
                        help='with --source task: task .jsonl, one {"prompt": ...} (used whole), {"messages": [...]} '
                             '(the conversation before its last answer), {"text": ...} or {"input_ids": [...]} a line '
                             "(default: none)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=None,
                        help=f'with --source task: tokens of a "text"/"input_ids" example used as its prompt '
                             f"(default: {DEFAULT_PROMPT_TOKENS})")
    parser.add_argument("--max-user-tokens", type=positive_int, default=None,
                        help="with --source self-dialogue: tokens the model may write in the user turn; a turn cut "
                             "there is closed by the template (default: --max-new-tokens, which bounds the answer)")


def check_source_arguments(args) -> None:
    """Flags that only apply to another source, or a source missing its input: one line naming the flag."""
    only = {"--prompts-file": ("bos", args.prompts_file is not None), "--data": ("task", args.data is not None),
            "--prompt-tokens": ("task", args.prompt_tokens is not None),
            "--max-user-tokens": ("self-dialogue", args.max_user_tokens is not None)}
    for flag, (source, used) in only.items():
        if used and args.source != source:
            raise UsageError(f"argument {flag}: only applies with --source {source}")
    if args.source == "task" and args.data is None:
        raise UsageError("argument --data: --source task needs a task .jsonl file")


def source_prompts(args, tokenizer, config, read_prompts_file):
    """The ``prompts`` of ``generate_replay`` for ``args.source``: None (BOS), token-id lists or a SelfDialogue."""
    from ..generation import SelfDialogue, task_prompts

    if args.source == "bos":
        return read_prompts_file(args.prompts_file, tokenizer, config) if args.prompts_file is not None else None
    if args.source == "task":
        try:
            prompts = task_prompts(args.data, tokenizer,
                                   prompt_tokens=args.prompt_tokens or DEFAULT_PROMPT_TOKENS)
        except ValueError as exc:
            raise UsageError(f"argument --data: {one_line(exc).removeprefix('task: ')}") from None
        for i, ids in enumerate(prompts):
            check_token_ids(ids, config, f"argument --data: example {i + 1}")
        return prompts
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UsageError("argument --source: self-dialogue needs a chat template, and the --model directory has "
                         "no tokenizer with one")
    try:
        return SelfDialogue(tokenizer, max_user_tokens=args.max_user_tokens)
    except ValueError as exc:
        raise UsageError(f"argument --source: self-dialogue: the --model directory's {one_line(exc)}") from None
