"""The calibration a compression does unless told otherwise: deltacomp's own everyday English text.

``--calib auto`` (the default) becomes ``generic`` where the fine-tune can be run (a tokenizer in the fine-tune's or
the base's folder, a transformers architecture in its config, numbered transformer blocks in its weights), else no
calibration; :func:`settle` decides, once, before anything is read, and the manifest records what was done.
:data:`GENERIC_TEXT` is 821 short sentences of daily life (no task, no domain). Measured by function
(BENCHMARKS.md, "Everyday text as the default calibration"): closer to the fine-tune than no calibration and than
the plain reference method on three SmolLM2 fine-tunes (numeric, instruction following, Pig Latin) and on MiniLM,
at 1 and 0.5 bit per entry, for about three times the compress time and 7-9% more package bytes all in (GPTQ's
per-group scales).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from deltacomp.config import BLOCK_LIST_NAME, CALIB_AUTO, CALIB_GENERIC, EXCITATION_WITHOUT_CALIB, CompressConfig
from deltacomp.errors import DeltacompError
from deltacomp.io.checkpoint import Checkpoint

log = logging.getLogger(__name__)
GENERIC_TEXT = Path(__file__).with_name("generic_text.txt")
FIRST_BLOCK = re.compile(rf"(^|\.){BLOCK_LIST_NAME}\.0\.")


def calib_path(calib: str) -> str | Path:
    """The file ``--calib`` names: :data:`GENERIC_TEXT` for ``generic``, else the path given."""
    return GENERIC_TEXT if calib == CALIB_GENERIC else calib


def why_not(config: CompressConfig, base: Checkpoint, ft: Checkpoint) -> str | None:
    """Why ``--calib auto`` cannot calibrate this pair (None: it can)."""
    import transformers

    from deltacomp.calib.frequency import find_tokenizer

    if config.excites_alone:
        return EXCITATION_WITHOUT_CALIB
    if find_tokenizer((ft.path, base.path)) is None:
        return f"no tokenizer in {ft.path} or {base.path}"
    archs = ft.config.get("architectures") or []
    if not any(hasattr(transformers, a) for a in archs):
        return f"{ft.path}/config.json names no transformers architecture ({', '.join(archs) or 'none'})"
    if not any(FIRST_BLOCK.search(k) for k in ft.keys()):
        return f"{ft.source} has no numbered transformer blocks (layers.0, h.0, ...)"
    return None


def settle(config: CompressConfig, base: Checkpoint, ft: Checkpoint) -> CompressConfig:
    """``config`` with ``--calib auto`` as it will be done: ``generic`` where the pair can be calibrated, else None;
    one log line says which (and why not). Options that need calibration then fail with the reason."""
    if config.calib != CALIB_AUTO:
        return config
    reason = why_not(config, base, ft)
    if reason is None:
        log.info("calibrating on deltacomp's everyday English text (--calib auto): --calib FILE for text like the "
                 "fine-tune's, --calib none to skip it")
        return dataclasses.replace(config, calib=CALIB_GENERIC)
    needs = [name for name, on in (("sequential", config.sequential), ("sensitivity", config.sensitivity),
                                   ("tune", config.tune)) if on]
    if needs:
        raise DeltacompError(f"--{needs[0]} needs calibration, and the default text cannot be used: {reason}")
    log.info("compressing without calibration: %s", reason)
    return dataclasses.replace(config, calib=None)
