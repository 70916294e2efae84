"""Frozen, validated settings. Written into the package manifest with a version stamp."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from deltacomp.errors import DeltacompError
from deltacomp.quant.budget import DEFAULT_SCHEDULE
from deltacomp.quant.packing import SUPPORTED_BITS

CONFIG_VERSION = 1
CALIB_AUTO, CALIB_GENERIC, CALIB_NONE = "auto", "generic", "none"  # --calib's words (deltacomp.calib.generic)

# Token tables and output heads (vocabulary x hidden): word/position embeddings of BERT, Llama's embed_tokens
# (tied or not to lm_head), GPT-2's wte/wpe, T5's shared. Their rows are tokens; see CompressConfig.rows_energy.
EMBEDDING_PATTERN = (r"(^|\.)(word_embeddings|position_embeddings|embed_tokens|embed_positions|wte|wpe|shared|"
                     r"lm_head|embed_out)\.weight$")

# The names a model gives its list of transformer blocks (Llama's layers, BERT's layer, GPT-2's h, blocks)
BLOCK_LIST_NAME = r"(layers?|h|blocks?)"

# Linear layers inside transformer blocks, for Llama/Mistral/Qwen (q/k/v/o, gate/up/down), BERT
# (query/key/value/dense), GPT-2/NeoX/Falcon/Phi fused names and MoE experts.
DEFAULT_INCLUDE = (
    rf"(^|\.){BLOCK_LIST_NAME}\.\d+\.(.*\.)?("
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


def format_schedule(schedule: tuple[tuple[int, int | None], ...]) -> str:
    """The inverse of :func:`parse_schedule`."""
    return ",".join(str(b) if c is None else f"{b}:{c}" for b, c in schedule)


GROUPS = ("selection", "quantization", "calibration", "allocation", "output")
ALLOCATIONS = ("auto", "optimal", "schedule")
VECTOR_RANGES = ("mse", "minmax")
CALIB_USES = ("both", "rounding", "allocation")
TUNE_ON = ("auto", "all", "answers", "balanced")  # the tokens --tune fits
NOISE_WEIGHT = 0.1  # --noise-weight's default
EXCITATION_POWER = 0.0  # --excitation-power's default
EXCITATION_WITHOUT_CALIB = "--excitation-power models the inputs where no calibration measures them"
VOCAB_WEIGHTS = ("auto", "off", "counts", "head")  # how token tables are weighted (deltacomp.calib.frequency)


def setting(default, group: str, help: str | None = None, *, flag: str | None = None, type=None,
            choices: tuple[str, ...] | None = None, metavar: str | None = None, shown=None, parse=None,
            multiple: bool = False, is_flag: bool = False, cli: bool = True):
    """A :class:`CompressConfig` field and, unless ``cli`` is false, its ``deltacomp compress`` option: the default
    lives here once. ``shown`` is the option's default as typed (when it differs from the field's value, e.g. a
    schedule as text); ``parse`` turns the option's value into the field's."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    meta = {"group": group, "cli": cli, "help": help, "flag": flag, "type": type, "choices": choices,
            "metavar": metavar, "shown": shown, "parse": parse, "multiple": multiple, "is_flag": is_flag}
    return field(default=default, metadata=meta)


def _include(values) -> tuple[str, ...]:
    return tuple(values) or DEFAULT_INCLUDE


def _exclude(values) -> tuple[str, ...]:
    return DEFAULT_EXCLUDE + tuple(values)


def _allocation_bits(text):
    return parse_bits(text) if text else None


