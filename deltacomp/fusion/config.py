"""Frozen, validated settings of a fusion gate and of its training; written into the gate folder's JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from deltacomp.errors import DeltacompError

CONFIG_VERSION = 1
STORED_MODES = ("mix", "base")  # or a delta's index, "0" .. "k-1"


class FusionError(DeltacompError):
    """A fusion setting, gate folder or training set that cannot be used as given."""


def parse_weights(text: str) -> tuple[float, ...]:
    """``"0.7,0.3"`` -> (0.7, 0.3); every entry must be a number (checked further by :class:`FusionConfig`)."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise FusionError(f"bad --weights {text!r}: expected numbers separated by commas, like '0.7,0.3'") from None


def _positive(name: str, value, integer: bool = False, low: float = 0.0, strict: bool = True) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value < low or (strict and value == low):
        kind = "an integer" if integer else "a number"
        raise FusionError(f"{name} must be {kind} {'>' if strict else '>='} {low:g}, got {value!r}")


@dataclass(frozen=True)
class FusionConfig:
    """How the deltas are mixed: the gate and its shape, and the rule for tensors a package stores whole."""

    gate: str = "token"  # static | token | sentence | topk (deltacomp.fusion.gates)
    num_deltas: int = 2
    weights: tuple[float, ...] | None = None  # static: one weight per delta (None: 1/k each)
    allow_negative: bool = False  # static weights below zero (task-arithmetic style negation)
    temperature: float = 1.0  # token, topk: softmax temperature
    top_k: int = 2  # topk: deltas kept per token and module
    top_p: float = 0.6  # sentence: keep the smallest set of deltas whose probability reaches top_p
    hidden: int = 256  # sentence: width of the router's hidden layer
    route_weight: float = 0.0  # topk: weight of the routing cross-entropy towards each example's task
    stored: str = "mix"  # tensors stored whole: mix (gate's static weights, else 1/k) | base | a delta index

    def __post_init__(self):
        from deltacomp.fusion.gates import get_gate

        get_gate(self.gate)  # an unknown name lists the known ones
        _positive("the number of deltas", self.num_deltas, integer=True)
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(self.weights))
            w = self.weights
            if len(w) != self.num_deltas:
                raise FusionError(f"--weights gives {len(w)} weights for {self.num_deltas} deltas; give one per delta")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w):
                raise FusionError(f"--weights must be numbers, got {list(w)}")
            if not all(math.isfinite(x) for x in w):
                raise FusionError(f"--weights must be finite numbers, got {list(w)}")
            if not self.allow_negative and any(x < 0 for x in w):
                raise FusionError(f"--weights must be >= 0 (pass --allow-negative to subtract a delta), got {list(w)}")
            if self.gate != "static":
                raise FusionError(f"--weights sets the static gate's weights; the {self.gate} gate learns its own")
        _positive("--temperature", self.temperature)
        _positive("--top-k", self.top_k, integer=True)
        if self.top_k > self.num_deltas:
            if self.gate == "topk":
                raise FusionError(f"--top-k {self.top_k} is more than the {self.num_deltas} deltas given")
            object.__setattr__(self, "top_k", self.num_deltas)
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise FusionError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        _positive("the router's hidden width", self.hidden, integer=True)
        _positive("--route-weight", self.route_weight, strict=False)
        allowed = (*STORED_MODES, *map(str, range(self.num_deltas)))
        if str(self.stored) not in allowed:
            raise FusionError(f"--stored must be one of {', '.join(allowed)} (a number is a delta's index), "
                              f"got {self.stored!r}")
        object.__setattr__(self, "stored", str(self.stored))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights"] = None if self.weights is None else list(self.weights)
        return {"config_version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> FusionConfig:
        if not isinstance(d, dict):
            raise FusionError(f"a fusion config must be a JSON object, got {type(d).__name__}")
        if d.get("config_version", CONFIG_VERSION) != CONFIG_VERSION:
            raise FusionError(f"fusion config version {d.get('config_version')!r}; this deltacomp reads "
                              f"{CONFIG_VERSION}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"config_version"})
        if unknown:
            raise FusionError(f"unknown fusion config keys {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class TrainConfig:
    """Gate training: only the gate's parameters change (AdamW, cosine schedule with a linear warm-up)."""

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 4
    warmup: float = 0.2  # fraction of the steps
    weight_decay: float = 0.0
    holdout: float = 0.1  # fraction of the examples kept out of training and scored at the end
    min_examples: int = 4
    max_length: int = 512
    aux_weight: float = 1.0  # sentence: weight of the router's classification loss
    seed: int = 0

    def __post_init__(self):
        _positive("--epochs", self.epochs, integer=True)
        _positive("--lr", self.lr)
        _positive("--batch-size", self.batch_size, integer=True)
        if not (isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 1):
            raise FusionError(f"--warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise FusionError(f"--holdout must be a fraction in [0, 1), got {self.holdout!r}")
        _positive("weight decay", self.weight_decay, strict=False)
        _positive("the minimum number of examples", self.min_examples, integer=True)
        _positive("--max-length", self.max_length, integer=True, low=1)
        _positive("the auxiliary loss weight", self.aux_weight, strict=False)

    def to_dict(self) -> dict:
        return {"config_version": CONFIG_VERSION, **asdict(self)}
