"""Per-matrix context for the mixed method: calibration Hessians and model-scope bit allocations.

:func:`open_contexts` is what :func:`deltacomp.compress.compress` calls when ``--calib`` or
``--budget-scope model`` is set. Entries are put in natural order (``layers.2`` before ``layers.10``) so that
the blocks are visited once, in order; the Hessians of a block live only while its matrices are compressed.
With ``--sequential`` (:mod:`deltacomp.calib.sequential`) the calibrated matrices are further put in the order
the model calls them, and each context (:class:`deltacomp.calib.context.MatrixContext`) also carries the target
delta fitted to the student's inputs and a hook that hands the compressed matrix back to the student stream.

``--budget-scope model`` needs a first pass before anything is quantized: every matrix is decomposed (top
vectors, up to twice the rank its own budget would afford), the expected error of each vector at each width is
measured (with calibration, on the same Hessians), and one allocation is made across the model
(:mod:`deltacomp.quant.allocate`). The factors are spilled to a temporary folder (U and V in fp16, S in fp32;
for a 7B model about 5 GB at 1 bit per entry) and read back one matrix at a time in the second pass, which runs
the calibration forward again rather than keeping every Hessian.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltacomp.calib.context import MatrixContext, ScopePlan
from deltacomp.calib.generic import GENERIC_TEXT, calib_path
from deltacomp.config import CALIB_GENERIC, Calibration, CompressConfig
from deltacomp.errors import DeltacompError
from deltacomp.extract import Entry, stream
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.quant import allocate
from deltacomp.rows import is_token_table, is_vocab_matrix, select_rows
from deltacomp.stages import timed

log = logging.getLogger(__name__)


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@timed("calibration text")
def load_calibration(config: Calibration, ft: Checkpoint,
                     base: Checkpoint) -> tuple[list[torch.Tensor], list[int | None]]:
    """Token samples of ``config.calib`` with the fine-tune's tokenizer (the base's if it has none), followed with
    ``--calib-generic`` by those of the everyday text (unless that is the calibration already); and where each
    sample's answer begins (:func:`deltacomp.calib.data.answer_start`; None: a text, and every sample unless
    ``--tune`` may weigh the answers: ``--tune-on`` other than all)."""
    from deltacomp.calib.data import load_samples, load_samples_and_answers
    from deltacomp.calib.frequency import find_tokenizer

    tok = find_tokenizer((ft.path, base.path))
    if tok is None:
        raise DeltacompError(f"--calib needs a tokenizer, but neither {ft.path} nor {base.path} has one")
    max_len = int(ft.config.get("max_position_embeddings") or 2048)
    samples, starts = load_samples_and_answers(calib_path(config.calib), tok, config.calib_samples,
                                               config.calib_seqlen, max_len, config.calib_field,
                                               answers=bool(config.tune) and config.tune_on != "all")
    if config.calib_generic and config.calib != CALIB_GENERIC:
        generic = load_samples(GENERIC_TEXT, tok, None, config.calib_seqlen, max_len)
        samples, starts = samples + generic, starts + [None] * len(generic)
    return samples, starts


def shrink(h: torch.Tensor, weight: float | None, tokens: int) -> torch.Tensor:
    """``(1 - a) H + a * mean(diag H) I``: the Hessian ``h (n, n)`` measured on ``tokens`` calibration tokens, moved
    towards the identity at its own scale by ``a`` = ``weight`` (0: unchanged; 1: every input direction alike, as
    without calibration), or with ``weight`` None by ``n / (n + tokens)``: an n x n second moment from fewer tokens
    than inputs is mostly unmeasured directions."""
    n = h.shape[0]
    weight = n / (n + tokens) if weight is None else weight
    if weight == 0:
        return h
    out = h * (1.0 - weight)
    out.diagonal().add_(weight * float(h.diagonal().mean()))
    return out


class _Cursor:
    """Walks a :class:`LayerwiseHessians` forward: the Hessian of a name (shrunk by ``weight``), keeping only the
    current block's."""

    def __init__(self, hessians, weight: float | None, tokens: int):
        self.weight, self.tokens = weight, tokens
        self.hessians, self.layer_of = hessians, hessians.layer_of
        self.it = iter(hessians)
        self.layer, self.current = -1, {}

    @timed("calibration")
    def get(self, name: str) -> torch.Tensor | None:
        want = self.layer_of.get(name)
        if want is None:
            return None
        while self.layer < want:
            self.current = {}
            try:
                self.layer, self.current = next(self.it)
            except StopIteration:
                self.layer = 1 << 30
        h = self.current.get(name) if self.layer == want else None
        return shrink(h, self.weight, self.tokens) if h is not None else None

    @timed("calibration")
    def head_moment(self) -> torch.Tensor | None:
        """The output head's input moment (:func:`deltacomp.calib.head.head_moment`), the walk taken on from the
        block it reached to the last; no Hessian is given after it."""
        from deltacomp.calib.head import walk_moment

        self.it, self.layer, self.current = iter(()), 1 << 30, {}
        return walk_moment(self.hessians)


