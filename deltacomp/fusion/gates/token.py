"""LoRA-Flow's token gate: per block and per token, ``w = softmax(W_g h / T) + b`` from the block's input.

``h`` (..., d) is the hidden state the block is called with (before its norm); ``W_g`` (k, d) has no bias and
``b`` (k,) is added after the softmax, so the weights need not sum to 1. The same k weights mix every adapted
projection of the block. ``W_g`` starts at zero and ``b`` at zero: training starts from the plain average 1/k.
"""

from __future__ import annotations

import torch

from deltacomp.fusion.gates.base import Gate, register
from deltacomp.fusion.sites import block_input


def token_weights(h: torch.Tensor, proj: torch.Tensor, bias: torch.Tensor, temperature: float) -> torch.Tensor:
    """h (..., d), proj (k, d), bias (k,) -> (..., k) float32."""
    return torch.softmax((h.float() @ proj.T) / temperature, dim=-1) + bias


@register("token")
class TokenGate(Gate):
    def __init__(self, sites, config):
        super().__init__(sites, config)
        self.proj = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(self.k, d)) for d in sites.block_dims)
        self.bias = torch.nn.Parameter(torch.zeros(len(sites.block_dims), self.k))
        self._w: list[torch.Tensor | None] = [None] * len(sites.block_dims)

    def _weights(self, i: int) -> torch.Tensor:
        w = self._w[i]
        if w is None:
            raise RuntimeError(f"block {self.sites.block_paths[i]} ran no gate before its layers")
        return w

    def router(self, site):
        return lambda x, i=site.block: self._weights(i)

    def hooks(self) -> list:
        def make(i):
            def hook(module, args, kwargs):
                self._w[i] = token_weights(block_input(args, kwargs), self.proj[i], self.bias[i],
                                           self.config.temperature)  # (B, T, k)

            return hook

        return [block.register_forward_pre_hook(make(i), with_kwargs=True) for i, block in enumerate(self.sites.blocks)]

    def detach(self) -> None:
        super().detach()
        self._w = [None] * len(self._w)