def _shrink(text):
    """``--calib-shrink``: "auto" (None) or a number; a word that is neither is refused by the config's check."""
    if text is None or text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class Selection:
    """What is compressed: name patterns, the smallest side, vocabulary rows, the form of exact tensors."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]
    min_dim: int
    exact: str
    rows_energy: float

    def __post_init__(self):
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as e:
                raise DeltacompError(f"bad pattern {pattern!r}: {e}") from None
        if not (isinstance(self.rows_energy, (int, float)) and 0 < self.rows_energy <= 1):
            raise DeltacompError(f"--rows-energy must be in (0, 1], got {self.rows_energy!r}")
        if self.exact not in ("full", "fp16-delta"):
            raise DeltacompError(f"--exact must be full or fp16-delta, got {self.exact!r}")


@dataclass(frozen=True)
class Quantization:
    """The method, its budget, and how the factors are found and quantized without calibration."""

    method: str
    bits: float
    vocab_bits: float | None
    vocab_weights: str
    budget: str
    schedule: tuple[tuple[int, int | None], ...]
    group_size: int
    refit: bool | None
    vector_range: str
    svd: str

    def __post_init__(self):
        for option, bits in (("--bits", self.bits), ("--vocab-bits", self.vocab_bits)):
            if bits is None and option == "--vocab-bits":
                continue
            if not _number(bits) or bits <= 0:
                raise DeltacompError(f"{option} must be a positive number of bits per entry, got {bits}")
            if bits > 16:
                raise DeltacompError(f"{option} {bits} is more than fp16 (16 bits per entry); nothing to compress")
        if self.vocab_weights not in VOCAB_WEIGHTS:
            raise DeltacompError(f"--vocab-weights must be one of {', '.join(VOCAB_WEIGHTS)}, "
                                 f"got {self.vocab_weights!r}")
        if self.budget not in ("factors", "all-in"):
            raise DeltacompError(f"--budget must be factors or all-in, got {self.budget!r}")
        if not self.schedule:
            raise DeltacompError("the bit schedule is empty")
        for bits, count in self.schedule:
            if bits not in SUPPORTED_BITS:
                raise DeltacompError(f"schedule bit width {bits} is not supported; choose from {SUPPORTED_BITS}")
            if count is not None and count < 1:
                raise DeltacompError(f"schedule count must be positive, got {bits}:{count}")
        if self.group_size < 0:
            raise DeltacompError(f"--group-size must be >= 0 (0 = one group per vector), got {self.group_size}")
        if self.svd not in ("full", "randomized", "auto"):
            raise DeltacompError(f"--svd must be full, randomized or auto, got {self.svd!r}")
        if self.vector_range not in VECTOR_RANGES:
            raise DeltacompError(f"--range must be mse or minmax, got {self.vector_range!r}")


@dataclass(frozen=True)
class Calibration:
    """Calibration text and GPTQ (:mod:`deltacomp.calib`); ``calib`` None: no calibration."""

    calib: str | None
    calib_field: str
    calib_generic: bool
    calib_samples: int | None
    calib_seqlen: int | None
    gptq_group_size: int
    act_order: bool
    damp: float
    calib_shrink: float | None
    calib_use: str
    sequential: bool
    seq_damp: float
    tune: int
    tune_lr: float
    tune_on: str

    def __post_init__(self):
        for name, value, low in (("--calib-samples", self.calib_samples, 1), ("--calib-seqlen", self.calib_seqlen, 2)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise DeltacompError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.gptq_group_size < 0:
            raise DeltacompError(f"--gptq-group-size must be >= 0 (0 = whole vector), got {self.gptq_group_size}")
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp <= 1):
            raise DeltacompError(f"--damp must be in (0, 1] (a fraction of the mean Hessian diagonal), got {self.damp}")
        if self.calib_shrink is not None and not (_number(self.calib_shrink) and 0 <= self.calib_shrink <= 1):
            raise DeltacompError(f"--calib-shrink must be auto or in [0, 1], got {self.calib_shrink}")
        if self.calib_use not in CALIB_USES:
            raise DeltacompError(f"--calib-use must be one of {', '.join(CALIB_USES)}, got {self.calib_use!r}")
        if not self.calib_field:
            raise DeltacompError("--calib-field must name a JSON field")
        if self.sequential and self.calib is None:
            raise DeltacompError("--sequential follows the compressed model on calibration text: give --calib")
        if not (_number(self.seq_damp) and self.seq_damp > 0):
            raise DeltacompError(f"--seq-damp must be a positive fraction of the mean Hessian diagonal, "
                                 f"got {self.seq_damp}")
        if not isinstance(self.tune, int) or isinstance(self.tune, bool) or self.tune < 0:
            raise DeltacompError(f"--tune must be a whole number of epochs >= 0, got {self.tune!r}")
        if self.tune and self.calib is None:
            raise DeltacompError("--tune fits the compressed model to the fine-tune on calibration text: give --calib")
        if not (_number(self.tune_lr) and 0 < self.tune_lr <= 1):
            raise DeltacompError(f"--tune-lr must be in (0, 1], got {self.tune_lr!r}")
        if self.tune_on not in TUNE_ON:
            raise DeltacompError(f"--tune-on must be one of {', '.join(TUNE_ON)}, got {self.tune_on!r}")


@dataclass(frozen=True)
class Allocation:
    """Bits per singular vector (:mod:`deltacomp.quant.allocate`): the fixed schedule or the optimal choice."""

    allocation: str
    allocation_bits: tuple[tuple[int, int], ...] | None  # None: CompressConfig.widths's default
    noise_weight: float | None
    excitation_power: float | None
    budget_scope: str
    sensitivity: bool

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise DeltacompError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.budget_scope not in ("matrix", "model"):
            raise DeltacompError(f"--budget-scope must be matrix or model, got {self.budget_scope!r}")
        if self.budget_scope == "model" and self.allocation == "schedule":
            raise DeltacompError("--budget-scope model shares one budget across matrices: use --allocation optimal")
        if self.sensitivity and self.budget_scope != "model":
            raise DeltacompError("--sensitivity weighs matrices against each other in a shared budget: give "
                                 "--budget-scope model")
        if self.allocation_bits is not None and not self.allocation_bits:
            raise DeltacompError("the allocation bit set is empty")
        if self.noise_weight is not None and not (_number(self.noise_weight) and 0 < self.noise_weight <= 1):
            raise DeltacompError(f"--noise-weight must be in (0, 1], got {self.noise_weight!r}")
        if self.noise_weight is not None and self.allocation == "schedule":
            raise DeltacompError("--noise-weight weighs what --allocation optimal chooses; the schedule fixes the "
                                 "bits of each vector: give one of the two")
        if self.excitation_power is not None and not (_number(self.excitation_power)
                                                      and 0 <= self.excitation_power <= 8):
            raise DeltacompError(f"--excitation-power must be in [0, 8], got {self.excitation_power!r}")
        if self.excitation_power is not None and self.allocation == "schedule":
            raise DeltacompError("--excitation-power weighs what --allocation optimal chooses; the schedule fixes the "
                                 "bits of each vector: give one of the two")
        for bits in {b for width in self.allocation_bits or () for b in width}:
            if bits not in SUPPORTED_BITS:
                raise DeltacompError(f"allocation bit width {bits} is not supported; choose from {SUPPORTED_BITS}")


@dataclass(frozen=True)
class Output:
    """Where the work runs and how the package's tensors are sharded (not recorded in the manifest)."""

    device: str
    max_shard_bytes: int

    def __post_init__(self):
        check_device(self.device)


