"""Frozen, validated settings. Written into the package manifest with a version stamp."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from deltacomp.errors import DeltacompError
from deltacomp.quant.budget import DEFAULT_SCHEDULE
from deltacomp.quant.packing import SUPPORTED_BITS

CONFIG_VERSION = 1

# Linear layers inside transformer blocks, for Llama/Mistral/Qwen (q/k/v/o, gate/up/down), BERT
# (query/key/value/dense), GPT-2/NeoX/Falcon/Phi fused names and MoE experts.
DEFAULT_INCLUDE = (
    r"(^|\.)(layers?|h|blocks?)\.\d+\.(.*\.)?("
    r"q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj|"
    r"query|key|value|dense|query_key_value|dense_h_to_4h|dense_4h_to_h|"
    r"c_attn|c_proj|c_fc|fc1|fc2|out_proj|w1|w2|w3|wq|wk|wv|wo|Wqkv"
    r")\.weight$",
)
DEFAULT_EXCLUDE = (r"embed", r"lm_head", r"norm", r"LayerNorm", r"router|\.gate\.weight$")


def parse_schedule(text: str) -> tuple[tuple[int, int | None], ...]:
    """``"8:2,3:32,2"`` -> ((8, 2), (3, 32), (2, None)); a group without a count takes what is left."""
    out: list[tuple[int, int | None]] = []
    try:
        for part in text.split(","):
            bits, _, count = part.strip().partition(":")
            out.append((int(bits), int(count) if count else None))
    except ValueError:
        raise DeltacompError(f"bad schedule {text!r}: expected BITS:COUNT,... like '8:2,3:32,2'") from None
    return tuple(out)


@dataclass(frozen=True)
class CompressConfig:
    method: str = "mixed"
    bits: float = 1.0  # budget: bits per delta entry of each compressed matrix (1.0 = 1/16 of fp16)
    schedule: tuple[tuple[int, int | None], ...] = DEFAULT_SCHEDULE
    group_size: int = 0  # quantization group along each singular vector; 0 = one group per vector
    refit: bool = True  # least-squares refit of U and S after quantizing V (no calibration needed)
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    min_dim: int = 16  # matrices with a smaller side are stored exactly
    device: str = "cpu"
    max_shard_bytes: int = 2 * 1024**3
    extra: dict = field(default_factory=dict)  # method-specific settings added by later stages

    def __post_init__(self):
        if not isinstance(self.bits, (int, float)) or not math.isfinite(self.bits) or self.bits <= 0:
            raise DeltacompError(f"--bits must be a positive number of bits per entry, got {self.bits}")
        if self.bits > 16:
            raise DeltacompError(f"--bits {self.bits} is more than fp16 (16 bits per entry); nothing to compress")
        if not self.schedule:
            raise DeltacompError("the bit schedule is empty")
        for bits, count in self.schedule:
            if bits not in SUPPORTED_BITS:
                raise DeltacompError(f"schedule bit width {bits} is not supported; choose from {SUPPORTED_BITS}")
            if count is not None and count < 1:
                raise DeltacompError(f"schedule count must be positive, got {bits}:{count}")
        if self.group_size < 0:
            raise DeltacompError(f"--group-size must be >= 0 (0 = one group per vector), got {self.group_size}")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as e:
                raise DeltacompError(f"bad pattern {pattern!r}: {e}") from None
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise DeltacompError(f"--device must be cpu or cuda[:N], got {self.device!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = [list(g) for g in self.schedule]
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d.pop("device")
        d.pop("max_shard_bytes")
        return {"config_version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> CompressConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "schedule" in kw:
            kw["schedule"] = tuple((int(b), None if c is None else int(c)) for b, c in kw["schedule"])
        for key in ("include", "exclude"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)