class Contexts:
    def __init__(self, base: Checkpoint, ft: Checkpoint, entries: list[Entry], config: CompressConfig, method):
        self.base, self.ft, self.config, self.method = base, ft, config, method
        # token tables last: the output head's input moment takes the calibration's walk on past the last block
        self.entries = sorted(entries, key=lambda e: (is_token_table(e.name), natural_key(e.name)))
        self.names = {e.name for e in self.entries if e.action == "compress"}
        self.samples, self.answer_starts = (load_calibration(config.groups.calibration, ft, base) if config.calib
                                            else (None, None))
        self.tokens = sum(len(t) for t in self.samples) if self.samples else 0
        self.bits: dict[str, torch.Tensor] = {}
        self.spill: Path | None = None
        self.sequential = None
        if config.budget_scope == "model":
            try:
                self._first_pass()
            except BaseException:
                self.close()
                raise
        if config.sequential:
            self.sequential = self._sequential()
            self.cursor = None
        else:
            self.cursor = self._cursor()

    def dtype(self) -> torch.dtype:
        """The dtype the fine-tune runs in for calibration: bf16 on a GPU when its matrices are 16-bit, else float32."""
        half = any(self.ft.dtype(n) in (torch.float16, torch.bfloat16) for n in self.names)
        return torch.bfloat16 if self.config.device.startswith("cuda") and half else torch.float32

    def _sequential(self):
        """The sequential calibration; the calibrated matrices are put in the order the model calls them."""
        from deltacomp.calib.sequential import SequentialCalibration

        seq = SequentialCalibration(self.ft, self.samples, self.names, self.config.device, self.dtype())
        self._warn_uncalibrated(seq.layer_of)
        slots = [i for i, e in enumerate(self.entries) if e.name in seq.layer_of]
        by_name = {e.name: e for e in self.entries}
        for i, name in zip(slots, seq.order):
            self.entries[i] = by_name[name]
        return seq

    def _warn_uncalibrated(self, layer_of: dict) -> None:
        """Warn of compressed matrices outside the blocks, but for token tables that ``--vocab-weights`` weighs."""
        weighed = self.method.weighs_token_tables(self.config)
        missing = sorted(n for n in self.names - set(layer_of) if not (weighed and is_token_table(n)))
        if missing:
            log.warning("%d matrices are outside the transformer blocks and get no calibration (e.g. %s)",
                        len(missing), missing[0])

    def _cursor(self) -> _Cursor | None:
        if self.samples is None:
            return None
        from deltacomp.calib.activations import LayerwiseHessians

        hessians = LayerwiseHessians(self.ft, self.samples, self.names, self.config.device, self.dtype())
        self._warn_uncalibrated(hessians.layer_of)
        return _Cursor(hessians, self.config.calib_shrink, self.tokens)

    @timed("calibration")
    def _sensitivity(self) -> dict[str, float]:
        """Each calibrated matrix's output sensitivity (:mod:`deltacomp.calib.sensitivity`); 1 is their mean."""
        from deltacomp.calib.activations import LayerwiseHessians
        from deltacomp.calib.sensitivity import output_sensitivity

        layers = LayerwiseHessians(self.ft, self.samples, self.names, self.config.device, self.dtype())
        weights = output_sensitivity(layers)
        log.info("output sensitivity of %d matrices: %.3g to %.3g", len(weights), min(weights.values(), default=0),
                 max(weights.values(), default=0))
        return weights

    def _first_pass(self) -> None:
        cfg = self.config
        from deltacomp.io.output import remove_dead

        remove_dead(Path(tempfile.gettempdir()), re.compile(r"^deltacomp-scope-(\d+)-"))  # spills of killed runs
        self.spill = Path(tempfile.mkdtemp(prefix=f"deltacomp-scope-{os.getpid()}-"))
        cursor = self._cursor()
        weights = self._sensitivity() if cfg.sensitivity else {}
        tables, costs, names, total, fixed = [], [], [], 0, 0
        todo = [e for e in self.entries if e.action == "compress"]
        for e, b, f in stream(self.base, self.ft, todo):
            delta = f.float() - b.float()  # (m, n)
            h = cursor.get(e.name) if cursor else None
            if not bool(delta.any()):
                continue
            total += delta.numel()
            # A token table's rows of the tokens that moved, as in the per-matrix path: its vectors then cost
            # (k + n) entries instead of (V + n), and the shared budget the table's other rows would take goes
            # where it counts. The row indices (32 bits each) come off the budget first.
            rows = select_rows(delta, cfg.rows_energy) if is_vocab_matrix(e.name) else None
            if rows is not None:
                delta = delta[rows.to(delta.device)]
                fixed += 32 * rows.numel()
            c = self.method.candidates(delta, cfg, h, share=2.0)
            tables.append(c.errors * weights.get(e.name, 1.0) ** 0.5)
            costs.append(c.costs)
            u, s, v = c.u, c.s, c.v
            spilled = {"u": u.half().cpu().contiguous(), "s": s.cpu(), "v": v.half().cpu().contiguous()}
            if rows is not None:
                spilled["rows"] = rows.to(torch.int32).cpu()
            save_file(spilled, str(self.spill / f"{len(names)}.safetensors"))
            names.append(e.name)
        if not names:
            return
        options = allocate.solve(tables, costs, cfg.bits * total - fixed)
        self.bits = {n: allocate.bits_of_options(o, cfg.widths) for n, o in zip(names, options)}
        self.budgets = {n: float(c[o].sum()) for n, c, o in zip(names, costs, options)}
        self.index = {n: i for i, n in enumerate(names)}
        log.info("model-scope allocation over %d matrices: %d vectors kept", len(names),
                 sum(int((b > 0).sum()) for b in self.bits.values()))

    def context_for(self, e: Entry) -> MatrixContext | None:
        """The context of the compressed matrix ``e``; asked for in the order of :attr:`entries`."""
        hessian = target = compressed = plan = None
        seq = self.sequential
        if seq is not None and e.name in seq.layer_of:
            from deltacomp.calib.sequential import target_delta

            hessian, cross = seq.moments(e.name)
            damp = self.config.seq_damp

            def target(base, ft, h=hessian, c=cross):
                return target_delta(base, ft, h, c, damp)

            def compressed(base, delta, name=e.name):
                seq.done(name, base, delta)

            # for the method; the target solve keeps its own
            hessian = shrink(hessian, self.config.calib_shrink, self.tokens)

        if self.cursor is not None:
            hessian = self.cursor.get(e.name)
        if e.name in self.bits:
            t = load_file(str(self.spill / f"{self.index[e.name]}.safetensors"), device=self.config.device)
            plan = ScopePlan(t["u"].float(), t["s"].float(), t["v"].float(), self.bits[e.name], self.budgets[e.name],
                             t["rows"].long() if "rows" in t else None)
        if hessian is None and target is None and plan is None:
            return None
        return MatrixContext(hessian, target, compressed, plan)

    def close(self) -> None:
        self.cursor = self.sequential = None
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)


def open_contexts(base: Checkpoint, ft: Checkpoint, entries: list[Entry], config: CompressConfig,
                  method) -> Contexts | None:
    """The contexts ``config`` needs, or None when it needs none (no calibration, per-matrix budget)."""
    if config.calib is None and config.budget_scope == "matrix":
        return None
    return Contexts(base, ft, entries, config, method)
