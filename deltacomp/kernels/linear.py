"""Linear layers that add packed deltas to their base output, and attaching them to a transformers model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from deltacomp.errors import MismatchError
from deltacomp.kernels.bank import DeltaBank
from deltacomp.kernels.dispatch import base_delta_linear, delta_linear
from deltacomp.kernels.shared import SharedInput, sibling_sets
from deltacomp.package.manifest import FP16_DELTA
from deltacomp.package.reader import compressed_names, packed_module, reconstruct_delta
from deltacomp.package.store import DeltaPackage

log = logging.getLogger(__name__)


class DeltaLinear(torch.nn.Module):
    """``base_layer(x) + sum_d w_d dW_d x`` with the deltas' packed factors (wraps the base as PEFT's LoRA does).

    The weights over the bank's deltas come from ``router(x)`` when set (a gate, (..., k)), else ``weights``
    ((k,) or None for all ones); ``index`` (per-row delta, multi-tenant: a tensor, or a function of x giving one or
    None) overrides both when it gives one, and ``only`` (a delta index: weight 1 on it, 0 on the others, for every
    row) overrides all three, running that delta's rank rows as a bank of one delta (:meth:`DeltaBank.alone`).

    A layer whose siblings read the same input (q|k|v, gate|up: :mod:`deltacomp.kernels.shared`) holds the bank of
    all of them and its ``slot`` in it; ``siblings`` runs them as one call where it can.
    """

    def __init__(self, base_layer: torch.nn.Module, bank: DeltaBank, weights: torch.Tensor | None = None,
                 slot: int | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.bank = bank
        self.slot = slot  # this layer's projection of a bank shared with its siblings; None: the whole bank
        self.siblings: SharedInput | None = None
        self.weights = weights
        self.router: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.index: torch.Tensor | Callable[[torch.Tensor], torch.Tensor | None] | None = None
        self.only: int | None = None

    @property
    def in_features(self) -> int:
        return self.bank.in_features

    @property
    def out_features(self) -> int:
        return sum(self.bank.out_features) if self.slot is None else self.bank.out_features[self.slot]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.siblings is not None and self.siblings.joined(self):
            return self.siblings.output(self, x)
        return self.mix(x, self.bank if self.slot is None else self.bank.projection(self.slot), [self.base_layer])

    def mix(self, x: torch.Tensor, bank: DeltaBank, layers: Sequence[torch.nn.Module]) -> torch.Tensor:
        """The base ``layers`` (the bank's projections, in order) on x, plus the deltas of ``bank`` mixed by this
        layer's router, weights, index or chosen delta, outputs side by side."""
        index = self.index(x) if callable(self.index) else self.index
        if self.only is not None:
            bank, w = bank.alone(self.only), None
        elif index is not None:
            return delta_linear(x, bank, _side_by_side([layer(x) for layer in layers]), index=index)
        else:
            w = self.router(x) if self.router is not None else self.weights
        if all(type(layer) is torch.nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)
               for layer in layers):
            # plain linear layers: their products can run in the delta's fused op (base_delta_linear decides)
            return base_delta_linear(x, bank, [layer.weight for layer in layers], _biases(layers), weights=w)
        return delta_linear(x, bank, _side_by_side([layer(x) for layer in layers]), weights=w)


def _side_by_side(outputs: list[torch.Tensor]) -> torch.Tensor:
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def _biases(layers: Sequence[torch.nn.Linear]) -> torch.Tensor | None:
    """The layers' biases side by side (zeros for a layer without one), None when none has one. Read at each call:
    a fusion runtime may set a stored bias in place."""
    if all(layer.bias is None for layer in layers):
        return None
    return _side_by_side([layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                          for layer in layers])


def _resolve(model: torch.nn.Module, name: str) -> str | None:
    """The model's module path of a checkpoint weight name (``x.weight`` -> ``x``), tolerating a model prefix."""
    if not name.endswith(".weight"):
        return None
    path = name[: -len(".weight")]
    prefix = getattr(model, "base_model_prefix", "") or ""
    head, _, rest = path.partition(".")
    for cand in (path, f"{prefix}.{path}" if prefix else path, rest if head == prefix else path):
        try:
            model.get_submodule(cand)
            return cand
        except AttributeError:
            continue
    return None


