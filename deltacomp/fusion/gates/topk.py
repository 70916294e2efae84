"""MeteoRA's mixture: a router ``Linear(n -> k)`` per adapted module, top-k deltas per token.

Each module's router reads that module's input x (..., n); the kept logits go through a softmax at temperature
T, the others get weight 0. Sibling modules that read one input (q|k|v, gate|up) compute their logits in one
product. An optional routing loss (``config.route_weight``) pulls every router towards the
example's task (cross-entropy over all k logits), as MeteoRA trains it.
"""

from __future__ import annotations

import torch

from deltacomp.fusion.gates.base import Gate, register
from deltacomp.kernels.shared import PerInput

INIT_STD = 0.02


def topk_weights(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """logits (..., K) -> (..., K): softmax over the k largest / T, zeros elsewhere."""
    top, idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top / temperature, dim=-1))


@register("topk")
class TopKGate(Gate):
    per_module = True

    def __init__(self, sites, config):
        super().__init__(sites, config)
        self.needs_task = config.route_weight > 0
        g = torch.Generator().manual_seed(0)
        self.routers = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(self.k, s.layer.in_features, generator=g) * INIT_STD) for s in sites)
        self._logits: list[torch.Tensor | None] = [None] * len(sites)
        self._made: dict[int, PerInput] = {}  # a set of siblings' weights, by its first site
        self._site_of = {id(s.layer): i for i, s in enumerate(sites)}  # a layer's router, by the layer

    def router(self, site):
        """The module's own router. Sibling layers that read one input (q|k|v, gate|up) get their logits from one
        product, made at the first sibling's call (:class:`~deltacomp.kernels.shared.PerInput`); each still mixes
        the deltas by its own weights, so each runs the op alone."""
        siblings = site.layer.siblings
        members = [site.layer] if siblings is None else list(siblings.members)
        js, slot = [self._site_of[id(m)] for m in members], members.index(site.layer)
        made = self._made.setdefault(js[0], PerInput(len(js)))

        def route(x: torch.Tensor) -> torch.Tensor:
            if len(js) == 1 or torch.compiler.is_compiling():
                return self._weights([js[slot]], x)[..., 0, :]
            return made.get(x, slot, lambda: self._weights(js, x))[..., slot, :]

        return route

    def _weights(self, js: list[int], x: torch.Tensor) -> torch.Tensor:
        """x (..., n) -> (..., len(js), k): routers ``js``'s top-k weights, their logits from one product."""
        w = self.routers[js[0]] if len(js) == 1 else torch.cat([self.routers[j] for j in js])
        logits = (x.float() @ w.T).unflatten(-1, (len(js), self.k))
        keep = torch.is_grad_enabled()
        for i, j in enumerate(js):
            self._logits[j] = logits[..., i, :] if keep else None
        return topk_weights(logits, self.config.top_k, self.config.temperature)

    def aux_loss(self, task: torch.Tensor | None) -> torch.Tensor | None:
        if not self.needs_task or task is None:
            return None
        losses = []
        for logits in self._logits:
            if logits is None:
                continue
            flat = logits.reshape(task.shape[0], -1, self.k)  # (B, T, k)
            target = task[:, None].expand(flat.shape[:2])
            losses.append(torch.nn.functional.cross_entropy(flat.reshape(-1, self.k), target.reshape(-1)))
        return self.config.route_weight * torch.stack(losses).mean() if losses else None

    def detach(self) -> None:
        super().detach()
        self._logits = [None] * len(self._logits)
        self._made = {}
