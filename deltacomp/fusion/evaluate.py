"""Scores of a fusion on prompt/answer data: next-token loss and exact match, for the fused model, each delta
alone (its weight 1, the others 0) and the base alone."""

from __future__ import annotations

import torch

from deltacomp.fusion.data import Encoded, Example, batches, encode

MAX_LENGTH = 2048


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def batch_nll(fm, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over each row's scored tokens and their count: (B,), (B,)."""
    logits = fm.forward(batch["input_ids"], batch["attention_mask"], batch["prompt_mask"])  # (B, T, V)
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100,
                                            reduction="none")  # (B, T - 1)
    scored = labels != -100
    return (nll * scored).sum(1), scored.sum(1)


@torch.no_grad()
def example_losses(fm, encoded: list[Encoded], batch_size: int = 8) -> torch.Tensor:
    """(n,) mean next-token loss of each example, in order."""
    pad = fm.tokenizer.pad_token_id
    out = []
    for b in batches(encoded, batch_size, pad):
        nll, count = batch_nll(fm, _to(b, fm.device))
        out.append((nll / count.clamp(min=1)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def loss(fm, encoded: list[Encoded], batch_size: int = 8) -> float:
    """Mean next-token loss (nats) over every scored token."""
    pad = fm.tokenizer.pad_token_id
    total, count = 0.0, 0
    for b in batches(encoded, batch_size, pad):
        nll, n = batch_nll(fm, _to(b, fm.device))
        total, count = total + float(nll.sum()), count + int(n.sum())
    return total / max(count, 1)


@torch.no_grad()
def exact_match(fm, encoded: list[Encoded], batch_size: int = 8) -> float | None:
    """Fraction of examples with an answer whose greedy continuation of the prompt is exactly the answer's tokens
    (as many tokens as the answer has); None when no example has an answer."""
    rows = [e for e in encoded if e.prompt_len == e.start]
    if not rows:
        return None
    hits = 0
    pad = fm.tokenizer.pad_token_id
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        t = max(e.start for e in part)
        ids = torch.full((len(part), t), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(part):  # left-padded prompts
            ids[r, t - e.start:] = torch.tensor(e.ids[:e.start])
            mask[r, t - e.start:] = 1
        new = fm.generate_ids(ids, mask, max(len(e.ids) - e.start for e in part)).cpu()
        for r, e in enumerate(part):
            want = e.ids[e.start:]
            hits += new[r, :len(want)].tolist() == want
    return hits / len(rows)


def compare(fm, examples: list[Example], batch_size: int = 8, exact: bool = True,
            max_length: int = MAX_LENGTH) -> dict:
    """Rows of {model, loss, exact_match} for the base, each delta alone and the fused model."""
    encoded = encode(examples, fm.tokenizer, max_length)

    def row(name: str) -> dict:
        return {"model": name, "loss": loss(fm, encoded, batch_size),
                "exact_match": exact_match(fm, encoded, batch_size) if exact else None}

    rows = []
    with fm.variant(None):
        rows.append(row("base"))
    for i in range(fm.num_deltas):
        with fm.variant([1.0 if j == i else 0.0 for j in range(fm.num_deltas)]):
            rows.append(row(fm.deltas.label(i)))
    rows.append(row(f"fused ({fm.config.gate} gate)"))
    return {"examples": len(encoded), "rows": rows}
