"""Input Hessians ``H = X^T X / N`` of linear layers, collected layer by layer with forward hooks.

Which model: the **fine-tuned** one. The compressed delta is applied inside the fine-tuned model; at inference
the delta of a layer sees (approximately) the fine-tune's inputs to that layer, so its output error
``||(dW - dW_hat) x||`` is weighted by the fine-tune's activations (Delta-CoMe calibrates the same way).

Memory stays bounded for large models; at no time is more than one transformer block on the device:

1. A skeleton of the model is built with **one** block (embeddings, rotary tables, the first block), and the
   fine-tune's non-block weights are loaded into it.
2. The calibration samples run through the embeddings; the inputs of block 0 (and the keyword arguments the
   model passes to its blocks: masks, position embeddings) are caught and kept on the device:
   ``samples x seqlen x hidden`` values (128 x 512 x 4096 bf16 = 0.5 GB for a 7B model).
3. For block i: the fine-tune's weights of block i are loaded into the one block, hooks on its linear layers
   accumulate ``X^T X`` (float32) over all samples, and the outputs become the inputs of block i + 1. The
   Hessians of block i (n x n per distinct input: 3 x 4096^2 + 11008^2 floats = 0.7 GB for a Llama-2-7B
   block; q/k/v and gate/up share one) are handed to the caller and dropped before block i + 1.

Limits: the one block object is reused for every layer, so models whose blocks differ by type (alternating
sliding-window attention) are calibrated with the first block's type. Only ``nn.Linear`` layers are hooked.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from deltacomp.config import BLOCK_LIST_NAME
from deltacomp.errors import CheckpointError, DeltacompError
from deltacomp.io.checkpoint import Checkpoint

log = logging.getLogger(__name__)
BLOCK_LIST = re.compile(rf"(^|\.){BLOCK_LIST_NAME}$")


class _Caught(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: keeps its inputs and stops the forward pass."""

    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.store.append((hidden, rest, kwargs))
        raise _Caught


def block_output(out) -> torch.Tensor:
    """A block's output hidden states (blocks return them alone or first in a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_through(block: nn.Module, store: list) -> bool:
    """Each stored batch ``(hidden, args, kwargs)`` through ``block``, in place: its hidden states become the
    block's outputs. Returns whether the block hands them on in a tuple."""
    as_tuple = False
    for j, (hidden, args, kwargs) in enumerate(store):
        out = block(hidden, *args, **kwargs)
        as_tuple = isinstance(out, (tuple, list))
        store[j] = (block_output(out), args, kwargs)
    return as_tuple


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module list of transformer blocks (the longest ``layers``/``layer``/``h``/``blocks`` list)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and BLOCK_LIST.search(name)]
    if not found:
        raise DeltacompError(f"{type(model).__name__}: no list of transformer blocks found; cannot calibrate")
    return max(found, key=lambda nm: len(nm[1]))


