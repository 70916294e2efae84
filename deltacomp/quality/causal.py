"""Causal-LM quality against a reference model (the fine-tune): perplexity, KL of next-token distributions, top-1.

The reference's distributions are kept compactly, as its top-k log-probabilities per scored token
(:class:`Reference`), so that only one model needs to be in memory: the reference is scored first, then each
candidate's logits are compared with it batch by batch.

KL(reference || model) is computed over the reference's top-k tokens plus one bucket holding the rest of the
vocabulary (:func:`kl_topk`). That is the exact KL between the two distributions coarsened to k + 1 outcomes: a
lower bound of the full KL, equal to it when k covers the vocabulary, and close to it when the reference's
tail mass is small (k = 256 of a 49k vocabulary leaves well under 1% of the mass in the bucket for a fine-tune).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_TOP_K = 256


# -- pure metrics on logits ---------------------------------------------------------------------------------------
def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each label: logits (N, V), labels (N,) -> (N,)."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")


def perplexity(nll_sum: float, count: int) -> float:
    """exp of the mean negative log-likelihood (nats); inf when nothing was scored or it overflows."""
    if count == 0:
        return math.inf
    mean = nll_sum / count
    return math.exp(mean) if mean < 700 else math.inf


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row: (N, V) -> log-probs (N, k) float32, indices (N, k) int64."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return values, indices


def kl_topk(ref_logp: torch.Tensor, ref_idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) per row over the reference's top-k tokens and one rest-of-vocabulary bucket.

    ref_logp, ref_idx (N, k) from :func:`top_k` of the reference; logits (N, V) of the model -> (N,) nats.
    """
    logq_all = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    logq = logq_all.gather(-1, ref_idx)  # (N, k)
    p = ref_logp.exp()
    kl = (p * (ref_logp - logq)).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    q_rest = (1 - logq.exp().sum(-1)).clamp(min=0)
    tail = torch.where(p_rest > 0, p_rest * (torch.log(p_rest) - torch.log(q_rest.clamp(min=1e-30))),
                       torch.zeros_like(p_rest))
    return (kl + tail).clamp(min=0)


def kl_full(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(reference || model) per row: (N, V), (N, V) -> (N,) nats."""
    logp = torch.log_softmax(ref_logits.float(), dim=-1)
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0)


def top1_agreement(ref_top1: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether the model's most likely token is the reference's: (N,), (N, V) -> (N,) bool."""
    return logits.argmax(-1) == ref_top1


# -- data -> batches of scored positions ---------------------------------------------------------------------------
@dataclass
class Batch:
    inputs: dict  # input_ids, attention_mask (B, T)
    labels: torch.Tensor  # (N,) the next token at every scored position
    positions: torch.Tensor  # (N, 2) (row, column) of the logits that predict each label


def make_batches(tok, texts, max_length: int = 256, batch_size: int = 8) -> list[Batch]:
    """Tokenise ``texts`` (truncated to ``max_length`` tokens) into batches; every real next token is scored."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    texts = list(texts)
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
        valid = (mask[:, :-1] * mask[:, 1:]).bool()  # position t predicts token t + 1
        rows, cols = valid.nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        batches.append(Batch({"input_ids": ids, "attention_mask": mask}, ids[rows, cols + 1],
                             torch.stack([rows, cols], dim=1)))
    return batches


def answer_batches(items, pad_id: int, batch_size: int = 32) -> list[Batch]:
    """Batches of whole dialogues that score only their answers: ``items`` of (token ids, answer start) (the
    answer is ``ids[start:]``, ``start >= 1``); the positions ``start - 1 .. len - 2`` predict its tokens."""
    batches = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, cols = [], []
        for r, (seq, start) in enumerate(chunk):
            if not 1 <= start < len(seq):
                raise ValueError(f"item {i + r}: the answer must start inside the sequence (1 <= {start} < {len(seq)})")
            ids[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq), 1
            rows += [r] * (len(seq) - start)
            cols += range(start - 1, len(seq) - 1)
        rows, cols = torch.tensor(rows), torch.tensor(cols)  # (N,), (N,)
        batches.append(Batch({"input_ids": ids, "attention_mask": mask}, ids[rows, cols + 1],
                             torch.stack([rows, cols], dim=1)))
    return batches


@torch.no_grad()
def scored_logits(model, batch: Batch, device: str = "cpu") -> torch.Tensor:
    """(N, V) float32 logits at the batch's scored positions."""
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    logits = model(**inputs).logits  # (B, T, V)
    pos = batch.positions.to(device)
    return logits[pos[:, 0], pos[:, 1]].float()


# -- the runner ----------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """The reference model's compact distributions at every scored position of every batch."""

    logp: list[torch.Tensor]  # per batch (N, k)
    idx: list[torch.Tensor]  # per batch (N, k)
    metrics: dict


def score_reference(model, batches: list[Batch], k: int = DEFAULT_TOP_K, device: str = "cpu") -> Reference:
    logps, idxs = [], []
    nll, count = 0.0, 0
    for b in batches:
        logits = scored_logits(model, b, device)
        labels = b.labels.to(logits.device)
        nll += float(token_nll(logits, labels).sum())
        count += labels.numel()
        lp, ix = top_k(logits, k)
        logps.append(lp.cpu())
        idxs.append(ix.cpu())
    metrics = {"ppl": perplexity(nll, count), "nll": nll / max(count, 1), "kl": 0.0, "top1": 1.0, "tokens": count}
    return Reference(logps, idxs, metrics)


def score(model, batches: list[Batch], ref: Reference, device: str = "cpu") -> dict:
    """Perplexity of ``model`` on the data, mean KL(reference || model) per token, top-1 agreement."""
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for b, lp, ix in zip(batches, ref.logp, ref.idx):
        logits = scored_logits(model, b, device)
        lp, ix = lp.to(logits.device), ix.to(logits.device)
        nll += float(token_nll(logits, b.labels.to(logits.device)).sum())
        kl += float(kl_topk(lp, ix, logits).sum())
        agree += int(top1_agreement(ix[:, 0], logits).sum())
        count += b.labels.numel()
    n = max(count, 1)
    return {"ppl": perplexity(nll, count), "nll": nll / n, "kl": kl / n, "top1": agree / n, "tokens": count}


class BatchScorer:
    """Scores models on fixed batches against a reference model, as a probe of
    :func:`deltacomp.evaluate.evaluate_packages`: ``reference(tok, model)`` once, with the reference's weights in
    place, then ``score(tok, model)`` for each other model. Both return the metrics of :func:`score`."""

    def __init__(self, batches: list[Batch], k: int = DEFAULT_TOP_K, device: str = "cpu"):
        self.batches, self.k, self.device = batches, k, device
        self.ref: Reference | None = None

    def reference(self, tok, model) -> dict:
        self.ref = score_reference(model, self.batches, self.k, self.device)
        return dict(self.ref.metrics)

    def score(self, tok, model) -> dict:
        if self.ref is None:
            raise RuntimeError("BatchScorer.score before reference: score the reference model first")
        return score(model, self.batches, self.ref, self.device)
