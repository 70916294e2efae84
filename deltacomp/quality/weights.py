"""One transformers model in memory whose weights are swapped in place, one tensor at a time.

Evaluating the base, the fine-tune and several rebuilt fine-tunes needs only one model: its parameters are
overwritten from a stream of (checkpoint name, tensor) pairs (a :class:`Checkpoint`'s items, or
:func:`deltacomp.package.reader.iter_weights` of a package), so memory stays at one model plus one tensor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from deltacomp.errors import DeltacompError, MismatchError
from deltacomp.io.checkpoint import Checkpoint

log = logging.getLogger(__name__)

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "mpnet", "deberta",
                 "deberta-v2", "modernbert", "camembert", "t5", "nomic_bert")


def model_kind(config: dict) -> str:
    """``causal`` for decoder LMs (an architecture ending in ForCausalLM/LMHeadModel), else ``encoder``.

    A config without ``architectures`` is judged by its ``model_type``: causal when transformers has a causal-LM
    class for it and it is not an encoder family.
    """
    archs = config.get("architectures") or []
    if archs:
        return "causal" if any(a.endswith(CAUSAL_SUFFIXES) for a in archs) else "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = config.get("model_type")
    return "causal" if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in ENCODER_TYPES else "encoder"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def tokenizer_source(*folders) -> Path:
    """The first folder that holds tokenizer files."""
    for folder in folders:
        if any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
            return Path(folder)
    raise DeltacompError(f"no tokenizer files in {' or '.join(str(f) for f in folders)}; pass --tokenizer FOLDER")


def load_model(base: Checkpoint, kind: str, tokenizer: str | os.PathLike, device: str = "cpu",
               dtype: torch.dtype = torch.float32):
    """The base model and a tokenizer, ready for evaluation."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    model = cls.from_pretrained(str(base.path), dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    return tok, model


class WeightSlots:
    """Checkpoint tensor names -> the model's parameters and buffers (resolving a ``bert.``-style prefix)."""

    def __init__(self, model):
        self.targets = dict(model.state_dict(keep_vars=True))
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    def resolve(self, name: str) -> str | None:
        if name in self.targets:
            return name
        head, _, rest = name.partition(".")
        if rest and head == self.prefix and rest in self.targets:
            return rest
        if self.prefix and f"{self.prefix}.{name}" in self.targets:
            return f"{self.prefix}.{name}"
        return None

    def slot(self, name: str, shape: tuple[int, ...], source: object = None) -> torch.Tensor | None:
        """The model's tensor for checkpoint name ``name`` (None when the model has none), which must have
        ``shape``: else a MismatchError naming ``source`` (what holds the tensor: a package folder), when given."""
        key = self.resolve(name)
        if key is None:
            return None
        slot = self.targets[key]
        if tuple(slot.shape) != tuple(shape):
            where = f" (in {source})" if source is not None else ""
            raise MismatchError(f"{name}: shape {list(shape)}{where} does not fit the model's {list(slot.shape)}")
        return slot

    @torch.no_grad()
    def load(self, named: Iterable[tuple[str, torch.Tensor]], required: set[str] = frozenset()) -> int:
        """Copy each tensor into its slot; names in ``required`` must have one. Returns how many were copied."""
        copied = 0
        for name, t in named:
            slot = self.slot(name, t.shape)
            if slot is None:
                if name in required:
                    raise MismatchError(f"{name}: the package changes this tensor but the model has no such weight")
                log.debug("%s: not a weight of the model; skipped", name)
                continue
            slot.copy_(t.to(slot.dtype))
            copied += 1
        return copied