def build_skeleton(ckpt: Checkpoint, device: str, dtype: torch.dtype, whole: bool = False):
    """The model of ``ckpt``'s config with one block, its non-block weights loaded; with ``whole``, every block
    and every weight (a weight the checkpoint lacks must be tied to one it has). Returns (model, prefix of the
    blocks in the model, their prefix in the checkpoint, number of blocks, {checkpoint name: model name} of the
    weights loaded)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(ckpt.path)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        raise DeltacompError(f"{ckpt.path}: config.json names no transformers architecture ({archs}); cannot calibrate")
    n_layers = config.num_hidden_layers
    if not whole:
        config.num_hidden_layers = 1
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:1]
    config.use_cache = False
    with torch.device(device):
        model = cls._from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    prefix, _ = find_blocks(model)
    ckpt_prefix = _checkpoint_prefix(ckpt, prefix, getattr(model, "base_model_prefix", ""))
    targets, names = {}, {}
    for name, t in model.state_dict().items():
        if name.startswith(prefix + ".") and not whole:
            continue
        key = ckpt_prefix + name[len(prefix):] if name.startswith(prefix) else _map_name(ckpt, name, model)
        if key is not None and key in ckpt:
            targets[key] = t
            names[key] = name
    _fill(targets, ckpt)
    if whole:
        loaded = set(names.values())
        untied = [n for n, _ in model.named_parameters() if n not in loaded]  # a tied weight is named once
        if untied:
            raise CheckpointError(f"{ckpt.path}: no weight for {', '.join(untied[:3])}"
                                  f"{' ...' if len(untied) > 3 else ''} of the model its config.json describes")
    return model, prefix, ckpt_prefix, n_layers, names


def _map_name(ckpt: Checkpoint, name: str, model) -> str | None:
    base = getattr(model, "base_model_prefix", "")
    for cand in (name, name.removeprefix(base + "."), f"{base}.{name}"):
        if cand in ckpt:
            return cand
    return None


def _checkpoint_prefix(ckpt: Checkpoint, prefix: str, base: str) -> str:
    """The blocks' prefix as the checkpoint spells it (with or without the base model prefix)."""
    for cand in (prefix, prefix.removeprefix(base + "."), f"{base}.{prefix}"):
        if any(k.startswith(cand + ".0.") for k in ckpt.keys()):
            return cand
    raise CheckpointError(f"{ckpt.path}: no tensors under {prefix}.0.*; the weights do not match the config")


def _load_block(block: nn.Module, ckpt: Checkpoint, ckpt_prefix: str, i: int) -> None:
    targets = {f"{ckpt_prefix}.{i}.{local}": t for local, t in block.state_dict().items()}
    if missing := next((key for key in targets if key not in ckpt), None):
        raise CheckpointError(f"{ckpt.path}: {missing} is missing")
    _fill(targets, ckpt)


def _fill(targets: dict[str, torch.Tensor], ckpt: Checkpoint) -> None:
    """Each model tensor of ``targets`` (by checkpoint name) overwritten in place by the checkpoint's tensor, read
    a few at a time (:meth:`Checkpoint.read_many`): a model is loaded tensor by tensor, never beside a second copy
    of its weights."""
    for key, src in ckpt.read_many(targets):
        t = targets[key]
        if tuple(src.shape) != tuple(t.shape):
            raise CheckpointError(f"{ckpt.path}: {key} has shape {list(src.shape)}; the model its config.json "
                                  f"describes has {list(t.shape)}")
        with torch.no_grad():
            t.copy_(src)


