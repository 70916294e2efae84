"""The output head's input moment ``H = E[h h^T]`` (d, d): what a (tied) output head sees, for its compression.

The head maps the final hidden state h to logits, so the logit error of its compressed delta is ``h . (dE_v -
dE_hat_v)`` and the expected squared error of a row is weighted by H, as a linear layer's is by its input moment
(:mod:`deltacomp.calib.activations`). A causal LM's final hidden states are far from isotropic (on SmolLM2-135M one
direction holds 70% of H's trace), so the mixed method, given H, chooses and quantizes (GPTQ) the head's singular
vectors where its inputs point. The fine-tune runs on the text block after block in the one-block skeleton of
:class:`deltacomp.calib.activations.LayerwiseHessians`; the final norm and the head then run once per batch on the
last block's outputs, and a hook on the head's input accumulates H (the logits are never computed). Under
``--calib`` (not ``--sequential``) the walk is the calibration's own: the head comes after every block's matrices
and takes the walk on from its last block (:func:`walk_moment`), so the fine-tune runs through the text once.
"""

from __future__ import annotations

import torch
from torch import nn

from deltacomp.calib.activations import LayerwiseHessians
from deltacomp.io.checkpoint import Checkpoint


class _Caught(Exception):
    pass


class _Replay(nn.Module):
    """Stands in for the one block: returns the last block's stored output of each batch in turn."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, *args, **kwargs):
        return next(self.outputs)


def head_moment(ckpt: Checkpoint, samples: list[torch.Tensor], device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """``E[h h^T]`` (d, d) float32 of the output head's inputs over ``samples`` (1-D token-id tensors) in the model
    of ``ckpt``; None when the model has no output head (an encoder)."""
    return walk_moment(LayerwiseHessians(ckpt, samples, set(), device, dtype))


@torch.no_grad()
def walk_moment(layers: LayerwiseHessians) -> torch.Tensor | None:
    """:func:`head_moment` of the model and samples of ``layers``, its walk taken on from the block it reached
    (:meth:`LayerwiseHessians.last_outputs`): the calibration's own walk, or one not yet begun."""
    model = layers.model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    outputs = layers.last_outputs()  # (B, L, d) per batch
    total, count = None, 0

    def catch(_module, inputs):
        nonlocal total, count
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (tokens, d)
        total = x.T @ x if total is None else total.addmm_(x.T, x)
        count += x.shape[0]
        raise _Caught  # the logits are not needed

    blocks = model.get_submodule(layers.prefix)
    block, blocks[0] = blocks[0], _Replay(outputs)
    handle = head.register_forward_pre_hook(catch)
    try:
        for batch in layers.batches():
            try:
                model(input_ids=batch.to(layers.device), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
        blocks[0] = block
    return total / count if count else None
