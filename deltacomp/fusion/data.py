"""Training and evaluation data of a fusion: prompt/answer examples read from the calibration formats.

``--data`` is one of:

* JSON lines with ``prompt`` and ``answer`` strings (and optionally ``task``: the index of the delta the example
  belongs to, used by the sentence router and the topk routing loss);
* chat JSON lines (``messages``): the last assistant turn is the answer, everything before it (rendered with the
  tokenizer's chat template) the prompt;
* plain text or JSON lines with a text field: the whole record is scored, with no prompt and no exact match.

The loss of an example is the mean next-token loss over its answer tokens (over all tokens without an answer).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from deltacomp.calib.data import CalibrationError, read_records
from deltacomp.fusion.config import FusionError


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str = ""  # empty: the prompt is plain text, scored whole
    task: int | None = None  # the delta this example belongs to, when known


def _prompt_answer(path: Path, lines: list[tuple[int, str]]) -> list[Example]:
    out = []
    for no, line in lines:
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise FusionError(f"data file {path} line {no}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("answer"),
                                                                                                 str):
            raise FusionError(f"data file {path} line {no}: expected an object with string fields 'prompt' and "
                              f"'answer' (as on line {lines[0][0]})")
        task = obj.get("task")
        if task is not None and (isinstance(task, bool) or not isinstance(task, int) or task < 0):
            raise FusionError(f"data file {path} line {no}: 'task' must be a delta index (an integer >= 0), "
                              f"got {task!r}")
        out.append(Example(obj["prompt"], obj["answer"], task))
    return out


def _chat(messages: list[dict], tokenizer, where: str) -> Example:
    if not getattr(tokenizer, "chat_template", None):
        raise FusionError(f"{where}: chat records need a tokenizer with a chat template")
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    render = tokenizer.apply_chat_template
    if last is None:
        return Example(render(messages, tokenize=False))
    full = render(messages[: last + 1], tokenize=False)
    for gen in (True, False):
        prompt = render(messages[:last], tokenize=False, add_generation_prompt=gen) if last else ""
        if full.startswith(prompt):
            return Example(prompt, full[len(prompt):])
    raise FusionError(f"{where}: the chat template does not render the conversation as its prompt plus the answer")


def read_examples(path: str | os.PathLike, tokenizer, field: str = "text") -> list[Example]:
    """Every record of ``path`` as an :class:`Example` (module docstring); one clear error per problem."""
    path = Path(path)
    if not path.is_file():
        raise FusionError(f"data file {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise FusionError(f"data file {path} is empty")
    first = lines[0][1].lstrip()
    if first.startswith("{"):
        try:
            head = json.loads(first)
        except ValueError:
            head = None
        if isinstance(head, dict) and "prompt" in head and "answer" in head:
            return _prompt_answer(path, lines)
    try:
        kind, records = read_records(path, field)
    except CalibrationError as e:
        raise FusionError(str(e).replace("calibration file", "data file")) from None
    if kind == "chat":
        return [_chat(m, tokenizer, f"data file {path} record {i + 1}") for i, m in enumerate(records)]
    return [Example(r) for r in records]


# -- tokens ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    start: int  # index of the first scored token (the answer's first, or 1 without an answer)
    task: int | None
    prompt_len: int  # tokens the sentence router reads: the prompt, or the whole record without an answer


def encode(examples: list[Example], tokenizer, max_length: int) -> list[Encoded]:
    """Token ids of prompt + answer (tokenised apart, so the boundary is exact), cut to ``max_length``.

    Examples that leave no token to score are dropped.
    """
    out = []
    for ex in examples:
        p = tokenizer(ex.prompt)["input_ids"] if ex.prompt else []
        a = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] if ex.answer else []
        ids = (p + a)[:max_length]
        start = len(p) if a else 1
        if len(ids) > max(start, 1) and start >= 1:
            out.append(Encoded(ids, start, ex.task, start if a else len(ids)))
    return out


def batches(encoded: list[Encoded], batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0):
    """Yield right-padded batches: input_ids, attention_mask, prompt_mask, labels (-100 where unscored) (B, T)
    and task (B,) (-1 where unknown)."""
    order = list(range(len(encoded)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        part = [encoded[j] for j in order[i:i + batch_size]]
        t = max(len(e.ids) for e in part)
        ids = torch.full((len(part), t), pad_id, dtype=torch.long)
        mask = torch.zeros(len(part), t, dtype=torch.long)
        prompt = torch.zeros(len(part), t, dtype=torch.long)
        labels = torch.full((len(part), t), -100, dtype=torch.long)
        for r, e in enumerate(part):
            n = len(e.ids)
            ids[r, :n] = torch.tensor(e.ids)
            mask[r, :n] = 1
            prompt[r, :e.prompt_len] = 1
            labels[r, e.start:n] = ids[r, e.start:n]
        task = torch.tensor([-1 if e.task is None else e.task for e in part], dtype=torch.long)
        yield {"input_ids": ids, "attention_mask": mask, "prompt_mask": prompt, "labels": labels, "task": task}