class _HessianHooks:
    """Forward hooks accumulating ``X^T X`` (float32) for chosen linear layers; one Hessian per distinct input."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.share: dict[str, str] = {}  # follower -> leader (same input tensor as the leader)
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._first = True
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if self._first:
                key = (x.data_ptr(), tuple(x.shape), x.stride())
                if key in self._seen:  # the tensor is held in _seen, so its address cannot be reused meanwhile
                    self.share[name] = self._seen[key][0]
                    return
                self._seen[key] = (name, x)
            elif name in self.share:
                return
            x2 = x.reshape(-1, x.shape[-1]).float()  # (tokens, n)
            if name not in self.sums:
                self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
                self.tokens[name] = 0
            self.sums[name].addmm_(x2.T, x2)
            self.tokens[name] += x2.shape[0]

        return hook

    def end_batch(self):
        self._first = False
        self._seen.clear()

    def result(self) -> dict[str, torch.Tensor]:
        out = {name: h.div_(self.tokens[name]) for name, h in self.sums.items()}
        for follower, leader in self.share.items():
            out[follower] = out[leader]
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def _batches(samples: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    """Samples of equal length stacked into (B, L) batches of at most ``max_tokens`` tokens."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for s in samples:
        by_len.setdefault(len(s), []).append(s)
    out = []
    for length, group in by_len.items():
        per = max(1, max_tokens // length)
        out += [torch.stack(group[i:i + per]) for i in range(0, len(group), per)]
    return out


class LayerwiseHessians:
    """Iterate ``(block index, {weight name: H (n, n) float32 on device})`` block after block.

    ``wanted`` are checkpoint names of linear weights (``...q_proj.weight``); H is the mean of ``x x^T`` over
    the calibration tokens of that layer's input. Blocks after the last wanted one are not run. ``layer_of``
    maps each wanted name inside the blocks to its block; other names are never yielded (the caller quantizes
    them without calibration).
    """

    def __init__(self, model_dir: str | Path | Checkpoint, samples: list[torch.Tensor], wanted: set[str],
                 device: str = "cpu", dtype: torch.dtype = torch.float32, max_tokens: int = 16384):
        self.ckpt = model_dir if isinstance(model_dir, Checkpoint) else Checkpoint(model_dir)
        self.samples, self.device, self.dtype, self.max_tokens = samples, device, dtype, max_tokens
        self.model, self.prefix, self.ckpt_prefix, self.n_layers, _ = build_skeleton(self.ckpt, device, dtype)
        self._walk: tuple[list, int] | None = None  # the walk of __iter__: its store and the blocks run on it
        pattern = re.compile(rf"^{re.escape(self.ckpt_prefix)}\.(\d+)\.(.+)\.weight$")
        self.layer_of: dict[str, int] = {}
        self.local: dict[str, str] = {}
        for name in wanted:
            m = pattern.match(name)
            if m and int(m.group(1)) < self.n_layers:
                self.layer_of[name], self.local[name] = int(m.group(1)), m.group(2)

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        if not self.layer_of:
            return
        store = self.block_inputs()
        self._walk = (store, 0)
        with torch.no_grad():
            for i in range(max(self.layer_of.values()) + 1):
                yield from self._run_block(i, store)

    @property
    def block(self) -> nn.Module:
        """The one block object, loaded with each block's weights in turn."""
        return self.model.get_submodule(self.prefix)[0]

    def load_block(self, i: int) -> nn.Module:
        """The one block object with block ``i``'s weights."""
        _load_block(self.block, self.ckpt, self.ckpt_prefix, i)
        return self.block

    def linears(self, i: int) -> dict[str, nn.Linear]:
        """The wanted linear layers of block ``i`` (in the one block object), by checkpoint name."""
        out = {}
        for name, layer in self.layer_of.items():
            if layer != i:
                continue
            mod = self.block.get_submodule(self.local[name])
            if isinstance(mod, nn.Linear):
                out[name] = mod
            else:
                log.warning("%s is not an nn.Linear of block %d; it is quantized without calibration", name, i)
        return out

    def batches(self) -> list[torch.Tensor]:
        """The calibration batches (B, L) in the order every pass runs them."""
        return _batches(self.samples, self.max_tokens)

    @torch.no_grad()
    def last_outputs(self) -> list[torch.Tensor]:
        """The last block's outputs (B, L, d) per batch of :meth:`batches`, no layer hooked: the walk of
        :meth:`__iter__` taken on from the block it reached (it ends there: its iterator must not be resumed), or
        every block run from the first."""
        store, start = self._walk or (self.block_inputs(), 0)
        self._walk = None
        for i in range(start, self.n_layers):
            run_through(self.load_block(i), store)
        return [hidden for hidden, _, _ in store]

    @torch.no_grad()
    def block_inputs(self) -> list:
        """Inputs of block 0 per calibration batch: ``[(hidden, args, kwargs), ...]`` on the device."""
        blocks = self.model.get_submodule(self.prefix)
        block = blocks[0]
        store: list = []
        blocks[0] = _Catcher(store)
        try:
            for batch in self.batches():
                try:
                    self.model(input_ids=batch.to(self.device), use_cache=False)
                except _Caught:
                    pass
        finally:
            blocks[0] = block
        return store

    def _run_block(self, i: int, store: list):
        block = self.load_block(i)
        hooks = _HessianHooks(self.linears(i))
        try:
            for j, (hidden, args, kwargs) in enumerate(store):
                out = block(hidden, *args, **kwargs)
                hooks.end_batch()
                store[j] = (block_output(out), args, kwargs)
            if self._walk is not None and self._walk[0] is store:
                self._walk = (store, i + 1)
        finally:
            hooks.remove()
        result = hooks.result()
        del hooks
        if result:
            yield i, result