def _set_module(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def check_same_base(packages: Sequence[DeltaPackage]) -> None:
    """Every package must have been made from the same base weights (fingerprint in the manifest)."""
    want = packages[0].manifest["base"]["fingerprint"]
    for p in packages[1:]:
        if p.manifest["base"]["fingerprint"] != want:
            raise MismatchError(f"{p.path} was made from another base than {packages[0].path} "
                                f"(base fingerprints differ); deltas can only be combined over one base")


def _target(slots, name: str, shape: tuple, pkg: DeltaPackage) -> torch.Tensor | None:
    """The model's tensor for checkpoint name ``name`` (None, with a warning, when it has none), shape-checked."""
    slot = slots.slot(name, shape, pkg.path)
    if slot is None:
        log.warning("%s: changed by %s but not a tensor of the model; skipped", name, pkg.path)
    return slot


@torch.no_grad()
def merge_dense(model: torch.nn.Module, pkg: DeltaPackage, names: Sequence[str]) -> int:
    """Add the rebuilt deltas of ``pkg``'s compressed modules ``names`` to ``model``'s weights (which hold the base):
    the path of a compressed embedding, or a row-sparse lm_head, which no packed linear layer carries."""
    from deltacomp.quality.weights import WeightSlots

    slots = WeightSlots(model)
    done = 0
    for name in names:
        delta = reconstruct_delta(pkg, name)
        slot = _target(slots, name, delta.shape, pkg)
        if slot is not None:
            slot.copy_(slot.float() + delta.to(slot.device))
            done += 1
    return done


def packable(model: torch.nn.Module, pkgs: Sequence[DeltaPackage], name: str, path: str | None = None) -> bool:
    """Whether a packed linear layer carries ``name``'s deltas: a linear layer's weight, row-sparse in no package.

    ``path``: the model's module path of ``name`` when the caller has resolved it already."""
    path = _resolve(model, name) if path is None else path
    if path is None or not hasattr(model.get_submodule(path), "in_features"):  # nn.Linear, bnb, DeltaLinear
        return False
    return not any(name in p.modules and "rows" in p.modules[name] for p in pkgs)


@torch.no_grad()
def load_stored(model: torch.nn.Module, pkg: DeltaPackage) -> int:
    """Copy the tensors ``pkg`` stores whole into ``model`` (which holds the base); fp16 deltas are added."""
    from deltacomp.quality.weights import WeightSlots

    slots = WeightSlots(model)
    done = 0
    for name, rec in pkg.modules.items():
        if rec["action"] not in ("exact", "resized"):
            continue
        t = pkg.tensor(name)
        slot = _target(slots, name, t.shape, pkg)
        if slot is not None:
            slot.copy_((slot.float() + t.float()) if rec.get("encoding") == FP16_DELTA else t)
            done += 1
    return done


def attach(model: torch.nn.Module, packages: Sequence[DeltaPackage | str], weights: torch.Tensor | None = None,
           stored_from: int | None = 0, dense_from: int | None = 0,
           share_inputs: bool = True) -> dict[str, DeltaLinear]:
    """Wrap every linear layer that the packages compress with a :class:`DeltaLinear` over all their deltas.

    ``model`` holds the base weights; ``weights`` (k,) mixes the deltas (None: each at weight 1). Tensors the
    packages store whole (norms, biases) are taken from package ``stored_from`` (None: keep the base's).
    A compressed module no linear layer holds (an embedding table) or stored row-sparse (a vocabulary head) is
    not wrapped: package ``dense_from``'s rebuilt delta is added to the model's weight (None: keep the base's),
    as a stored tensor is. ``share_inputs``: sibling layers that read one input (q|k|v, gate|up) share a bank and
    run as one call where they can (:mod:`deltacomp.kernels.shared`). Returns the wrapped layers by module path;
    :func:`detach` undoes the wrapping (not the weights loaded or merged).
    """
    pkgs = [p if isinstance(p, DeltaPackage) else DeltaPackage(p) for p in packages]
    check_same_base(pkgs)
    every = sorted({n for p in pkgs for n in compressed_names(p)})
    paths = {n: _resolve(model, n) for n in every}
    missing = [n for n, path in paths.items() if path is None]
    if missing:
        raise MismatchError(f"{missing[0]}: a package changes this weight but the model has no such layer")
    names = [n for n in every if packable(model, pkgs, n, paths[n])]
    dense = sorted(set(every) - set(names))
    if dense:
        log.info("not wrapped (no linear layer, or row-sparse): %s", ", ".join(dense))
    device = next(model.parameters()).device
    if weights is not None:  # on the model's device once, not copied at every call (nor inside a CUDA graph capture)
        weights = torch.as_tensor(weights, dtype=torch.float32).to(device)
    layers = {paths[n]: model.get_submodule(paths[n]) for n in names}
    for path, layer in layers.items():
        if isinstance(layer, DeltaLinear):
            raise MismatchError(f"{path} already carries deltas; detach them first")
    sets = [s for s in sibling_sets(list(layers)) if len({layers[p].in_features for p in s}) == 1] if share_inputs \
        else []
    grouped = {p for s in sets for p in s}
    by_path = {paths[n]: n for n in names}
    wrapped = {}
    for members in [*sets, *([p] for p in layers if p not in grouped)]:
        table = [[packed_module(pkg, by_path[p]) if by_path[p] in pkg.modules
                  and pkg.modules[by_path[p]]["action"] == "compress" else None for pkg in pkgs] for p in members]
        bank = DeltaBank.build(table).to(device)
        for slot, path in enumerate(members):
            layer, out = layers[path], bank.out_features[slot]
            want = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
            if want != (out, bank.in_features):
                raise MismatchError(f"{by_path[path]}: the deltas are {out}x{bank.in_features}; the model's layer "
                                    f"is {want[0]}x{want[1]}")
            wrapped[path] = DeltaLinear(layer, bank, weights, slot if len(members) > 1 else None)
        if len(members) > 1:
            shared = SharedInput([wrapped[p] for p in members])
            for p in members:
                wrapped[p].siblings = shared
    wrapped = {path: wrapped[path] for path in layers}
    for path, layer in wrapped.items():
        _set_module(model, path, layer)
    if stored_from is not None:
        load_stored(model, pkgs[stored_from])
    if dense_from is not None:
        own = set(compressed_names(pkgs[dense_from]))
        merge_dense(model, pkgs[dense_from], [n for n in dense if n in own])
    return wrapped


def detach(model: torch.nn.Module) -> int:
    """Put every :class:`DeltaLinear`'s base layer back; returns how many were removed."""
    paths = [path for path, mod in model.named_modules() if isinstance(mod, DeltaLinear)]
    for path in paths:
        _set_module(model, path, model.get_submodule(path).base_layer)
    return len(paths)
