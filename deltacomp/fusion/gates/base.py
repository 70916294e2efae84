"""The gate registry: each gate is one file that registers a :class:`Gate` under its name.

A gate decides, for every adapted linear layer, the weights over the k deltas that ``delta_linear`` mixes:
it sets each :class:`~deltacomp.kernels.DeltaLinear`'s ``router`` (x (..., n) -> w (..., k)) and may hook the
model's blocks. Its parameters are the only ones trained; base and deltas stay frozen.
"""

from __future__ import annotations

import torch

from deltacomp.fusion.sites import Sites
from deltacomp.registry import Registry


class Gate(torch.nn.Module):
    """Base class: ``attach`` wires the routers, ``detach`` removes them; ``begin`` sees each new prompt."""

    name: str = ""
    needs_task = False  # whether ``aux_loss`` wants each training example's task (delta index)
    per_module = False  # whether each layer has its own router; else the layers of a block share one (and the
    # sibling layers that read one input run as one call of the op: deltacomp.kernels.shared)

    def __init__(self, sites: Sites, config):
        super().__init__()
        self.config = config
        self.k = sites.num_deltas
        self._sites = (sites,)  # a tuple: not registered as a submodule (the model is not part of the gate)
        self._handles: list = []

    @property
    def sites(self) -> Sites:
        return self._sites[0]

    def router(self, site) -> object:
        """The callable x (..., n) -> weights (..., k) or (k,) for one site (for every site of its block, unless
        :attr:`per_module`)."""
        raise NotImplementedError

    def hooks(self) -> list:
        """Forward hooks the gate needs on the model (handles, removed by :meth:`detach`)."""
        return []

    def attach(self) -> None:
        routers: dict = {}
        for site in self.sites:
            key = id(site) if self.per_module else site.block
            if key not in routers:
                routers[key] = self.router(site)
            site.layer.router = routers[key]
        self._handles = self.hooks()

    def detach(self) -> None:
        for site in self.sites:
            site.layer.router = None
        for h in self._handles:
            h.remove()
        self._handles = []

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """A new batch of sequences starts: ``input_ids``/``attention_mask`` (B, T) mark the prompt tokens."""

    def aux_loss(self, task: torch.Tensor | None) -> torch.Tensor | None:
        """An extra training loss after a forward pass (``task`` (B,): each example's delta), or None."""
        return None

    def static_weights(self) -> torch.Tensor | None:
        """(k,) weights fixed for every token, when the gate has them (the stored-tensor mixture uses them)."""
        return None


GATES = Registry("gate")
register = GATES.register  # class decorator: make a gate available under a name
get_gate = GATES.lookup
