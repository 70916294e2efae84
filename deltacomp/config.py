"""Frozen, validated settings. Written into the package manifest with a version stamp."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from deltacomp.errors import DeltacompError
from deltacomp.quant.budget import DEFAULT_SCHEDULE
from deltacomp.quant.packing import SUPPORTED_BITS

CONFIG_VERSION = 1

# Token tables and output heads (vocabulary x hidden): word/position embeddings of BERT, Llama's embed_tokens
# (tied or not to lm_head), GPT-2's wte/wpe, T5's shared. Their rows are tokens; see CompressConfig.rows_energy.
EMBEDDING_PATTERN = (r"(^|\.)(word_embeddings|position_embeddings|embed_tokens|embed_positions|wte|wpe|shared|"
                     r"lm_head|embed_out)\.weight$")

# Linear layers inside transformer blocks, for Llama/Mistral/Qwen (q/k/v/o, gate/up/down), BERT
# (query/key/value/dense), GPT-2/NeoX/Falcon/Phi fused names and MoE experts.
DEFAULT_INCLUDE = (
    r"(^|\.)(layers?|h|blocks?)\.\d+\.(.*\.)?("
    r"q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj|"
    r"query|key|value|dense|query_key_value|dense_h_to_4h|dense_4h_to_h|"
    r"c_attn|c_proj|c_fc|fc1|fc2|out_proj|w1|w2|w3|wq|wk|wv|wo|Wqkv"
    r")\.weight$",
    EMBEDDING_PATTERN,
)
DEFAULT_EXCLUDE = (r"norm", r"LayerNorm", r"router|\.gate\.weight$")
# packages written before embeddings were compressed by default excluded these too
LEGACY_EXCLUDE = (r"embed", r"lm_head", *DEFAULT_EXCLUDE)


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


def parse_bits(text: str) -> tuple[tuple[int, int], ...]:
    """Allocation widths: ``"2,3,4,8"`` -> ((2, 2), (3, 3), (4, 4), (8, 8)); ``"U/V"`` gives U's vector U bits
    and V's vector V bits: ``"2/1,3/2"`` -> ((2, 1), (3, 2)). Sorted by total width, duplicates dropped."""
    out = set()
    try:
        for part in text.split(","):
            if part.strip():
                u, _, v = part.strip().partition("/")
                out.add((int(u), int(v) if v else int(u)))
    except ValueError:
        raise DeltacompError(f"bad bit set {text!r}: expected widths like '2,3,4,8' or U/V pairs like '3/2'") from None
    return tuple(sorted(out, key=lambda w: (w[0] + w[1], w)))


def format_bits(widths: tuple[tuple[int, int], ...]) -> str:
    """The inverse of :func:`parse_bits`."""
    return ",".join(str(u) if u == v else f"{u}/{v}" for u, v in widths)


# Default widths of --allocation optimal. With calibration, GPTQ absorbs much of V's error and none of U's, so V
# may take fewer bits (measured: 2.6x lower task KL on the SmolLM2 pair at 1 and 0.5 bit, BENCHMARKS.md).
PLAIN_ALLOCATION_BITS = "2,3,4,8"
UV_ALLOCATION_BITS = "2/1,3/1,4/1,2,3/2,4/2,3,4/3,8/4,4,8"


