"""Token frequencies: how much each row of a token table (or output head) counts, for its compression.

A token table's delta ``dE (V, d)`` is used row by row: as input embedding, row v when token v is in the text; as
output head (SmolLM2 ties it to the embedding), row v's logit error counts about as much as the probability of v,
on average its frequency. A plain SVD spends the table's rank on every row alike, and a fine-tune (Adam) moves
the rows of rare tokens as far as common ones. With ``--vocab-weights counts``, the mixed method chooses the table's
singular vectors for ``diag(w) dE`` with ``w = sqrt(count + 1)`` (+1: no row is ignored), counted with the
fine-tune's tokenizer on ``--calib`` when given, else on :data:`TOKEN_TEXT` (everyday English sentences, shipped
with deltacomp). Measured in BENCHMARKS.md ("Token tables weighted by token counts").
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from deltacomp.errors import DeltacompError

log = logging.getLogger(__name__)
TOKEN_TEXT = Path(__file__).with_name("token_text.txt")


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


def vocab_row_weights(folders, vocab: int, samples: list[torch.Tensor] | None = None) -> torch.Tensor | None:
    """Row weights (vocab,) of a token table: counts of ``samples`` (calibration tokens) when given, else of
    :data:`TOKEN_TEXT` with the tokenizer of the first of ``folders`` that has one; None when none has."""
    if samples is None:
        from transformers import AutoTokenizer

        tok = None
        for folder in folders:
            try:
                tok = AutoTokenizer.from_pretrained(str(folder))
                break
            except Exception as e:  # transformers raises many types for a folder without tokenizer files
                log.debug("no tokenizer in %s: %s", folder, e)
        if tok is None:
            log.warning("--vocab-weights counts: no tokenizer in %s; the token tables are not weighted",
                        " or ".join(str(f) for f in folders))
            return None
        samples = text_token_lists(TOKEN_TEXT, tok)
    return row_weights(count_tokens(samples, vocab))
