"""Fingerprints of base weights, so that a package applied to the wrong base fails clearly.

Two, both the same for fp32, fp16 and bf16 copies of one base (every value is rounded to bf16 first):

* :func:`fingerprint` (the manifest's ``base.fingerprint``) hashes every floating-point tensor's name and
  shape and 64 evenly spaced values, read without loading tensors whole: a fast first test, cheap for a
  70B model, but blind to changes between the samples.
* :class:`FullFingerprint` (``base.full_fingerprint``) hashes every value of every tensor. It is fed the
  tensors as they stream past (compress and apply read each base tensor once anyway), in any order.
"""

from __future__ import annotations

import hashlib

import torch

from deltacomp.io.checkpoint import Checkpoint

SAMPLES = 64


def fingerprint(ckpt: Checkpoint) -> str:
    h = hashlib.sha256()
    for name in sorted(ckpt.keys()):
        if not ckpt.dtype(name).is_floating_point:
            continue
        h.update(name.encode())
        h.update(repr(list(ckpt.shape(name))).encode())
        sample = ckpt.read_sample(name, SAMPLES).to(torch.float32).to(torch.bfloat16)
        h.update(sample.view(torch.int16).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _bytes(t: torch.Tensor):
    """The bytes hashed for ``t``, as a buffer (no copy beyond the bf16 rounding)."""
    if t.dtype.is_floating_point:
        t = t if t.dtype == torch.bfloat16 else t.to(torch.bfloat16)
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


class FullFingerprint:
    """sha256 over the name, shape and every value (rounded to bf16 when floating) of each tensor ``add``-ed."""

    def __init__(self):
        self._digests: dict[str, bytes] = {}

    @staticmethod
    def digest(name: str, t: torch.Tensor) -> bytes:
        """What :meth:`add` records of one tensor (a rank computes it where it reads the tensor)."""
        h = hashlib.sha256(name.encode())
        h.update(repr(list(t.shape)).encode())
        h.update(b"float" if t.dtype.is_floating_point else str(t.dtype).encode())
        h.update(_bytes(t))
        return h.digest()

    def add(self, name: str, t: torch.Tensor) -> None:
        self._digests[name] = self.digest(name, t)

    def add_digest(self, name: str, digest: bytes) -> None:
        self._digests[name] = digest

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self._digests):
            h.update(self._digests[name])
        return "sha256:" + h.hexdigest()