def check_device(device: str) -> None:
    """Refuse a device that is not ``cpu`` or ``cuda[:N]``, or a CUDA device this machine does not have."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise DeltacompError(f"--device must be cpu or cuda[:N], got {device!r}")
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise DeltacompError(f"--device {device} was asked for but no CUDA GPU is available")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise DeltacompError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


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
    # calibration (deltacomp.calib): layer inputs of the fine-tuned model on this text turn RTN into GPTQ
    calib: str | None = None  # plain text, JSON lines with a text field, or chat JSON lines ("messages")
    calib_field: str = "text"  # the text field of JSON lines
    calib_samples: int | None = None  # None: every record / window, at most 128
    calib_seqlen: int | None = None  # None: one sample per record; L: records joined and cut into L-token windows
    gptq_group_size: int = 128  # quantization group along each singular vector under GPTQ (0 = whole vector)
    act_order: bool = True  # GPTQ visits columns in order of decreasing Hessian diagonal
    damp: float = 0.01  # GPTQ damping, a fraction of the mean Hessian diagonal
    sequential: bool = False  # fit each matrix on the compressed model's inputs (deltacomp.calib.sequential)
    seq_damp: float = 1.0  # its ridge towards the fine-tune's weight, a fraction of the mean Hessian diagonal
    # bit allocation (deltacomp.quant.allocate)
    allocation: str = "schedule"  # schedule: the fixed groups above | optimal: bits per vector minimising error
    # (U, V) widths the optimal allocation chooses from; None: UV_ALLOCATION_BITS with calib, else 2,3,4,8
    allocation_bits: tuple[tuple[int, int], ...] | None = None
    budget_scope: str = "matrix"  # matrix: each matrix within its budget | model: the total of all of them
    svd: str = "auto"  # full | randomized | auto (randomized on a GPU when the rank kept is small)
    # changed uncompressed tensors (norms, biases): fp16-delta (their delta in fp16 where that rebuilds the
    # fine-tune within fp16's rounding of the delta, else stored whole) | full (as the fine-tune has them)
    exact: str = "fp16-delta"
    # a vocabulary matrix (EMBEDDING_PATTERN) keeps only the rows that hold this fraction of its delta's energy
    # (squared norm), compressed at the whole matrix's budget, when they are at most half its rows; 1 = every row
    rows_energy: float = 0.999
    budget: str = "factors"  # what --bits limits: factors (packed U, V) | all-in (also scales, offsets and S)

    def __post_init__(self):
        if self.allocation_bits is None:
            default = UV_ALLOCATION_BITS if self.calib else PLAIN_ALLOCATION_BITS
            object.__setattr__(self, "allocation_bits", parse_bits(default))
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
        self._check_calibration()
        self._check_allocation()

    def _check_calibration(self):
        for name, value, low in (("--calib-samples", self.calib_samples, 1), ("--calib-seqlen", self.calib_seqlen, 2)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise DeltacompError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.gptq_group_size < 0:
            raise DeltacompError(f"--gptq-group-size must be >= 0 (0 = whole vector), got {self.gptq_group_size}")
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp <= 1):
            raise DeltacompError(f"--damp must be in (0, 1] (a fraction of the mean Hessian diagonal), got {self.damp}")
        if not self.calib_field:
            raise DeltacompError("--calib-field must name a JSON field")
        if self.calib is not None and self.method != "mixed":
            raise DeltacompError(f"--calib is used by the mixed method only, not by {self.method!r}")
        if self.sequential and self.calib is None:
            raise DeltacompError("--sequential follows the compressed model on calibration text: give --calib")
        if self.sequential and self.budget_scope == "model":
            raise DeltacompError("--sequential compresses matrices one after another; it cannot share a "
                                 "--budget-scope model allocation, which is fixed before any is compressed")
        if not (isinstance(self.seq_damp, (int, float)) and math.isfinite(self.seq_damp) and self.seq_damp > 0):
            raise DeltacompError(f"--seq-damp must be a positive fraction of the mean Hessian diagonal, "
                                 f"got {self.seq_damp}")

    def _check_allocation(self):
        if self.allocation not in ("schedule", "optimal"):
            raise DeltacompError(f"--allocation must be schedule or optimal, got {self.allocation!r}")
        if self.budget_scope not in ("matrix", "model"):
            raise DeltacompError(f"--budget-scope must be matrix or model, got {self.budget_scope!r}")
        if self.budget_scope == "model" and self.allocation != "optimal":
            raise DeltacompError("--budget-scope model shares one budget across matrices: use --allocation optimal")
        if self.budget_scope == "model" and self.method != "mixed":
            raise DeltacompError(f"--budget-scope model is for the mixed method only, not {self.method!r}")
        if not self.allocation_bits:
            raise DeltacompError("the allocation bit set is empty")
        for bits in {b for width in self.allocation_bits for b in width}:
            if bits not in SUPPORTED_BITS:
                raise DeltacompError(f"allocation bit width {bits} is not supported; choose from {SUPPORTED_BITS}")
        if self.svd not in ("full", "randomized", "auto"):
            raise DeltacompError(f"--svd must be full, randomized or auto, got {self.svd!r}")
        if not (isinstance(self.rows_energy, (int, float)) and 0 < self.rows_energy <= 1):
            raise DeltacompError(f"--rows-energy must be in (0, 1], got {self.rows_energy!r}")
        if self.budget not in ("factors", "all-in"):
            raise DeltacompError(f"--budget must be factors or all-in, got {self.budget!r}")
        if self.budget == "all-in" and self.method != "mixed":
            raise DeltacompError(f"--budget all-in is for the mixed method only, not {self.method!r}")
        if self.exact not in ("full", "fp16-delta"):
            raise DeltacompError(f"--exact must be full or fp16-delta, got {self.exact!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = [list(g) for g in self.schedule]
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["allocation_bits"] = format_bits(self.allocation_bits)
        d.pop("device")
        d.pop("max_shard_bytes")
        return {"config_version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> CompressConfig:
        """Settings as a manifest records them; malformed ones (an untrusted package's) raise DeltacompError."""
        try:
            return cls._from_dict(d)
        except (TypeError, ValueError, AttributeError) as e:
            raise DeltacompError(f"settings: malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_dict(cls, d: dict) -> CompressConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "schedule" in kw:
            kw["schedule"] = tuple((int(b), None if c is None else int(c)) for b, c in kw["schedule"])
        if "allocation_bits" in kw:  # "2,3/2,4" (a list of ints in packages written before U/V widths)
            text = kw["allocation_bits"]
            kw["allocation_bits"] = parse_bits(text if isinstance(text, str) else ",".join(map(str, text)))
        for key in ("include", "exclude"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)
