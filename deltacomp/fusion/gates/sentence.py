"""DLP-LoRA's sentence router: a small classifier reads the prompt once and fixes the weights for the sequence.

The router is an MLP over the prompt's mean-pooled input embeddings (the model's own embedding table, frozen):
``p = softmax(MLP(mean_t e_t))`` over the k deltas. It keeps the smallest set of deltas whose probability mass
reaches ``top_p`` (at least one), renormalises, and uses those weights for every token of that sequence, the
prompt and every generated token alike. Trained with the LM loss plus a cross-entropy towards each example's task.
"""

from __future__ import annotations

import torch

from deltacomp.fusion.gates.base import Gate, register


def top_p_weights(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (B, k) -> (B, k): the smallest set of deltas reaching mass ``top_p``, renormalised; others 0."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the deltas ranked above each one
    keep_sorted = before < top_p  # the first always stays
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def pooled(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """embeddings (B, T, d), mask (B, T) -> (B, d) the mean over the masked tokens, float32."""
    m = mask.to(torch.float32)[..., None]
    return (embeddings.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


@register("sentence")
class SentenceGate(Gate):
    needs_task = True

    def __init__(self, sites, config):
        super().__init__(sites, config)
        d = sites.model.get_input_embeddings().weight.shape[1]
        with torch.random.fork_rng(devices=[]):  # the same initial router on every run
            torch.manual_seed(0)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(d, config.hidden), torch.nn.GELU(),
                                           torch.nn.Linear(config.hidden, self.k))
        self._w: torch.Tensor | None = None  # (B, k) for the current sequences
        self._logits: torch.Tensor | None = None

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) prompt tokens -> (B, k) router logits."""
        return self.mlp(pooled(self.sites.input_embeddings(input_ids), attention_mask))

    def begin(self, input_ids, attention_mask) -> None:
        self._logits = self.logits(input_ids, attention_mask)
        self._w = top_p_weights(torch.softmax(self._logits, dim=-1), self.config.top_p)
        self._set_picks(self._picks())

    def _picks(self) -> torch.Tensor | None:
        """(B,) each sequence's delta when every sequence keeps one alone (its weight then exactly 1), outside
        training; else None."""
        if torch.is_grad_enabled():
            return None  # training: the router's weights carry the gradient
        kept = self._w > 0
        return kept.to(torch.int8).argmax(-1) if bool((kept.sum(-1) == 1).all()) else None

    def _set_picks(self, picks: torch.Tensor | None) -> None:
        """Where this gate routes (not inside FusionModel.variant): one delta kept by every sequence runs as a bank of
        one delta (``DeltaLinear.only``); different ones, at decode steps (a token row a sequence), as a multi-tenant
        call (``DeltaLinear.index``: each row reads only its own delta's rank rows). Both decode faster than one-hot
        weights over all k; prompts of several tokens keep the weights."""
        only = index = None
        if picks is not None and bool((picks == picks[0]).all()):
            only = int(picks[0])
        elif picks is not None:
            b = picks.shape[0]

            def index(x: torch.Tensor) -> torch.Tensor | None:
                if x.shape[:-1].numel() != b:
                    return None
                return picks.view(b, *([1] * (x.dim() - 2))).expand(x.shape[:-1])

        for site in self.sites:
            routed = site.layer.router is not None
            site.layer.only, site.layer.index = (only, index) if routed else (None, None)

    def router(self, site):
        def route(x: torch.Tensor) -> torch.Tensor:
            if self._w is None:
                raise RuntimeError("the sentence router has not read a prompt; call begin() first")
            b = self._w.shape[0]
            return self._w.view(b, *([1] * (x.dim() - 2)), self.k).expand(*x.shape[:-1], self.k)

        return route

    def aux_loss(self, task):
        if task is None or self._logits is None:
            return None
        return torch.nn.functional.cross_entropy(self._logits, task)

    def detach(self) -> None:
        super().detach()
        self._set_picks(None)
        self._w = self._logits = None
