"""Fuse several compressed deltas over one base: attach them through ``delta_linear`` and mix them with a gate.

Gates (a registry, :mod:`deltacomp.fusion.gates`): ``static`` (task-level weights), ``token`` (LoRA-Flow),
``sentence`` (DLP-LoRA) and ``topk`` (MeteoRA). :class:`FusionModel` builds, trains, runs, saves and loads them;
a gate is a folder (``fusion.json`` + ``gate.safetensors``) that names its base and deltas.
"""

from deltacomp.fusion.config import FusionConfig, FusionError, TrainConfig, parse_weights
from deltacomp.fusion.data import Example, read_examples
from deltacomp.fusion.gates import GATES, Gate, get_gate
from deltacomp.fusion.runtime import FusionModel

__all__ = ["GATES", "Example", "FusionConfig", "FusionError", "FusionModel", "Gate", "TrainConfig", "get_gate",
           "parse_weights", "read_examples"]
