"""The method registry: each compression method is one file that registers a :class:`Method`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from deltacomp.calib.context import MatrixContext
from deltacomp.config import CALIB_AUTO, CompressConfig
from deltacomp.errors import DeltacompError
from deltacomp.registry import Registry


@dataclass
class Compressed:
    """One matrix's compressed form: named tensors (stored in the package) and JSON-able facts."""

    tensors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)
    factor_bits: int = 0  # bits of packed factor payload (what the budget limits)
    total_bits: int = 0  # all-in: factors plus scales, offsets, S


# Settings only some methods read: the values every method accepts (the first is the neutral one, the default), and
# the refusal when a method that does not read the setting is given another value. ``allocation`` "auto" leaves the
# choice to the method (:attr:`Method.auto`); "schedule" stays accepted everywhere (reference follows the schedule,
# and packages of every method record it).
METHOD_SETTINGS = {
    "calib": ((None, CALIB_AUTO), "--calib is used by the {users} method only, not by {me!r}"),
    "budget_scope": (("matrix",), "--budget-scope model is for the {users} method only, not {me!r}"),
    "budget": (("factors",), "--budget all-in is for the {users} method only, not {me!r}"),
    "allocation": (("auto", "schedule"), "--allocation optimal is for the {users} method only, not {me!r}"),
    "vector_range": (("minmax",), "--range mse is for the {users} method only, not {me!r}"),
    "noise_weight": ((None,), "--noise-weight is for the {users} method only, not {me!r}"),
    "excitation_power": ((None,), "--excitation-power is for the {users} method only, not {me!r}"),
    "vocab_weights": (("auto", "off"), "--vocab-weights counts|head is for the {users} method only, not {me!r}"),
    "tune": ((0,), "--tune is for the {users} method only, not {me!r}"),
}


class Method:
    """A compression method: ``compress`` a float32 (m, n) delta; ``reconstruct`` it from the stored form."""

    name: str = ""
    exact_factors: bool = False  # True when ``factors`` returns the stored delta exactly (a low-rank method)

    # the settings of METHOD_SETTINGS that this method reads; any other given a value not accepted by all is refused
    uses: frozenset[str] = frozenset()
    # what a setting left to the method ("auto") becomes: :meth:`resolve`
    auto: dict[str, str] = {"allocation": "schedule"}

    def check_config(self, config: CompressConfig) -> None:
        """Refuse settings this method does not use (a DeltacompError naming the setting and the method)."""
        for key, (accepted, message) in METHOD_SETTINGS.items():
            if getattr(config, key) not in accepted and key not in self.uses:
                users = " and ".join(sorted(n for n, cls in METHODS.items() if key in cls.uses)) or "no"
                raise DeltacompError(message.format(users=users, me=self.name))

    def neutral_settings(self) -> dict:
        """The settings this method does not read, at their neutral values (a baseline of another method's
        package takes these)."""
        return {key: accepted[0] for key, (accepted, _) in METHOD_SETTINGS.items() if key not in self.uses}

    def resolve(self, config: CompressConfig) -> CompressConfig:
        """``config`` with each setting left to the method ("auto") set to this method's choice, as the manifest
        records it; a method that does not calibrate takes ``--calib auto`` as none (a calibrating one's is settled
        by the compression, which knows the checkpoints: :func:`deltacomp.calib.generic.settle`)."""
        chosen = {key: value for key, value in self.auto.items() if getattr(config, key) == "auto"}
        if config.calib == CALIB_AUTO and "calib" not in self.uses:
            chosen["calib"] = None
        return dataclasses.replace(config, **chosen) if chosen else config

    def weighs_token_tables(self, config: CompressConfig) -> bool:
        """Whether the token tables are compressed under ``--vocab-weights`` (their rows weighted by token counts,
        the head by its inputs): a method that reads it, a per-matrix budget."""
        return config.vocab_weights != "off" and config.budget_scope == "matrix" and "vocab_weights" in self.uses

    def check_budget(self, shape: tuple[int, int], config: CompressConfig) -> None:
        """Raise BudgetError if the budget cannot cover a matrix of ``shape``; default: any budget works."""

    def compress(self, delta: torch.Tensor, config: CompressConfig,
                 context: MatrixContext | None = None) -> Compressed:
        """Compress one float32 (m, n) delta; ``context`` holds what calibration gives (see MatrixContext)."""
        raise NotImplementedError

    def reconstruct(self, tensors: dict[str, torch.Tensor], info: dict, shape: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def layout(self, info: dict, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        """The tensors a package stores for one ``shape`` (m, n) module with this ``info``: local name ->
        (shape, allowed dtypes). Checks ``info`` first: a ValueError whose message starts with the key at fault.
        A method that returns None declares nothing, and its stored tensors are not checked against the manifest.
        """
        return None

    def factors(self, tensors: dict[str, torch.Tensor], info: dict, shape: tuple[int, int],
                max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 LoRA factors ``B (m, r), A (r, n)`` with ``B @ A ~= reconstruct(...)``.

        Low-rank methods override this with their stored factors (``exact_factors = True``; ``max_rank`` is
        then left to the caller). The default, for full-rank methods, is the truncated SVD of the
        reconstruction at rank ``max_rank``, with sqrt(S) on each side.
        """
        from deltacomp.lowrank.lora import balance
        from deltacomp.lowrank.svd import svd

        delta = self.reconstruct(tensors, info, shape)
        u, s, v = svd(delta, max_rank, "cpu", "full")  # (m, r), (r,), (n, r)
        return balance(u, s, v)


def info_int(info, key: str, lo: int, hi: int | None = None, where: str = "") -> int:
    """``info[key]`` as an int in [lo, hi]; a ValueError naming ``where + key`` otherwise."""
    if not isinstance(info, dict):
        raise ValueError(f"{where.rstrip('.') or 'info'}: must be an object, got {type(info).__name__}")
    v = info.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}{key}: must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{where}{key}: {v} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
    return v


METHODS = Registry("method")
register = METHODS.register  # class decorator: make a method available under a name


def stored_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def get_method(name: str) -> Method:
    import deltacomp.methods  # noqa: F401  (fills the registry)

    return METHODS.lookup(name)()


def method_for(config: CompressConfig) -> Method:
    """The method ``config`` names, once it has checked the settings (an unknown name lists the known methods;
    a setting the method does not use is refused, :meth:`Method.check_config`)."""
    method = get_method(config.method)
    method.check_config(config)
    return method
