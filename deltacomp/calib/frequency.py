"""Token frequencies: how much each row of a token table (or output head) counts, for its compression.

A token table's delta ``dE (V, d)`` is used row by row: as input embedding, row v when token v is in the text; as
output head (SmolLM2 ties it to the embedding), row v's logit error counts about as much as the probability of v,
on average its frequency. A plain SVD spends the table's rank on every row alike, and a fine-tune (Adam) moves
the rows of rare tokens as far as common ones. With ``--vocab-weights counts``, the mixed method chooses the table's
singular vectors for ``diag(w) dE`` with ``w = sqrt(count + 1)`` (+1: no row is ignored), counted with the
fine-tune's tokenizer on the calibration text, else on deltacomp's everyday English text
(:data:`deltacomp.calib.generic.GENERIC_TEXT`). ``--vocab-weights head`` also hands the output head its input moment
on the same text (:mod:`deltacomp.calib.head`). Measured in BENCHMARKS.md ("Treatments of the token table, by
function").
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from deltacomp.errors import DeltacompError
from deltacomp.stages import timed

log = logging.getLogger(__name__)


def count_tokens(token_lists, vocab: int) -> torch.Tensor:
    """How often each id in [0, vocab) occurs in ``token_lists`` (lists or 1-D tensors of ids): (vocab,) float32;
    ids outside the table are left out."""
    ids = torch.cat([torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in token_lists] or
                    [torch.zeros(0, dtype=torch.long)])
    ids = ids[(ids >= 0) & (ids < vocab)]
    return torch.bincount(ids, minlength=vocab).float()


def row_weights(counts: torch.Tensor) -> torch.Tensor:
    """``sqrt(count + 1)`` per row (V,): the weight of each row's error in the table's SVD."""
    return (counts.float() + 1.0).sqrt()


def text_token_lists(path: str | Path, tokenizer) -> list[list[int]]:
    """Token ids of each non-blank line of a text file."""
    lines = [s for s in Path(path).read_text(encoding="utf-8").splitlines() if s.strip()]
    if not lines:
        raise DeltacompError(f"{path}: no text to count tokens on")
    return tokenizer(lines)["input_ids"]


def find_tokenizer(folders):
    """The tokenizer of the first of ``folders`` that has one, or None. A folder's tokenizer is loaded once a process
    while its files are unchanged (a compression asks for it up to three times: whether ``--calib auto`` can run, the
    calibration text, the token tables' weights)."""
    for folder in folders:
        tok = _load_tokenizer(str(folder), _files_stamp(folder))
        if tok is not None:
            return tok
    return None


def _files_stamp(folder) -> tuple:
    """Name, size and modification time of each file in ``folder`` (empty when it cannot be listed)."""
    try:
        with os.scandir(folder) as entries:
            return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()))
    except OSError:
        return ()


@functools.lru_cache(maxsize=8)
def _load_tokenizer(folder: str, stamp: tuple):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many types for a folder without tokenizer files
        log.debug("no tokenizer in %s: %s", folder, e)
        return None


def token_samples(folders, max_len: int, quiet: bool = False) -> list[torch.Tensor] | None:
    """The everyday text (:data:`deltacomp.calib.generic.GENERIC_TEXT`) as token samples (windows of up to 128
    tokens) with the tokenizer of the first of ``folders`` that has one; None when none has (a warning unless
    ``quiet``)."""
    from deltacomp.calib.data import make_samples
    from deltacomp.calib.generic import GENERIC_TEXT

    tok = find_tokenizer(folders)
    if tok is None:
        (log.debug if quiet else log.warning)("--vocab-weights: no tokenizer in %s; the token tables are not "
                                              "weighted", " or ".join(str(f) for f in folders))
        return None
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    return make_samples(text_token_lists(GENERIC_TEXT, tok), None, min(128, max_len), max_len, sep,
                        source=str(GENERIC_TEXT))


OUTPUT_HEADS = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")


def _head_of(names: list[str], ft) -> str | None:
    """Which of the token tables ``names`` the output head is: an lm_head, else (tied) the token embedding."""
    heads = [n for n in names if OUTPUT_HEADS.search(n)]
    if heads:
        return heads[0]
    if any(OUTPUT_HEADS.search(k) for k in ft.keys()) or not ft.config.get("tie_word_embeddings", True):
        return None  # the head is stored apart (and not compressed here)
    return names[0] if names else None


@timed("token tables")
def token_table_contexts(base, ft, shapes: dict[str, tuple[int, int]], config,
                         samples: list[torch.Tensor] | None = None,
                         moment: Callable[[], torch.Tensor | None] | None = None) -> dict[str, Callable[[], dict]]:
    """MatrixContext fields of each token table ``shapes`` ({name: (rows, cols)}) for ``config.vocab_weights``, as
    a function called when that table is compressed: ``row_weight`` (rows,) from token counts
    (:func:`row_weights`), and with ``head`` the output head's ``hessian`` on the same text: ``samples``
    (``--calib``'s, already loaded) when given, else ``--calib`` when given, else the everyday text. ``moment``
    gives that Hessian (the calibration's walk taken on past the last block); without it the head's function runs a
    walk of its own (:func:`deltacomp.calib.head.head_moment`).
    Empty when no tokenizer is found. ``auto`` is ``head`` without warnings: where the model has no tokenizer or no
    head input of the table's width, less weighting, silently."""
    asked = config.vocab_weights != "auto"
    if samples is None and config.calib:
        from deltacomp.calib.provider import load_calibration

        samples = load_calibration(config.groups.calibration, ft, base)[0]
    elif samples is None:
        samples = token_samples((ft.path, base.path), int(ft.config.get("max_position_embeddings") or 2048),
                                quiet=not asked)
    if samples is None:
        return {}
    counts = count_tokens(samples, max(m for m, _ in shapes.values()))
    weights = {name: row_weights(counts[:m]) for name, (m, _) in shapes.items()}
    out = {name: functools.partial(dict, row_weight=w) for name, w in weights.items()}
    head = _head_of(sorted(shapes), ft) if config.vocab_weights in ("head", "auto") else None
    if head is not None:
        if moment is None:
            from deltacomp.calib.head import head_moment

            moment = timed("token tables")(functools.partial(head_moment, ft, samples, config.device))
        where = f"{ft.path}; {head} is weighted by token counts only"
        out[head] = functools.partial(_head_fields, weights[head], moment, shapes[head][1], asked, where)
    return out


def _head_fields(row_weight: torch.Tensor, moment: Callable[[], torch.Tensor | None], width: int, asked: bool,
                 where: str) -> dict:
    h = moment()
    if h is not None and h.shape[0] == width:
        return {"row_weight": row_weight, "hessian": h}
    if asked:
        log.warning("--vocab-weights head: no output head input of width %d found in %s", width, where)
    return {"row_weight": row_weight}
