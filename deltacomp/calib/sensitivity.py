"""How far each linear layer's output error travels: a weight per matrix for the model-scope allocation.

The model-scope allocation compares matrices by their output errors ``||(dW - dW_hat) x||^2`` under their own
inputs, as if an error of the same size cost the same wherever it is made. It does not: an error in a query or key
projection passes through a softmax, one in an attention or MLP output lands in the residual stream. For a layer
output ``y`` and the last block's output ``h`` (per token), an error ``dy`` moves ``h`` by ``J dy``; for a random
direction ``r``, ``E (r . J dy)^2 = dy^T E[g g^T] dy`` with ``g = J^T r``, the gradient of ``r . h`` with respect
to ``y``. Taking ``E[g g^T]`` as ``mean(g^2) I`` gives one number per layer: ``mean(g^2)`` over the calibration
tokens and the layer's outputs. :func:`output_sensitivity` returns it per matrix, divided by its mean over the
matrices.

Memory as in :mod:`deltacomp.calib.activations`: one block on the device. A forward pass keeps each block's inputs
(on the CPU, at most :data:`MAX_TOKENS` calibration tokens); then the blocks run again from the last to the first,
one at a time, each taking the gradient at its output and handing on the gradient at its input.
"""

from __future__ import annotations

import logging
import math

import torch

from deltacomp.calib.activations import LayerwiseHessians

log = logging.getLogger(__name__)
MAX_TOKENS = 16384  # calibration tokens the gradients are taken over (whole batches, at least one)


def output_sensitivity(layers: LayerwiseHessians, seed: int = 0) -> dict[str, float]:
    """``{weight name: mean(g^2) / its mean over the names}`` for the wanted linear weights inside the blocks."""
    if not layers.layer_of:
        return {}
    store = _first_batches(layers.block_inputs())
    for p in layers.model.parameters():
        p.requires_grad_(False)
    inputs = []  # inputs[i][j]: block i's input of batch j, on the CPU
    with torch.no_grad():
        for i in range(layers.n_layers):
            inputs.append([hidden.cpu() for hidden, _, _ in store])
            block = layers.load_block(i)
            store = [(_hidden(block(hidden, *args, **kwargs)), args, kwargs) for hidden, args, kwargs in store]
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(hidden.shape, generator=gen).to(hidden.device, hidden.dtype) for hidden, _, _ in store]
    sums: dict[str, float] = {}
    tokens = sum(g[..., 0].numel() for g in grads)
    for i in reversed(range(layers.n_layers)):  # every block: the ones after the last wanted layer carry its error
        block = layers.load_block(i)
        linears = layers.linears(i)
        for j, (_, args, kwargs) in enumerate(store):
            outputs: dict[str, torch.Tensor] = {}
            handles = [m.register_forward_hook(_keep(outputs, name)) for name, m in linears.items()]
            try:
                x = inputs[i][j].to(grads[j].device).requires_grad_(True)
                with torch.enable_grad():
                    out = _hidden(block(x, *args, **kwargs))
                    found = list(outputs.items())
                    got = torch.autograd.grad(out, [x] + [y for _, y in found], grads[j], allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
            grads[j] = got[0].detach() if got[0] is not None else torch.zeros_like(x)
            for (name, _), g in zip(found, got[1:]):
                if g is not None:  # None: the layer's output does not reach the block's output
                    sums[name] = sums.get(name, 0.0) + float(g.float().pow(2).mean(-1).sum())
        inputs[i] = None
    weights = {name: total / tokens for name, total in sums.items()}
    mean = sum(weights.values()) / len(weights) if weights else 0.0
    if not (math.isfinite(mean) and mean > 0):  # no gradient reached any layer, or it overflowed
        log.warning("output sensitivity: no usable gradients (mean %s); the shared budget is not weighted", mean)
        return {}
    return {name: w / mean for name, w in weights.items()}


def _first_batches(store: list) -> list:
    """The first calibration batches holding at most MAX_TOKENS tokens together (at least one batch)."""
    out, total = [], 0
    for item in store:
        n = item[0][..., 0].numel()
        if out and total + n > MAX_TOKENS:
            break
        out.append(item)
        total += n
    return out


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _keep(outputs: dict, name: str):
    def hook(module, inputs, output):
        outputs[name] = output

    return hook
