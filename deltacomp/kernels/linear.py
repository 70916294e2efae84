"""Linear layers that add packed deltas to their base output, and attaching them to a transformers model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from deltacomp.errors import MismatchError
from deltacomp.kernels.bank import DeltaBank
from deltacomp.kernels.dispatch import base_delta_linear, delta_linear
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
    """

    def __init__(self, base_layer: torch.nn.Module, bank: DeltaBank, weights: torch.Tensor | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.bank = bank
        self.weights = weights
        self.router: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.index: torch.Tensor | Callable[[torch.Tensor], torch.Tensor | None] | None = None
        self.only: int | None = None

    @property
    def in_features(self) -> int:
        return self.bank.in_features

    @property
    def out_features(self) -> int:
        return sum(self.bank.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.bank
        index = self.index(x) if callable(self.index) else self.index
        if self.only is not None:
            bank, w = bank.alone(self.only), None
        elif index is not None:
            return delta_linear(x, bank, self.base_layer(x), index=index)
        else:
            w = self.router(x) if self.router is not None else self.weights
        layer = self.base_layer
        if type(layer) is torch.nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks):
            # a plain linear layer: its product can run in the delta's fused op (base_delta_linear decides)
            return base_delta_linear(x, bank, [layer.weight], layer.bias, weights=w)
        return delta_linear(x, bank, layer(x), weights=w)


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
           stored_from: int | None = 0, dense_from: int | None = 0) -> dict[str, DeltaLinear]:
    """Wrap every linear layer that the packages compress with a :class:`DeltaLinear` over all their deltas.

    ``model`` holds the base weights; ``weights`` (k,) mixes the deltas (None: each at weight 1). Tensors the
    packages store whole (norms, biases) are taken from package ``stored_from`` (None: keep the base's).
    A compressed module no linear layer holds (an embedding table) or stored row-sparse (a vocabulary head) is
    not wrapped: package ``dense_from``'s rebuilt delta is added to the model's weight (None: keep the base's),
    as a stored tensor is. Returns the wrapped layers by module path; :func:`detach` undoes the wrapping (not
    the weights loaded or merged).
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
    wrapped = {}
    for name in names:
        path = paths[name]
        layer = model.get_submodule(path)
        if isinstance(layer, DeltaLinear):
            raise MismatchError(f"{path} already carries deltas; detach them first")
        table = [[packed_module(p, name) if name in p.modules and p.modules[name]["action"] == "compress" else None
                  for p in pkgs]]
        bank = DeltaBank.build(table)
        want = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
        if want != (sum(bank.out_features), bank.in_features):
            raise MismatchError(f"{name}: the deltas are {sum(bank.out_features)}x{bank.in_features}; the model's "
                                f"layer is {want[0]}x{want[1]}")
        wrapped[path] = DeltaLinear(layer, bank.to(device), weights)
        _set_module(model, path, wrapped[path])
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
