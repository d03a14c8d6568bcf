"""Two texts that ship with every Python installation, and a byte-level tokenizer for them.

Text A (the "old" knowledge) is English prose: the docstrings of standard-library modules, their
classes and functions. Text B (the "new" task) is Python code: the same modules' source with every
docstring and comment removed (``ast.unparse``). Both are read with ``ast`` from the standard library's
``.py`` files, so nothing is imported or downloaded, and the same Python version gives the same texts.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from dataclasses import dataclass

import torch

# Standard-library modules present in every CPython >= 3.10, read in this order.
STDLIB_FILES = [
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "configparser.py", "contextlib.py", "copy.py",
    "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "doctest.py", "enum.py", "fractions.py",
    "ftplib.py", "functools.py", "gettext.py", "heapq.py", "imaplib.py", "inspect.py", "locale.py",
    "mailbox.py", "optparse.py", "pathlib.py", "pdb.py", "pickle.py", "pprint.py", "random.py",
    "shutil.py", "smtplib.py", "socket.py", "ssl.py", "statistics.py", "string.py", "subprocess.py",
    "tarfile.py", "textwrap.py", "threading.py", "timeit.py", "trace.py", "typing.py", "zipfile.py",
    "json/decoder.py", "json/encoder.py", "logging/__init__.py", "logging/handlers.py",
    "email/message.py", "email/utils.py", "http/client.py", "http/server.py", "urllib/parse.py",
    "urllib/request.py", "unittest/case.py", "collections/__init__.py", "concurrent/futures/_base.py",
    "asyncio/tasks.py", "asyncio/events.py", "xml/dom/minidom.py", "html/parser.py", "tomllib/_parser.py",
]

BOS, EOS = 256, 257
VOCAB_SIZE = 258  # 256 byte values + BOS + EOS
MIN_DOCSTRING_CHARS = 80


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _docstring_nodes(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def load_texts() -> tuple[str, str]:
    """(prose, code) from the standard library of the running Python."""
    prose, code = [], []
    root = _stdlib_dir()
    for rel in STDLIB_FILES:
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in _docstring_nodes(tree):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                prose.append(doc)
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        code.append(ast.unparse(tree))
    return "\n\n".join(prose), "\n\n".join(code)


def encode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


@dataclass
class TextSplit:
    train: torch.Tensor  # 1-D byte ids
    heldout: torch.Tensor


def split(text: str, heldout_fraction: float = 0.1) -> TextSplit:
    ids = encode(text)
    cut = int(len(ids) * (1 - heldout_fraction))
    return TextSplit(ids[:cut], ids[cut:])


def random_windows(ids: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` windows of ``length`` tokens: BOS followed by length-1 consecutive bytes of ``ids``."""
    starts = torch.randint(0, len(ids) - length, (count,), generator=generator)
    body = torch.stack([ids[s : s + length - 1] for s in starts.tolist()])
    return torch.cat([torch.full((count, 1), BOS, dtype=torch.long), body], dim=1)


def evaluation_windows(ids: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """``count`` evenly spaced windows (deterministic) for held-out losses."""
    step = max(1, (len(ids) - length) // count)
    body = torch.stack([ids[i * step : i * step + length - 1] for i in range(count)])
    return torch.cat([torch.full((count, 1), BOS, dtype=torch.long), body], dim=1)
