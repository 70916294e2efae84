"""Row-sparse deltas of vocabulary matrices: a fine-tune moves the rows of the tokens it saw and barely the rest.

On the real MiniLM pair, 2,000 of the 30,522 rows of the word-embedding delta hold 99.93% of its energy (squared
norm); the other rows moved by about 1e-4 each. Keeping those rows and compressing them as a (k, n) matrix spends
the whole matrix's budget where the change is, instead of spreading a low rank over every token.
"""

from __future__ import annotations

import re

import torch

from deltacomp.config import EMBEDDING_PATTERN


def is_vocab_matrix(name: str) -> bool:
    """A token table or output head (rows are tokens), by the tensor name."""
    return re.search(EMBEDDING_PATTERN, name) is not None


POSITION_TABLES = re.compile(r"(^|\.)(position_embeddings|embed_positions|wpe)\.weight$")


def is_token_table(name: str) -> bool:
    """A vocabulary matrix whose rows are token ids (not positions): a token embedding or an output head."""
    return is_vocab_matrix(name) and POSITION_TABLES.search(name) is None


def select_rows(delta: torch.Tensor, energy: float, max_share: float = 0.5) -> torch.Tensor | None:
    """Sorted int64 indices of the fewest rows of ``delta`` (m, n) holding ``energy`` of its squared norm; None
    when that takes more than ``max_share`` of the rows (or ``energy`` >= 1): the dense form is then no worse."""
    if energy >= 1:
        return None
    m = delta.shape[0]
    power = delta.float().pow(2).sum(1)  # (m,)
    order = power.argsort(descending=True)
    cum = power[order].cumsum(0)
    total = float(cum[-1])
    if total == 0:
        return None
    k = int(torch.searchsorted(cum, torch.tensor(energy * total, dtype=cum.dtype, device=cum.device))) + 1
    k = min(k, m)
    if k > max_share * m:
        return None
    return order[:k].sort().values.cpu()


def scatter_rows(sub: torch.Tensor, rows: torch.Tensor, m: int) -> torch.Tensor:
    """The (m, n) matrix that is ``sub`` (k, n) at ``rows`` (k,) and zero elsewhere."""
    out = torch.zeros(m, sub.shape[1], dtype=sub.dtype, device=sub.device)
    out[rows.long().to(sub.device)] = sub
    return out


def check_rows(rows: torch.Tensor, k: int, m: int) -> str | None:
    """Why stored ``rows`` are not k strictly increasing indices in [0, m); None when they are."""
    if rows.dtype != torch.int32 or tuple(rows.shape) != (k,):
        return f"must be int32 [{k}], got {rows.dtype} {list(rows.shape)}"
    r = rows.long()
    if k and (int(r.min()) < 0 or int(r.max()) >= m):
        return f"holds an index outside [0, {m})"
    if k > 1 and not bool((r[1:] > r[:-1]).all()):
        return "must be strictly increasing"
    return None
