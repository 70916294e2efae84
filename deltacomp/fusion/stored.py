"""Tensors a package stores whole (norms, biases), and compressed ones no linear layer holds (an embedding table,
a row-sparse vocabulary head): the documented rule of a fusion.

Compressed linear layers are mixed per token through ``delta_linear``; the other tensors have no factors to gate,
so they are set once, as a fixed mixture of the deltas' values (:class:`FusionConfig` ``stored``; a compressed
one's delta is rebuilt from its factors):

* ``mix`` (default): ``base + sum_i c_i (t_i - base)`` with c the gate's static weights (the static gate's,
  learned or given), or 1/k each for the dynamic gates (token, sentence, topk). A delta that leaves the tensor
  unchanged contributes 0. Static weights (1, 0) thus give exactly the first package's values.
* ``base``: the base's values (the deltas' whole-stored changes are dropped).
* ``i`` (a delta's index): delta i's values.

A package that adds, removes or resizes a tensor (a new vocabulary) cannot be fused over the base's shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltacomp.errors import MismatchError
from deltacomp.kernels.linear import packable
from deltacomp.package.manifest import FP16_DELTA
from deltacomp.package.reader import reconstruct_delta
from deltacomp.package.store import DeltaPackage
from deltacomp.quality.weights import WeightSlots


class StoredTensors:
    """The whole-stored tensors of k packages over the model's base values; ``set(c)`` writes a mixture."""

    def __init__(self, model: torch.nn.Module, packages: Sequence[DeltaPackage]):
        slots = WeightSlots(model)
        self.k = len(packages)
        self.slots: dict[str, torch.Tensor] = {}
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, list[torch.Tensor | None]] = {}
        for i, pkg in enumerate(packages):
            for name, rec in pkg.modules.items():
                if rec["action"] in ("added", "removed", "resized"):
                    raise MismatchError(f"{pkg.path}: {name} is {rec['action']} (the package changes the "
                                        f"model's shapes); only deltas over the base's shapes can be fused")
                compressed = rec["action"] == "compress"
                if not (rec["action"] == "exact" or compressed and not packable(model, packages, name)):
                    continue
                t = reconstruct_delta(pkg, name) if compressed else pkg.tensor(name)
                slot = slots.slot(name, t.shape, pkg.path)
                if slot is None:
                    raise MismatchError(f"{name}: stored by {pkg.path} but not a tensor of the model")
                if name not in self.slots:
                    self.slots[name] = slot
                    self.base[name] = slot.detach().float().clone()
                    self.deltas[name] = [None] * self.k
                is_delta = compressed or rec.get("encoding") == FP16_DELTA
                d = t.float() if is_delta else t.float() - self.base[name].cpu()
                self.deltas[name][i] = d.to(slot.device)

    def __len__(self) -> int:
        return len(self.slots)

    @torch.no_grad()
    def set(self, coeffs: Sequence[float] | torch.Tensor | None) -> None:
        """Write ``base + sum_i coeffs[i] * delta_i`` into every slot (None: the base values)."""
        c = None if coeffs is None else [float(x) for x in coeffs]
        for name, slot in self.slots.items():
            value = self.base[name].clone()
            for ci, d in zip(c or [], self.deltas[name]):
                if d is not None and ci != 0.0:
                    value += ci * d
            slot.copy_(value.to(slot.dtype))


def stored_coeffs(rule: str, k: int, static: torch.Tensor | None) -> list[float] | None:
    """The rule's coefficients over the k deltas (None: the base values); see the module docstring."""
    if rule == "base":
        return None
    if rule == "mix":
        return [float(x) for x in static] if static is not None else [1.0 / k] * k
    return [1.0 if i == int(rule) else 0.0 for i in range(k)]
