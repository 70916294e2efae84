"""MeteoRA's mixture: a router ``Linear(n -> k)`` per adapted module, top-k deltas per token.

Each module's router reads that module's input x (..., n); the kept logits go through a softmax at temperature
T, the others get weight 0. An optional routing loss (``config.route_weight``) pulls every router towards the
example's task (cross-entropy over all k logits), as MeteoRA trains it.
"""

from __future__ import annotations

import torch

from deltacomp.fusion.gates.base import Gate, register

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

    def router(self, site):
        j = self.sites.sites.index(site)

        def route(x: torch.Tensor) -> torch.Tensor:
            logits = x.float() @ self.routers[j].T  # (..., k)
            self._logits[j] = logits if torch.is_grad_enabled() else None
            return topk_weights(logits, self.config.top_k, self.config.temperature)

        return route

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
