"""Fusion gates, one file each; importing this package registers them all."""

from deltacomp.fusion.gates.base import GATES, Gate, get_gate, register

from deltacomp.fusion.gates import sentence, static, token, topk  # noqa: E402,F401  isort: skip

__all__ = ["GATES", "Gate", "get_gate", "register"]
