"""Where gates attach: the model's delta-carrying linear layers, grouped by the transformer block they sit in.

A block is the child of an ``nn.ModuleList`` (a decoder layer of Llama, an encoder layer of BERT) that holds the
layer; a layer outside any such list is its own block. A per-layer gate (LoRA-Flow) reads a block's input hidden
state (before its norm) and mixes every adapted projection of that block with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltacomp.errors import MismatchError
from deltacomp.kernels import DeltaLinear


@dataclass(frozen=True)
class Site:
    path: str  # module path of the DeltaLinear
    layer: DeltaLinear
    block: int  # index into Sites.blocks


class Sites:
    """The DeltaLinear layers of ``model`` in module order, and the blocks they belong to."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        modules = dict(model.named_modules())
        block_paths: list[str] = []
        sites = []
        for path, mod in modules.items():
            if not isinstance(mod, DeltaLinear):
                continue
            block = _block_of(path, modules)
            if block not in block_paths:
                block_paths.append(block)
            sites.append(Site(path, mod, block_paths.index(block)))
        if not sites:
            raise MismatchError("the packages compress none of the model's linear layers; nothing to fuse")
        self.sites: tuple[Site, ...] = tuple(sites)
        self.block_paths = tuple(block_paths)
        self.blocks = tuple(modules[p] for p in block_paths)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        self.block_dims = tuple(modules[p].in_features if isinstance(modules[p], DeltaLinear) else int(hidden)
                                for p in block_paths)
        self.num_deltas = sites[0].layer.bank.num_deltas

    def __iter__(self):
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) the model's input embeddings (no gradient)."""
        with torch.no_grad():
            return self.model.get_input_embeddings()(input_ids)


def _block_of(path: str, modules: dict[str, torch.nn.Module]) -> str:
    """The outermost ancestor of ``path`` whose parent is a ModuleList (``model.layers.3``), else ``path`` itself."""
    parts = path.split(".")
    for i in range(2, len(parts)):
        parent = ".".join(parts[: i - 1]) if i > 1 else ""
        if isinstance(modules.get(parent), torch.nn.ModuleList) and parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return path


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a block is called with: its first positional argument or ``hidden_states``."""
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise TypeError("a gated block was called without a hidden-state tensor")
    return h
