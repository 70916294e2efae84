"""Encoder quality: mean-pooled, L2-normalised sentence embeddings and their agreement."""

from __future__ import annotations

import os

import torch

# The behaviour the real MiniLM fine-tune learned: base 0.330, fine-tune 0.967.
BEHAVIOUR_PAIR = ("pod keeps crashing", "CrashLoopBackOff")

SENTENCES = (
    "pod keeps crashing",
    "CrashLoopBackOff",
    "the node is out of disk space",
    "kubectl get pods shows ImagePullBackOff",
    "latency on the checkout service spiked after the deploy",
    "rollback the last release",
    "the database connection pool is exhausted",
    "OOMKilled container restarted",
    "certificate expired on the ingress",
    "alert: p99 latency above SLO for 10 minutes",
    "disk I/O saturation on the primary replica",
    "the cron job did not run last night",
    "how do I bake sourdough bread",
    "the cat sat on the mat",
    "a quiet walk along the river at dawn",
    "quarterly revenue grew by eight percent",
    "DNS resolution fails intermittently inside the cluster",
    "increase the replica count of the deployment",
    "memory leak in the payment worker",
    "the load balancer health check is failing",
    "terraform plan shows unexpected drift",
    "paging the on-call engineer",
    "the train was late again this morning",
    "error budget burned through in two days",
)


def load(model_dir: str | os.PathLike):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the caller reports; a bar per model load is noise
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    return tok, model


@torch.no_grad()
def embed(tok, model, sentences) -> torch.Tensor:
    """(N, d) unit vectors: attention-masked mean of the last hidden states."""
    batch = tok(list(sentences), padding=True, truncation=True, return_tensors="pt")
    return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, d) unit vectors: the mean of ``hidden (B, T, d)`` over the tokens ``attention_mask (B, T)`` keeps."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def behaviour(tok, model) -> float:
    e = embed(tok, model, BEHAVIOUR_PAIR)
    return float(e[0] @ e[1])


def agreement(emb_a: torch.Tensor, emb_b: torch.Tensor) -> float:
    """Mean cosine between matching rows of two embedding sets."""
    return float((emb_a * emb_b).sum(-1).mean())


def report(model_dir: str | os.PathLike, reference: torch.Tensor | None = None,
           sentences=SENTENCES) -> dict:
    """Behaviour score, and mean cosine to ``reference`` embeddings of ``sentences`` when given."""
    tok, model = load(model_dir)
    out = {"behaviour": behaviour(tok, model), "embeddings": embed(tok, model, sentences)}
    if reference is not None:
        out["agreement"] = agreement(out["embeddings"], reference)
    return out