@dataclass(frozen=True)
class Groups:
    selection: Selection
    quantization: Quantization
    calibration: Calibration
    allocation: Allocation
    output: Output


GROUP_TYPES = {"selection": Selection, "quantization": Quantization, "calibration": Calibration,
               "allocation": Allocation, "output": Output}


@dataclass(frozen=True)
class CompressConfig:
    """Everything ``deltacomp compress`` is told, flat as the manifest records it and as callers write it.

    Each field belongs to a group, a small frozen config that checks its own settings on construction
    (:attr:`groups`: :class:`Selection`, :class:`Quantization`, :class:`Calibration`, :class:`Allocation`,
    :class:`Output`). The rules of a method are the method's: it refuses the settings it does not use when it is
    chosen for a config (:func:`deltacomp.methods.base.method_for`, the first thing a compression does), so this
    module knows no method."""

    method: str = setting("mixed", "quantization", "Compression method of every compressed matrix.",
                          metavar="[mixed|reference|lowrank|bitdelta|dense]")
    bits: float = setting(1.0, "quantization",
                          "Budget: bits per delta entry of each compressed matrix (1.0 = 1/16 of fp16).")
    # token tables and output heads (EMBEDDING_PATTERN) at a budget of their own; None: --bits
    vocab_bits: float | None = setting(None, "quantization", "Budget of the token tables and output heads "
                                       "(embeddings, lm_head), bits per entry [default: --bits].", type=float)
    vocab_weights: str = setting(
        "auto", "quantization", "Token tables and output heads compressed whole (the fine-tune moved most rows, as "
        "a tied head does): counts chooses their singular vectors for rows weighted by sqrt(token count + 1), counted "
        "on --calib or a built-in English text (a second of tokenizing); head also weighs the output head by its "
        "inputs, the fine-tune's final hidden states on that text (GPTQ; calibration's pass of the fine-tune, else "
        "one of its own); off weighs every row alike; auto: head where the model has a tokenizer, else off, "
        "without a warning. head: lower KL at the same budget on SmolLM2 fine-tunes (BENCHMARKS.md). Not read with "
        "--budget-scope model.",
        choices=VOCAB_WEIGHTS)
    schedule: tuple[tuple[int, int | None], ...] = setting(
        DEFAULT_SCHEDULE, "quantization", "Bit groups in singular-value order, BITS:COUNT; the last may omit COUNT. "
        "Read by --allocation schedule (and the reference method); giving it implies --allocation schedule.",
        shown=format_schedule(DEFAULT_SCHEDULE), parse=parse_schedule)
    group_size: int = setting(0, "quantization",
                              "Quantization group along each singular vector (0 = one group per vector).")
    refit: bool = setting(
        False, "quantization", "Least-squares refit of U and S after quantizing V. Measured by function, it raised "
        "the answers' KL to the fine-tune on every SmolLM2 suite pair at 0.5 bit, with round-to-nearest and under "
        "GPTQ alike (BENCHMARKS.md); it lowers the weight error.", flag="--refit/--no-refit")
    vector_range: str = setting(
        "minmax", "quantization", "Range of each singular vector's round-to-nearest levels: minmax, the vector's "
        "minimum to maximum (never clips its largest coordinates, which the model's outputs depend on); mse, the "
        "clipped range with the least squared error (a lower weight error, a higher model error on every pair "
        "measured; BENCHMARKS.md).", flag="--range", choices=VECTOR_RANGES)
    include: tuple[str, ...] = setting(DEFAULT_INCLUDE, "selection",
                                       "Regex of tensor names to compress (repeatable; replaces the default).",
                                       multiple=True, parse=_include)
    exclude: tuple[str, ...] = setting(DEFAULT_EXCLUDE, "selection",
                                       "Regex of names never compressed (repeatable; adds to the default).",
                                       multiple=True, parse=_exclude)
    min_dim: int = setting(16, "selection", cli=False)  # matrices with a smaller side are stored exactly
    device: str = setting("cpu", "output", "Where the SVD runs.", metavar="[cpu|cuda|cuda:N]")
    max_shard_bytes: int = setting(2 * 1024**3, "output", cli=False)
    # calibration (deltacomp.calib): layer inputs of the fine-tuned model on this text turn RTN into GPTQ
    calib: str | None = setting(
        CALIB_AUTO, "calibration", "Calibration text (plain text, JSON lines, or chat JSON lines): the layers' inputs "
        "on it weigh the bit allocation, and GPTQ rounds instead of round-to-nearest. generic: deltacomp's everyday "
        "English text (821 sentences); none: no calibration (the quickest); auto: generic where the fine-tune can be "
        "run (a tokenizer, a transformers architecture), else none. Measured by function, the everyday text kept "
        "three SmolLM2 fine-tunes and MiniLM closer to the fine-tune than none and than the plain reference at 1 and "
        "0.5 bit, for about 3x the compress time; 128 examples of the fine-tune's own task did better still on two "
        "of them (BENCHMARKS.md).", type="path")
    calib_field: str = setting("text", "calibration", "Text field of JSON-lines calibration data.")
    calib_generic: bool = setting(
        False, "calibration", "With --calib FILE, calibrate on deltacomp's everyday English text too (after the "
        "file's samples). Measured by function with 128 task examples at 0.5 bit: closer to the fine-tune than the "
        "task alone on a numeric SmolLM2 fine-tune (0.12x the reference's answer KL against 0.17x) and on MiniLM, "
        "further on an instruction-following one (0.33x against 0.27x), with a lower KL on everyday text on both "
        "(BENCHMARKS.md): measure it on your pair.", flag="--calib-generic/--no-calib-generic")
    calib_samples: int | None = setting(
        None, "calibration", "Calibration samples [default: the records within 128 x 2048 tokens, at least 128; "
        "with --calib-seqlen, 128 windows].", type=int)
    calib_seqlen: int | None = setting(None, "calibration", "Join the records and cut L-token windows [default: one "
                                       "sample per record].", type=int)
    gptq_group_size: int = setting(128, "calibration",
                                   "Quantization group along each vector under GPTQ (0 = whole vector).")
    act_order: bool = setting(True, "calibration", "GPTQ column order by Hessian.", flag="--act-order/--no-act-order")
    damp: float = setting(0.01, "calibration", "GPTQ damping (fraction of mean diag H).")
    calib_shrink: float | None = setting(
        None, "calibration", "Move each layer's input Hessian towards the identity: (1 - a) H + a mean(diag H) I, "
        "for GPTQ, the allocation and the refit alike (0: as measured; 1: every input direction alike) [default: "
        "auto, a = n / (n + T) for a layer of n inputs and T calibration tokens: a few sentences estimate an n x n "
        "Hessian poorly, so they lean on the uncalibrated weighting, many on what they measured]. Measured by "
        "function: on MiniLM with 32 sentences 0 was worse than no calibration and auto better at every budget; on "
        "two SmolLM2 fine-tunes with 128 examples auto lowered the answer KL by 10% and 1.7x (BENCHMARKS.md).",
        type=str, parse=_shrink, metavar="[auto|A]")
    calib_use: str = setting("both", "calibration", "What the calibration weighs: both (GPTQ rounding and the bit "
                             "allocation), rounding (GPTQ; the allocation as without calibration) or allocation "
                             "(the allocation; round-to-nearest).", choices=CALIB_USES)
    sequential: bool = setting(False, "calibration", "With --calib: fit each matrix on the inputs of the model "
                               "compressed so far (later layers absorb earlier errors). Measure it on your "
                               "pair: it cut the KL 26x on a sort-task fine-tune and raised it 3.8x on another "
                               "(BENCHMARKS.md).",
                               flag="--sequential/--no-sequential")
    seq_damp: float = setting(1.0, "calibration",
                              "--sequential's ridge towards the fine-tune's weight (fraction of mean diag H).")
    tune: int = setting(
        0, "calibration", "Epochs of end-to-end tuning once every matrix is compressed: the whole model runs with "
        "the stored factors and, codes kept, each matrix's singular values, scales and offsets are fitted to the "
        "fine-tune's next-token distributions on the calibration text (an encoder: its last hidden states); the "
        "epoch with the least loss on held-out calibration samples is kept, the package's size does not change. "
        "Needs calibration, the mixed method and memory for the whole model on --device (0: off).", type=int)
    tune_lr: float = setting(1e-3, "calibration", "--tune's learning rate (Adam, on relative changes).")
    tune_on: str = setting(
        "auto", "calibration", "The tokens --tune fits: all (every next token of the calibration text); answers "
        "(a causal LM's answer tokens only: of prompt/answer records and of conversations that end with the "
        "assistant's turn, one sample per record; prompts and plain texts are inputs only); balanced (the answers' "
        "KL and the other tokens', each relative to its value before tuning, count half each); auto: balanced "
        "where a causal LM's calibration records carry answers, all otherwise. Measured with 128 task examples on "
        "four SmolLM2 fine-tunes (GPU): balanced 0.37x, 0.36x, 0.26x, 0.20x the plain reference's answer KL at "
        "0.5 bit (all: 0.57x, 0.21x, 0.25x, 0.21x; answers: 0.50x, 0.36x, 0.28x, 0.21x) and 0.13x, 0.14x, 0.09x, "
        "0.11x at 0.25 bit (all: 0.19x, 0.17x, 0.07x, 0.12x) on json, arith, piglatin, instruct (BENCHMARKS.md).",
        choices=TUNE_ON)
    # bit allocation (deltacomp.quant.allocate)
    # auto: the method's own rule (mixed: optimal; reference: the schedule), so every method accepts the default
    allocation: str = setting(
        "auto", "allocation", "Bits per singular vector. optimal: chosen to minimise the expected error under the "
        "budget (see --noise-weight); on four SmolLM2 fine-tunes closer to the fine-tune than the schedule at 1 and "
        "0.25 bit per entry, level at 0.5 (BENCHMARKS.md), about 1.5x the compress time. schedule: the fixed "
        "--schedule, the fastest (an explicit --schedule implies it). auto: optimal for mixed, the schedule for "
        "reference.", choices=ALLOCATIONS)
    # (U, V) widths the optimal allocation chooses from; None: the default for the calibration (CompressConfig.widths)
    allocation_bits: tuple[tuple[int, int], ...] | None = setting(
        None, "allocation", "Widths --allocation optimal chooses from: B (a vector pair at B bits) or U/V (U's vector "
        "at U bits, V's at V). GPTQ absorbs much of V's error, so with calibration the default is "
        f"{UV_ALLOCATION_BITS}; without (or with --calib-use other than both), {PLAIN_ALLOCATION_BITS}.", type=str,
        parse=_allocation_bits)
    noise_weight: float | None = setting(
        None, "allocation", "--allocation optimal: the weight of a kept vector's rounding error against the error of "
        f"dropping a vector [default: {NOISE_WEIGHT}, calibrated or not]. 1 counts both as weight error; below 1 "
        "keeps more vectors at fewer bits: rounding noise spreads over directions the inputs rarely take, a dropped "
        "vector loses one they take. Measured by function: 0.1 was closest to the fine-tunes on the SmolLM2 suite "
        "at 1, 0.5 and 0.25 bit, and with calibration at 0.5 bit; 0.3-1 on MiniLM (BENCHMARKS.md).", type=float)
    excitation_power: float | None = setting(
        None, "allocation", "--allocation optimal without calibration: take how much the inputs excite singular "
        "direction i as (s_i / s_1)^P and weigh its errors by it [default: 0, every direction alike]. Above 0 the "
        "largest vectors earn more bits and the smallest fewer. Measured by function at 2: closer to the fine-tune "
        "on MiniLM at 1, 0.5 and 0.25 bit (where 0 loses to the plain reference at 1 and 0.5) and on a numeric "
        "SmolLM2 fine-tune, further on instruction-following and pig-latin ones (BENCHMARKS.md): measure it on your "
        "pair. With --calib the measured inputs weigh the allocation instead (it is then refused, unless "
        "--calib-use rounding).", type=float)
    budget_scope: str = setting("matrix", "allocation", "Budget per matrix, or shared by all compressed matrices "
                                "(with --allocation optimal; with --sequential each matrix gets the share the shared "
                                "allocation gave it, and its vectors are chosen on its sequential target).",
                                choices=("matrix", "model"))
    sensitivity: bool = setting(
        False, "allocation", "With --calib and --budget-scope model: weigh each matrix's error by how far its "
        "layer's output moves the model's output on the calibration text (the square root of the mean squared "
        "gradient of the log-likelihood of sampled tokens, or of a random projection for an encoder), so that the "
        "shared budget goes where errors travel. On MiniLM at 0.25 bit it lifted the "
        "held-out cosine from 0.99888 to 0.99903; on two SmolLM2 fine-tunes it lowered the KL on one and raised "
        "it on the other (BENCHMARKS.md): measure it on your pair.",
        flag="--sensitivity/--no-sensitivity")
    svd: str = setting("auto", "quantization", "SVD algorithm (auto: randomized on a GPU when few vectors are kept).",
                       choices=("auto", "full", "randomized"))
    # changed uncompressed tensors (norms, biases): fp16-delta (their delta in fp16 where that rebuilds the
    # fine-tune within fp16's rounding of the delta, else stored whole) | full (as the fine-tune has them)
    exact: str = setting("fp16-delta", "selection", "Changed tensors that are not compressed (norms, biases): their "
                         "delta in fp16 where that rebuilds the fine-tune within fp16's rounding of the delta (else "
                         "whole), or as the fine-tune has them.", choices=("fp16-delta", "full"))
    # a vocabulary matrix (EMBEDDING_PATTERN) keeps only the rows that hold this fraction of its delta's energy
    # (squared norm), compressed at the whole matrix's budget, when they are at most half its rows; 1 = every row
    rows_energy: float = setting(0.999, "selection", "An embedding or lm_head keeps the rows holding this share of "
                                 "its delta's energy (the tokens the fine-tune moved), compressed at the whole "
                                 "matrix's budget (with --budget-scope model: at its share of the shared budget); "
                                 "1 = every row.")
    # what --bits limits: factors (packed U, V) | all-in (also scales, offsets and S)
    budget: str = setting("factors", "quantization", "What --bits limits: the packed factors (the published "
                          "convention, so results compare), or all-in, also each vector's scales, offsets and S "
                          "(mixed only). The package's total bytes, every file counted, are reported either way.",
                          choices=("factors", "all-in"))

    @classmethod
    def group_fields(cls, group: str) -> list[str]:
        """The names of the fields of one group (:data:`GROUPS`)."""
        return [f.name for f in fields(cls) if f.metadata.get("group") == group]

    @classmethod
    def from_options(cls, **options) -> CompressConfig:
        """A config from ``deltacomp compress``'s option values (as :func:`deltacomp.cli.options.config_options`
        declares them): each value goes through its field's ``parse``."""
        kw = {}
        for f in fields(cls):
            if f.name in options:
                parse = f.metadata.get("parse")
                kw[f.name] = parse(options[f.name]) if parse else options[f.name]
        return cls(**kw)

    def __post_init__(self):
        if self.calib == CALIB_NONE:
            object.__setattr__(self, "calib", None)
        if self.schedule != DEFAULT_SCHEDULE:  # a schedule of one's own is the fixed allocation
            if self.allocation == "optimal":
                raise DeltacompError(f"--schedule {format_schedule(self.schedule)} fixes the bits of each singular "
                                     "vector and --allocation optimal chooses them: give one of the two")
            object.__setattr__(self, "allocation", "schedule")
        parts = {g: GROUP_TYPES[g](**{n: getattr(self, n) for n in self.group_fields(g)}) for g in GROUPS}
        object.__setattr__(self, "_groups", Groups(**parts))  # each group checks its own settings
        if self.sensitivity and self.calib is None:
            raise DeltacompError("--sensitivity takes its gradients on calibration text: give --calib")
        if self.excites_alone and self.calib not in (None, CALIB_AUTO):
            raise DeltacompError(f"{EXCITATION_WITHOUT_CALIB}; with --calib the allocation weighs the measured inputs "
                                 "(add --calib-use rounding to keep it)")
        if self.vocab_bits is not None and self.budget_scope == "model":
            raise DeltacompError("--budget-scope model shares one budget across every matrix: leave out --vocab-bits")

    @property
    def excites_alone(self) -> bool:
        """Whether ``--excitation-power`` is given for an allocation that calibration would otherwise weigh."""
        return self.excitation_power is not None and self.calib_use != "rounding"

    @property
    def widths(self) -> tuple[tuple[int, int], ...]:
        """``--allocation-bits``, or its default: :data:`UV_ALLOCATION_BITS` where GPTQ rounds V under the Hessian
        that weighs the allocation (calibration text given or chosen, ``--calib-use both``), else
        :data:`PLAIN_ALLOCATION_BITS` (``--calib auto`` counts as none until a compression settles it)."""
        if self.allocation_bits is not None:
            return self.allocation_bits
        calibrated = self.calib not in (None, CALIB_AUTO) and self.calib_use == "both"
        return parse_bits(UV_ALLOCATION_BITS if calibrated else PLAIN_ALLOCATION_BITS)

    @property
    def groups(self) -> Groups:
        """The settings by group, as small frozen configs: ``config.groups.calibration.damp``."""
        return self._groups

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = [list(g) for g in self.schedule]
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["allocation_bits"] = format_bits(self.widths)
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
        kw.setdefault("allocation", "schedule")  # settings written before the allocation was chosen
        kw.setdefault("vocab_weights", "off")  # written before the token tables were weighted
        if kw["allocation"] != "schedule":  # written before the weights existed: chosen by weight error alone
            kw.setdefault("noise_weight", 1.0)
            kw.setdefault("excitation_power", 0.0)
        kw.setdefault("calib_shrink", 0.0)  # written before the shrink was chosen by the calibration's size
        if kw["allocation"] == "optimal":
            kw.pop("schedule", None)  # not read by an optimal allocation (older packages may record another)
        if "schedule" in kw:
            kw["schedule"] = tuple((int(b), None if c is None else int(c)) for b, c in kw["schedule"])
        if "allocation_bits" in kw:  # "2,3/2,4" (a list of ints in packages written before U/V widths)
            text = kw["allocation_bits"]
            kw["allocation_bits"] = parse_bits(text if isinstance(text, str) else ",".join(map(str, text)))
        for key in ("include", "exclude"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)
