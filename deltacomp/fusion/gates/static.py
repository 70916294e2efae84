"""Static / task-level weights (LoRA-Hub style): one weight per delta for every token, given or learned."""

from __future__ import annotations

import torch

from deltacomp.fusion.gates.base import Gate, register


@register("static")
class StaticGate(Gate):
    """``w (k,)``: the weights given (``config.weights``) or 1/k each; training learns them as task-level weights."""

    def __init__(self, sites, config):
        super().__init__(sites, config)
        init = config.weights if config.weights is not None else [1.0 / self.k] * self.k
        self.weight = torch.nn.Parameter(torch.tensor(init, dtype=torch.float32))

    def router(self, site):
        return lambda x: self.weight

    def static_weights(self) -> torch.Tensor:
        return self.weight.detach()
