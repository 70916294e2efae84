"""Run packed delta factors directly: the dequant-matmul op, its delta banks, and linear layers that use them.

``delta_linear(x, bank, y, weights=..., index=...)`` is the one dispatch point (``base_delta_linear`` adds the base
layer's product in the same kernels); ``DeltaBank.build`` lays out
packed modules (:func:`deltacomp.package.reader.packed_module`) for it; ``attach`` wraps a transformers
model's linear layers with a package's deltas.
"""

from deltacomp.kernels import ops as _ops  # noqa: F401  (registers deltacomp::delta_linear and delta_linear_base)
from deltacomp.kernels.bank import DeltaBank
from deltacomp.kernels.dispatch import base_delta_linear, delta_linear
from deltacomp.kernels.linear import DeltaLinear, attach, detach
from deltacomp.native import status

__all__ = ["DeltaBank", "DeltaLinear", "attach", "base_delta_linear", "delta_linear", "detach", "status"]
