"""Sibling layers that read one input (q|k|v, gate|up), run as one call of the op over one bank.

A decoder layer calls q_proj, k_proj and v_proj one after the other on the same hidden state. Wrapped one by one,
each is a call of the op of its own; over a bank of all three projections the first call computes every sibling's
output (base product and deltas) and the next two take their slice of it. Siblings are found by name, within
one parent module (:data:`SIBLINGS`), and share the call only while they would compute the same thing: each
sibling is called with the very tensor the first was (the same object, not modified since) and all of them mix
the deltas the same way (the same router, weights, indices or chosen delta: a per-module router, as MeteoRA's
top-k, makes each run alone). Otherwise a sibling runs alone over its projection of the bank
(:meth:`DeltaBank.projection`, the same words), which gives the same result.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

# Leaf names of layers that read one input, per architecture family: Llama / Mistral / Qwen / Gemma attention and
# MLP, BERT-style self-attention, Mixtral-style experts. Names within one parent module only.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))


def sibling_sets(paths: Sequence[str]) -> list[list[str]]:
    """The sets of two or more module ``paths`` that :data:`SIBLINGS` names under one parent, in their order."""
    by_parent: dict[str, dict[str, str]] = {}
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = path
    found = []
    for leaves in by_parent.values():
        for names in SIBLINGS:
            members = [leaves[n] for n in names if n in leaves]
            if len(members) > 1:
                found.append(members)
    return found


class PerInput:
    """A value made once per input tensor for ``n`` consumers (slots): made again when the input is another tensor,
    was changed in place since, or a slot asks twice; let go once every slot has taken it. An inference tensor
    (made under ``torch.inference_mode``) keeps no version counter: for it, only the tensor's identity is checked."""

    def __init__(self, n: int):
        self.n = n
        self._x: torch.Tensor | None = None
        self._value = None
        self._version = -1
        self._taken: set[int] = set()

    def get(self, x: torch.Tensor, slot: int, make: Callable[[], T]) -> T:
        version = -1 if x.is_inference() else x._version
        if self._x is not x or self._version != version or slot in self._taken:
            self._value = make()
            self._x, self._version, self._taken = x, version, set()
        self._taken.add(slot)
        value = self._value
        if len(self._taken) == self.n:
            self._x = self._value = None  # every slot has it: hold no tensor past the call
        return value


class SharedInput:
    """The :class:`~deltacomp.kernels.DeltaLinear` layers over one bank, ``members[p]`` its projection p."""

    def __init__(self, members: Sequence[torch.nn.Module]):
        self.members = tuple(members)
        for m in self.members:
            m.bank.projection(m.slot)  # each sibling's bank alone, made now rather than at its first lone call
        self.bounds = [0, *itertools.accumulate(m.out_features for m in self.members)]
        self.outputs = PerInput(len(self.members))

    def joined(self, layer: torch.nn.Module) -> bool:
        """Whether ``layer`` mixes the deltas as each of its siblings does (the shared call then serves them all).
        Not while torch.compile traces: there each layer runs alone, a graph without the shared call's state."""
        if torch.compiler.is_compiling():
            return False
        return all(m.router is layer.router and m.weights is layer.weights and m.index is layer.index
                   and m.only == layer.only for m in self.members)

    def output(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output for input ``x``: its slice of the shared call, made by the first sibling called with
        this ``x`` (:class:`PerInput`)."""
        p = layer.slot
        out = self.outputs.get(x, p, lambda: layer.mix(x, layer.bank, [m.base_layer for m in self.members]))
        return out[..., self.bounds[p]:self.bounds[p + 1]]
