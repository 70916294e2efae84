"""Training and evaluation data of a fusion: prompt/answer examples of a data file's records
(:func:`deltacomp.io.text_records.read_records`).

``--data`` holds, one record a line:

* JSON objects with ``prompt`` and ``answer`` strings (the answer may be named ``response``, ``completion`` or
  ``output``) and optionally ``task``, the index of the delta the example belongs to (used by the sentence router
  and the topk routing loss);
* chat JSON lines (``messages``): the last assistant turn is the answer, everything before it (rendered with the
  tokenizer's chat template) the prompt;
* plain text or JSON lines with a text field: the whole record is scored, with no prompt and no exact match.

The loss of an example is the mean next-token loss over its answer tokens (over all tokens without an answer).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from deltacomp.fusion.config import FusionError
from deltacomp.io.text_records import Chat, PromptAnswer, read_records


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str = ""  # empty: the prompt is plain text, scored whole
    task: int | None = None  # the delta this example belongs to, when known


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
    """Every record of ``path`` (:func:`deltacomp.io.text_records.read_records`, plain text by line) as an
    :class:`Example` (module docstring); one clear error per problem."""
    out = []
    for r in read_records(path, field, "lines", "data file", FusionError):
        if isinstance(r, PromptAnswer):
            out.append(Example(r.prompt, r.answer, r.task))
        elif isinstance(r, Chat):
            out.append(_chat(list(r.messages), tokenizer, f"data file {path} line {r.line}"))
        else:
            out.append(Example(r.text))
    return out


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
