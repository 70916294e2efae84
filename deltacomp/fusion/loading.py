"""Load the base model a fusion runs on: full precision, or quantized with bitsandbytes (4-bit NF4 or 8-bit)."""

from __future__ import annotations

import logging

import torch

from deltacomp.config import check_device
from deltacomp.fusion.config import FusionError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.quality.weights import model_kind

log = logging.getLogger(__name__)
QUANTIZE = (None, "4bit", "8bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantization_config(quantize: str | None, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``4bit`` (NF4) or ``8bit``; None for full precision."""
    if quantize not in QUANTIZE:
        raise FusionError(f"quantize must be one of 4bit, 8bit or none, got {quantize!r}")
    if quantize is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FusionError(f"--load-in-{quantize} needs bitsandbytes (pip install 'deltacomp[fusion]')") from None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def _keep_portable_4bit(model) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16 CPUs at the first no-grad call, and fails when a
    layer's input width is not a multiple of its quantization block; such layers keep the portable path."""
    for mod in model.modules():
        state = getattr(getattr(mod, "weight", None), "quant_state", None)
        if hasattr(mod, "support_avx512bf16_for_cpu") and state is not None and mod.in_features % state.blocksize:
            mod.support_avx512bf16_for_cpu = False


def load_base(base: Checkpoint, device: str = "cpu", dtype: torch.dtype | None = None, quantize: str | None = None):
    """(kind, model) with ``model`` in eval mode and frozen; kind is ``causal`` or ``encoder``."""
    from transformers import AutoModel, AutoModelForCausalLM

    check_device(device)
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    kind = model_kind(base.config)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    qc = quantization_config(quantize, dtype)
    kw = {"quantization_config": qc, "device_map": {"": device}} if qc is not None else {}
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the caller reports; a bar per model load is noise
    try:
        model = cls.from_pretrained(str(base.path), dtype=dtype, **kw)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if qc is None:
        model = model.to(device)
    elif device == "cpu":
        _keep_portable_4bit(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded %s base %s on %s (%s%s)", kind, base.source, device, dtype,
             f", {quantize} bitsandbytes" if quantize else "")
    return kind, model
