"""Calibration text -> token samples.

A calibration file is one of:

* plain text: every non-empty line is a record;
* JSON lines with a text field (``field``, default ``"text"``): every line is a record;
* chat JSON lines: every line has a ``messages`` list (``{"role", "content"}``), rendered with the tokenizer's
  chat template.

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

import json
import logging
import os
from pathlib import Path

import torch

from deltacomp.errors import DeltacompError

log = logging.getLogger(__name__)
DEFAULT_SAMPLES = 128
DEFAULT_TOKENS = 128 * 2048
CHARS_PER_TOKEN = 64


class CalibrationError(DeltacompError):
    """Calibration text that cannot give the samples asked for."""


def read_records(path: str | os.PathLike, field: str = "text") -> tuple[str, list]:
    """``(kind, records)``: kind is ``text``, ``json`` or ``chat``; records are strings or message lists."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path}: no such file")
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if b"\0" in raw or text.count("\ufffd") > 0.01 * max(len(text), 1):
        raise CalibrationError(f"calibration file {path} is not UTF-8 text (binary data?)")
    lines = text.splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise CalibrationError(f"calibration file {path} is empty")
    if path.suffix not in (".jsonl", ".json", ".ndjson") and not numbered[0][1].lstrip().startswith("{"):
        return "text", [line for _, line in numbered]
    kind, records = None, []
    for no, line in numbered:
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise CalibrationError(f"calibration file {path} line {no}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            got = type(obj).__name__
            raise CalibrationError(f"calibration file {path} line {no}: expected a JSON object, got {got}")
        if field in obj:
            if not isinstance(obj[field], str):
                raise CalibrationError(f"calibration file {path} line {no}: field {field!r} is not a string")
            kind, record = kind or "json", obj[field]
        elif "messages" in obj:
            if not isinstance(obj["messages"], list) or not all(isinstance(m, dict) for m in obj["messages"]):
                raise CalibrationError(f"calibration file {path} line {no}: 'messages' must be a list of objects")
            kind, record = kind or "chat", obj["messages"]
        else:
            have = ", ".join(sorted(obj)) or "none"
            raise CalibrationError(
                f"calibration file {path} line {no}: no field {field!r} and no 'messages' (fields: {have}); "
                "name the text field with --calib-field"
            )
        records.append(record)
    return kind, records


def tokenize(kind: str, records: list, tokenizer, max_chars: int | None = None) -> list[list[int]]:
    """Token ids of each record (special tokens as the tokenizer adds them; chat text through its template).

    ``max_chars`` cuts each text first (records longer than a sample can hold are not tokenized whole)."""
    if kind == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise CalibrationError("the calibration file is chat JSON lines but the tokenizer has no chat template")
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in records]
        return [tokenizer(t[:max_chars], add_special_tokens=False, verbose=False)["input_ids"] for t in texts]
    return [tokenizer(t[:max_chars], verbose=False)["input_ids"] for t in records]


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


def load_samples(path: str | os.PathLike, tokenizer, samples: int | None = None, seqlen: int | None = None,
                 max_len: int = 2048, field: str = "text") -> list[torch.Tensor]:
    """Read, tokenize and cut a calibration file: a list of 1-D token-id tensors."""
    kind, records = read_records(path, field)
    # one sample per record keeps max_len tokens of it: a record is cut at CHARS_PER_TOKEN x that many characters
    # (a token rarely spans more), so that one huge line is not tokenized whole
    tokens = tokenize(kind, records, tokenizer, max_len * CHARS_PER_TOKEN if seqlen is None else None)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    out = make_samples(tokens, samples, seqlen, max_len, sep, source=f"calibration file {path}")
    log.info("calibration: %d samples, %d tokens from %s (%s)", len(out), sum(len(t) for t in out), path, kind)
    return out
