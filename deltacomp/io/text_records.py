"""Text data files (calibration, evaluation and fusion training data) -> typed records.

A file is one of:

* JSON lines (a ``.jsonl``, ``.json`` or ``.ndjson`` file, or any file whose first non-blank line is a JSON
  object), each non-blank line one record:

  - an object with the text field (``field``, default ``"text"``): :class:`Text`;
  - an object with ``messages``, a list of ``{"role", "content"}`` strings: :class:`Chat`;
  - an object with ``prompt`` and an answer (``answer``, ``response``, ``completion`` or ``output``), and
    optionally ``task`` (the index of the delta the example belongs to): :class:`PromptAnswer`;
  - a JSON string: :class:`Text`.

  The first of these that a record has decides its kind; records of different kinds may share a file.
* plain text, cut into :class:`Text` records as the consumer asks (``split``): ``"lines"``, every non-blank
  line (calibration and fusion data: one sample per line), or ``"paragraphs"``, blocks of lines between blank
  lines, or the lines when the file holds a single block (evaluation data: a paragraph is one scored text).

The file is untrusted: every problem (no file, binary data, no records, bad JSON, a record of another shape) is
one error line that names the file, the line and what was expected. How a record becomes tokens or a sample is
the consumer's choice (:mod:`deltacomp.calib.data`, :mod:`deltacomp.quality.texts`, :mod:`deltacomp.fusion.data`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from deltacomp.errors import DeltacompError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
ANSWER_FIELDS = ("answer", "response", "completion", "output")
SPLITS = ("lines", "paragraphs")


@dataclass(frozen=True)
class Text:
    """A text: a line or paragraph of a plain text file, or a JSON record's text field."""

    text: str
    line: int = 0  # where the record starts in the file (1-based; 0: not from a file)


@dataclass(frozen=True)
class Chat:
    """A conversation: ``{"role", "content"}`` messages, as a tokenizer's chat template takes them."""

    messages: tuple[dict, ...]
    line: int = 0


@dataclass(frozen=True)
class PromptAnswer:
    """A prompt and the answer to it; ``task`` is the delta the example belongs to, when the file says."""

    prompt: str
    answer: str
    task: int | None = None
    line: int = 0


Record = Text | Chat | PromptAnswer


def read_records(path: str | os.PathLike, field: str = "text", split: str = "lines", label: str = "data file",
                 error: type[DeltacompError] = DeltacompError) -> list[Record]:
    """The records of ``path`` (module docstring), in file order.

    ``field``: the text field of JSON records; ``split``: how plain text is cut (``lines`` or ``paragraphs``);
    ``label`` names the file in messages (``calibration file``); ``error``: the exception class raised.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(path)
    where = f"{label} {path}"
    if not path.is_file():
        raise error(f"{where}: no such file")
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if b"\0" in raw or text.count("\ufffd") > 0.01 * max(len(text), 1):
        raise error(f"{where} is not UTF-8 text (binary data?)")
    numbered = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not numbered:
        raise error(f"{where} is empty")
    if path.suffix in JSON_SUFFIXES or _is_object(numbered[0][1]):
        return [_record(line, no, field, where, error) for no, line in numbered]
    if split == "paragraphs":
        blocks = _paragraphs(text.splitlines())
        if len(blocks) > 1:
            return blocks
    return [Text(line, no) for no, line in numbered]


def _is_object(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _paragraphs(lines: list[str]) -> list[Text]:
    """Blocks of non-blank lines, each joined with newlines and numbered by its first line."""
    out, block, start = [], [], 0
    for no, line in enumerate([*lines, ""], 1):
        if line.strip():
            start = start or no
            block.append(line)
        elif block:
            out.append(Text("\n".join(block), start))
            block, start = [], 0
    return out


def _record(line: str, no: int, field: str, where: str, error: type[DeltacompError]) -> Record:
    at = f"{where} line {no}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise error(f"{at}: not valid JSON ({e})") from None
    if isinstance(obj, str):
        return Text(obj, no)
    if not isinstance(obj, dict):
        raise error(f"{at}: expected a JSON object or string, got {type(obj).__name__}")
    if field in obj:
        if not isinstance(obj[field], str):
            raise error(f"{at}: field {field!r} is not a string")
        return Text(obj[field], no)
    if "messages" in obj:
        return Chat(_messages(obj["messages"], at, error), no)
    answer = next((k for k in ANSWER_FIELDS if k in obj), None)
    if "prompt" in obj and answer:
        if not isinstance(obj["prompt"], str) or not isinstance(obj[answer], str):
            raise error(f"{at}: expected string fields 'prompt' and {answer!r}")
        return PromptAnswer(obj["prompt"], obj[answer], _task(obj.get("task"), at, error), no)
    have = ", ".join(sorted(obj)) or "none"
    answers = ", ".join(repr(k) for k in ANSWER_FIELDS)
    raise error(f"{at}: no field {field!r} and no 'messages' (fields: {have}), nor 'prompt' with one of {answers}")


def _messages(messages, at: str, error: type[DeltacompError]) -> tuple[dict, ...]:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise error(f"{at}: 'messages' must be a non-empty list of objects with string 'role' and 'content'")
    return tuple(messages)


def _task(task, at: str, error: type[DeltacompError]) -> int | None:
    if task is not None and (isinstance(task, bool) or not isinstance(task, int) or task < 0):
        raise error(f"{at}: 'task' must be a delta index (an integer >= 0), got {task!r}")
    return task
