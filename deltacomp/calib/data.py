"""Calibration text -> token samples.

A calibration file is read by :func:`deltacomp.io.text_records.read_records`: plain text (a record per
non-blank line), or JSON lines of texts (the ``field`` of each object, default ``"text"``), prompts with their
answers (the prompt followed by the answer), and conversations (``messages``, rendered with the tokenizer's chat
template).

Records become samples in one of two ways:

* ``seqlen=None``: one sample per record (truncated to the model's positions), the first ``samples`` of them.
  By default, the leading records that fit in :data:`DEFAULT_TOKENS` (the public recipe's 128 windows of 2,048
  tokens), and never fewer than :data:`DEFAULT_SAMPLES` records: a file of short sentences is used in full
  rather than cut at 128 of them;
* ``seqlen=L``: the records are joined (with the tokenizer's EOS/SEP between them) into one token stream cut into
  non-overlapping L-token windows, ``samples`` of them (default at most :data:`DEFAULT_SAMPLES`) spread evenly
  over the stream (the public recipe's windows of general text).

Every problem is one :class:`CalibrationError` line naming the file, the line and what was expected.
"""

from __future__ import annotations

import logging
import os

import torch

from deltacomp.errors import DeltacompError
from deltacomp.io.text_records import Chat, PromptAnswer, Record, Text, read_records

log = logging.getLogger(__name__)
DEFAULT_SAMPLES = 128
DEFAULT_TOKENS = 128 * 2048
CHARS_PER_TOKEN = 64
BATCH = 1024  # texts per tokenizer call


class CalibrationError(DeltacompError):
    """Calibration text that cannot give the samples asked for."""


def tokenize(records: list[Record], tokenizer, max_chars: int | None = None,
             source: str = "the calibration file") -> list[list[int]]:
    """Token ids of each record (special tokens as the tokenizer adds them): a text as it is, a prompt followed by
    its answer, a conversation through the tokenizer's chat template.

    ``max_chars`` cuts each text first (records longer than a sample can hold are not tokenized whole). Texts
    are tokenized :data:`BATCH` at a time (one call each: a fast tokenizer splits the batch over its threads)."""
    out: list[list[int]] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            out.extend(tokenizer(texts, verbose=False)["input_ids"])
            texts.clear()
    for r in records:
        if isinstance(r, Chat):
            if not getattr(tokenizer, "chat_template", None):
                raise CalibrationError(f"{source} line {r.line}: a conversation, but the tokenizer has no chat "
                                       "template")
            flush()
            text = tokenizer.apply_chat_template(list(r.messages), tokenize=False)
            out.append(tokenizer(text[:max_chars], add_special_tokens=False, verbose=False)["input_ids"])
        else:
            texts.append((r.text if isinstance(r, Text) else r.prompt + r.answer)[:max_chars])
            if len(texts) == BATCH:
                flush()
    flush()
    return out


def _default_records(token_lists: list[list[int]], max_len: int) -> int:
    """How many leading records the default takes: those within DEFAULT_TOKENS, at least DEFAULT_SAMPLES."""
    total = n = 0
    for t in token_lists:
        total += min(len(t), max_len)
        if total > DEFAULT_TOKENS:
            break
        n += 1
    return max(n, min(len(token_lists), DEFAULT_SAMPLES))


