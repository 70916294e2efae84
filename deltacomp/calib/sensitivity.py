"""How far each linear layer's output error travels: a weight per matrix for the model-scope allocation.

The model-scope allocation compares matrices by their output errors ``||(dW - dW_hat) x||^2`` under their own
inputs, as if an error of the same size cost the same wherever it is made. It does not: an error in a query or key
projection passes through a softmax, one in an attention or MLP output lands in the residual stream. For a layer
output ``y``, an error ``dy`` changes an objective ``f`` of the model's output by about ``g . dy`` with ``g`` the
gradient of ``f`` with respect to ``y``; ``E[(g . dy)^2] = dy^T E[g g^T] dy``. Taking ``E[g g^T]`` as
``mean(g^2) I`` gives one number per layer: ``mean(g^2)`` over the calibration tokens and the layer's outputs.
:func:`output_sensitivity` returns it per matrix, divided by its mean over the matrices.

The objective: where the model has a head (a causal LM), ``-log p(y)`` of a next token ``y`` drawn from the
model's own distribution, so that ``E[g g^T]`` is the Fisher, the curvature of the KL to the fine-tune; otherwise
(an encoder) ``r . h`` for the last block's output ``h`` and a random direction ``r``.

Memory as in :mod:`deltacomp.calib.activations`: one block on the device. A forward pass keeps each block's inputs
(on the CPU, at most :data:`MAX_TOKENS` calibration tokens); then the blocks run again from the last to the first,
one at a time, each taking the gradient at its output and handing on the gradient at its input.
"""

from __future__ import annotations

import logging
import math

import torch

from deltacomp.calib.activations import LayerwiseHessians, block_output, run_through

log = logging.getLogger(__name__)
# Calibration tokens the gradients are taken over (whole batches, at least one). With a head, the logits of these
# tokens are held in fp32 with their gradient and a copy of their probabilities (8192 tokens x 32,000 words: 3 GB).
MAX_TOKENS = 8192


def output_sensitivity(layers: LayerwiseHessians, seed: int = 0) -> dict[str, float]:
    """``{weight name: mean(g^2) / its mean over the names}`` for the wanted linear weights inside the blocks."""
    if not layers.layer_of:
        return {}
    store = _first_batches(layers.block_inputs())
    for p in layers.model.parameters():
        p.requires_grad_(False)
    inputs = []  # inputs[i][j]: block i's input of batch j, on the CPU
    as_tuple = False  # how the blocks hand on their output
    with torch.no_grad():
        for i in range(layers.n_layers):
            inputs.append([hidden.cpu() for hidden, _, _ in store])
            as_tuple = run_through(layers.load_block(i), store)
    gen = torch.Generator().manual_seed(seed)
    batches = layers.batches()[:len(store)]
    grads = [_seed(layers, hidden, batch, as_tuple, gen) for (hidden, _, _), batch in zip(store, batches)]
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
                    out = block_output(block(x, *args, **kwargs))
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


def _seed(layers: LayerwiseHessians, hidden: torch.Tensor, batch: torch.Tensor, as_tuple: bool,
          gen: torch.Generator) -> torch.Tensor:
    """The gradient at the last block's output ``hidden`` of one batch. Where the model has a head (its output has
    logits): of ``-log p(y)`` summed over the tokens, ``y`` drawn from the model's own next-token distribution (so
    that ``E[g g^T]`` is the Fisher, the curvature of the KL to the fine-tune). Otherwise: a random direction."""
    blocks = layers.model.get_submodule(layers.prefix)
    block = blocks[0]
    h = hidden.detach().requires_grad_(True)
    blocks[0] = _Inject((h,) if as_tuple else h)
    try:
        with torch.enable_grad():
            logits = getattr(layers.model(input_ids=batch.to(h.device), use_cache=False), "logits", None)
            if logits is None:
                return torch.randn(hidden.shape, generator=gen).to(hidden.device, hidden.dtype)
            logits = logits.float().reshape(-1, logits.shape[-1])
            probs = torch.softmax(logits.detach(), -1).cpu()
            y = torch.multinomial(probs, 1, generator=gen)[:, 0].to(logits.device)
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            return torch.autograd.grad(loss, h)[0].detach()
    finally:
        blocks[0] = block


class _Inject(torch.nn.Module):
    """Stands in for block 0 of the one-block model: hands on a given output whatever its input."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


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


def _keep(outputs: dict, name: str):
    def hook(module, inputs, output):
        outputs[name] = output

    return hook
