"""Compression methods, one file each; importing this package registers them all."""

from deltacomp.methods import bitdelta, dense, lowrank, mixed, reference  # noqa: F401
from deltacomp.methods.base import METHODS, Compressed, Method, get_method, method_for, register

__all__ = ["METHODS", "Compressed", "Method", "get_method", "method_for", "register"]