def make_samples(token_lists: list[list[int]], samples: int | None, seqlen: int | None, max_len: int,
                 sep: int | None = None, source: str = "the calibration file") -> list[torch.Tensor]:
    """Cut token lists into samples (module docstring); returns 1-D int64 tensors."""
    token_lists = [t for t in token_lists if t]
    if not token_lists:
        raise CalibrationError(f"{source} gives no tokens")
    if seqlen is None:
        avail = len(token_lists)
        n = _default_records(token_lists, max_len) if samples is None else samples
        if n > avail:
            raise CalibrationError(f"--calib-samples {samples} asked, but {source} has only {avail} records")
        return [torch.tensor(t[:max_len], dtype=torch.long) for t in token_lists[:n]]
    if seqlen > max_len:
        raise CalibrationError(f"--calib-seqlen {seqlen} is longer than the model's {max_len} positions")
    stream: list[int] = []
    for t in token_lists:
        if stream and sep is not None:
            stream.append(sep)
        stream.extend(t)
    total = len(stream)
    if total < seqlen:
        raise CalibrationError(f"{source} has only {total} tokens, shorter than --calib-seqlen {seqlen}")
    windows = total // seqlen
    n = min(windows, DEFAULT_SAMPLES) if samples is None else samples
    if n > windows:
        raise CalibrationError(
            f"--calib-samples {samples} asked, but {source} ({total} tokens) holds only {windows} windows of "
            f"{seqlen} tokens"
        )
    starts = torch.linspace(0, windows - 1, n).round().long().tolist()
    data = torch.tensor(stream[: windows * seqlen], dtype=torch.long).view(windows, seqlen)
    return [data[i] for i in starts]


def answer_start(record: Record, tokenizer, ids: list[int]) -> int | None:
    """Where a record's answer begins in its tokens ``ids`` (:func:`tokenize`'s): a prompt/answer's first answer
    token, a conversation's last turn when that is the assistant's; None for a text, or where nothing of the answer
    is left. The answer begins at the first token where ``ids`` and the part before the answer, tokenized alone,
    differ: a token merged across the boundary (a prompt's trailing space with the answer's first word) counts as
    the answer's."""
    if isinstance(record, PromptAnswer):
        before = tokenizer(record.prompt, verbose=False)["input_ids"]
    elif isinstance(record, Chat) and len(record.messages) > 1 and record.messages[-1].get("role") == "assistant":
        text = tokenizer.apply_chat_template(list(record.messages[:-1]), tokenize=False, add_generation_prompt=True)
        before = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    else:
        return None
    start = next((i for i, (a, b) in enumerate(zip(before, ids)) if a != b), min(len(before), len(ids)))
    return start if 0 < start < len(ids) else None


def load_samples(path: str | os.PathLike, tokenizer, samples: int | None = None, seqlen: int | None = None,
                 max_len: int = 2048, field: str = "text") -> list[torch.Tensor]:
    """Read, tokenize and cut a calibration file: a list of 1-D token-id tensors."""
    return load_samples_and_answers(path, tokenizer, samples, seqlen, max_len, field, answers=False)[0]


def load_samples_and_answers(path: str | os.PathLike, tokenizer, samples: int | None = None,
                             seqlen: int | None = None, max_len: int = 2048,
                             field: str = "text", answers: bool = True) -> tuple[list[torch.Tensor], list[int | None]]:
    """:func:`load_samples`, with each sample's :func:`answer_start` (None throughout without ``answers``, and with
    ``seqlen``: a window cuts across records)."""
    records = read_records(path, field, "lines", "calibration file", CalibrationError)
    # one sample per record keeps max_len tokens of it: a record is cut at CHARS_PER_TOKEN x that many characters
    # (a token rarely spans more), so that one huge line is not tokenized whole
    source = f"calibration file {path}"
    tokens = tokenize(records, tokenizer, max_len * CHARS_PER_TOKEN if seqlen is None else None, source)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    out = make_samples(tokens, samples, seqlen, max_len, sep, source=source)
    starts: list[int | None] = [None] * len(out)
    if answers and seqlen is None:  # one sample per non-empty record, in order
        kept = [(r, t) for r, t in zip(records, tokens) if t][:len(out)]
        starts = [s if (s := answer_start(r, tokenizer, t)) is not None and s < len(x) else None
                  for (r, t), x in zip(kept, out)]
    kinds = ", ".join(sorted({type(r).__name__ for r in records}))
    log.info("calibration: %d samples, %d tokens from %s (%s)", len(out), sum(len(t) for t in out), path, kinds)
    return out, starts
