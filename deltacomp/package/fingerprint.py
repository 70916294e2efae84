"""A fingerprint of base weights, so that a package applied to the wrong base fails clearly.

It hashes every floating-point tensor's name and shape and 64 evenly spaced values rounded to bf16, read
without loading tensors whole: cheap for a 70B model, and the same for fp32 and bf16 copies of one base.
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
