"""The delta bank: the packed factors of one or more deltas on one input, laid out for the dequant-matmul op.

A bank covers P projections that share an input x (one linear layer, or q|k|v, or gate|up) and k deltas. Its
rank rows j (one per singular vector) are sorted by projection, then by delta, then by bit group. Bank layout 2
(read by ``cuda/delta_linear.cu`` and by the pure-torch twin in :mod:`deltacomp.kernels.reference`):

    v_words   int32 (W_v,)   row j's packed V row at rows[j, V_WORDS]: packed_words(n, v_bits) words in the
                             layout of :mod:`deltacomp.quant.packing`, each row padded to a multiple of 4 words
                             (rows start 16-byte aligned)
    v_scale   fp16  (G_v,)   row j's (scale, offset) per group of ``group_size`` entries at rows[j, V_PARAMS]
    v_offset  fp16  (G_v,)
    u_words, u_scale, u_offset                  the same for U rows, of their projection's out length
    s         fp32  (J,)     singular values
    rows      int32 (J, 8)   v_bits, v_word_off, v_param_off, u_bits, u_word_off, u_param_off, delta, group_size
    projs     int32 (P, 4)   j_start, j_end, out_off, out_len: projection p owns rank rows [j_start, j_end) and
                             outputs [out_off, out_off + out_len)
    spans     int32 (P, k+1) delta d's rank rows in projection p are [spans[p, d], spans[p, d + 1]): the kernel
                             visits only the rows of deltas that a row tile weighs (layout 2 added this table)

The bank holds packed words only (the same bytes as the package plus row padding); it is built once at load.

A bank also holds U by block column, which the one-row CUDA kernel stages in a few coalesced copies (``ColumnU`` in
``cuda/delta_linear.h``), one set of columns per segment q = p * k + d (delta d's rank rows of projection p):

    u_cols    int32 (W_c,)   segment q's column b (outputs 32b .. 32b + 31) at u_colinfo[q, 0] + b *
                             u_colinfo[q, 1]: every rank row's words of block b, in bank order, row j's from word
                             col_off(j) = the sum of the U widths of the segment's rows before j (columns padded to 4
                             words)
    u_desc    int32 (J,)     u_bits | col_off(j) << 4
    u_pair    int32 (J,)     the row's first fp16 U scale | its fp16 offset << 16
    u_colinfo int32 (P*k, 3) column start, column length, 1 when every row of the segment has one parameter group

and ``col_len``, the longest column's words. They hold U's words a second time. A bank has them only when the
one-row kernel can use them for every segment: at most ``FUSED_MAX_DELTAS`` deltas, and at most ``COLUMN_MAX_ROWS``
rank rows of one parameter group a segment (other banks have them empty). A bank of one delta has one segment per
projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltacomp.errors import DeltacompError
from deltacomp.quant.packed import PackedModule, PackedSide

ROW_FIELDS = 8
V_BITS, V_WORDS, V_PARAMS, U_BITS, U_WORDS, U_PARAMS, DELTA, GROUP_SIZE = range(ROW_FIELDS)
TENSORS = ("v_words", "v_scale", "v_offset", "u_words", "u_scale", "u_offset", "s", "rows", "projs", "spans")
COLUMN_TENSORS = ("u_cols", "u_desc", "u_pair", "u_colinfo")
COLUMN_MAX_ROWS = 2048  # rank rows of a segment the kernel's column path takes (kColRows x its 256 threads)
# Deltas of the banks the dispatch point runs through the fused op (the one-row kernel reads the columns); larger
# banks (measured only unfused) keep no columns, which would only hold U's words a second time.
FUSED_MAX_DELTAS = 4
ALIGN = 4  # words: rows start on 16-byte boundaries


class _Side:
    """Accumulates one factor's rows: padded words and parameters, with each row's offsets."""

    def __init__(self):
        self.words, self.scale, self.offset = [], [], []
        self.n_words = self.n_params = 0

    def add(self, side: PackedSide) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a group's rows; return their word and parameter offsets (r,) each."""
        r, width = side.words.shape
        padded = -(-width // ALIGN) * ALIGN
        self.words.append(torch.nn.functional.pad(side.words, (0, padded - width)).reshape(-1))
        self.scale.append(side.scale.reshape(-1))
        self.offset.append(side.offset.reshape(-1))
        groups = side.scale.shape[1]
        word_off = self.n_words + torch.arange(r, dtype=torch.int64) * padded
        param_off = self.n_params + torch.arange(r, dtype=torch.int64) * groups
        self.n_words += r * padded
        self.n_params += r * groups
        return word_off, param_off

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def cat(parts, dtype):
            return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

        return cat(self.words, torch.int32), cat(self.scale, torch.float16), cat(self.offset, torch.float16)


class DeltaBank(torch.nn.Module):
    """Packed factors of k deltas over P projections of one input; move it with ``.to(device)``."""

    def __init__(self, tensors: dict[str, torch.Tensor], in_features: int, out_features: Sequence[int],
                 num_deltas: int):
        super().__init__()
        for name in TENSORS + COLUMN_TENSORS:
            self.register_buffer(name, tensors[name], persistent=False)
        self.col_len = int(tensors.get("col_len", 0))
        self.in_features = in_features
        self.out_features = tuple(out_features)
        self.num_deltas = num_deltas
        self.cache_factors = True  # off the GPU: dequantize once and keep the float factors (see dequantized)
        self._factors: list[tuple] | None = None
        self._ones: dict[tuple, torch.Tensor] = {}
        self._alone: dict[int, DeltaBank] = {}
        self._proj: dict[int, DeltaBank] = {}

    def _apply(self, fn, *args, **kwargs):
        before = list(self._buffers.values())
        out = super()._apply(fn, *args, **kwargs)
        if all(a is b for a, b in zip(before, self._buffers.values(), strict=True)):
            return out  # nothing moved or cast (a bank that sibling layers share is visited once from each)
        views = list(self._proj)
        self._factors = None  # moved or cast: dequantize again on the new device
        self._ones = {}
        self._alone = {}
        self._proj = {}
        for p in views:  # made again at once: one made inside torch.compile's trace would recompile the graph
            self.projection(p)
        return out

    def unit_weights(self, rows: int, device, dtype: torch.dtype) -> torch.Tensor:
        """(rows, k) gate weights of 1, made once per shape and kept (a call then launches no fill).

        Not kept while a CUDA graph is being captured: a tensor filled inside a capture holds its values only when
        the graph replays.
        """
        key = (rows, torch.device(device), dtype)
        ones = self._ones.get(key)
        if ones is None:
            ones = torch.ones(rows, self.num_deltas, device=device, dtype=dtype)
            capturing = ones.is_cuda and torch.cuda.is_current_stream_capturing()
            if not capturing and len(self._ones) < 64:
                self._ones[key] = ones
        return ones

    def release_factors(self) -> None:
        """Drop the kept float factors (:meth:`dequantized`), this bank's and its views' (:meth:`alone`,
        :meth:`projection`); the next call that needs them makes them again."""
        self._factors = None
        for view in (*self._alone.values(), *self._proj.values()):
            view.release_factors()

    def dequantized(self) -> list[tuple]:
        """The factors as float32, per projection (:func:`deltacomp.kernels.reference.projections`), made once.

        The CPU path keeps them: r (m + n) floats per module instead of r (m + n) codes, traded for not unpacking
        the words at every call. The CUDA kernel never uses them; training a gate does (on any device), and
        ``train_gate`` releases them when it ends.
        """
        from deltacomp.kernels.reference import projections

        if self._factors is None:
            self._factors = projections(self.in_features, *self.tensors()[:6], self.rows, self.projs)
        return self._factors

    @classmethod
    def build(cls, table: Sequence[Sequence[PackedModule | None]], out_features: Sequence[int] | None = None,
              in_features: int | None = None) -> DeltaBank:
        """``table[p][d]``: delta d's module on projection p (None where that delta leaves it unchanged).

        ``out_features``/``in_features`` are needed only where a projection has no module at all.
        """
        if not table or not table[0]:
            raise DeltacompError("a delta bank needs at least one projection and one delta")
        k = len(table[0])
        mods = [m for row in table for m in row if m is not None]
        n = in_features if in_features is not None else (mods[0].shape[1] if mods else None)
        if n is None:
            raise DeltacompError("a delta bank with no modules needs in_features")
        outs = []
        for p, row in enumerate(table):
            if len(row) != k:
                raise DeltacompError(f"projection {p} lists {len(row)} deltas; projection 0 lists {k}")
            m = {mod.shape[0] for mod in row if mod is not None}
            if out_features is not None:
                m.add(int(out_features[p]))
            if len(m) != 1:
                raise DeltacompError(f"projection {p}: deltas disagree on its output size ({sorted(m)})")
            outs.append(m.pop())
        for mod in mods:
            if mod.shape[1] != n:
                raise DeltacompError(f"{mod.name}: {mod.shape[1]} input features; the bank's input has {n}")
        v, u = _Side(), _Side()
        rows, s, projs, spans = [], [], [], []
        out_off = j = 0
        for p, row in enumerate(table):
            j_start = j
            spans.append([])
            for d, mod in enumerate(row):
                spans[-1].append(j)
                for g in mod.groups if mod is not None else ():
                    vw, vp = v.add(g.v)
                    uw, up = u.add(g.u)
                    meta = torch.empty(g.rank, ROW_FIELDS, dtype=torch.int64)
                    meta[:, V_BITS], meta[:, V_WORDS], meta[:, V_PARAMS] = g.v.bits, vw, vp
                    meta[:, U_BITS], meta[:, U_WORDS], meta[:, U_PARAMS] = g.u.bits, uw, up
                    meta[:, DELTA], meta[:, GROUP_SIZE] = d, mod.group_size
                    rows.append(meta)
                    s.append(g.s.float())
                    j += g.rank
            spans[-1].append(j)
            projs.append([j_start, j, out_off, outs[p]])
            out_off += outs[p]
        if max(v.n_words, u.n_words, v.n_params, u.n_params) >= 2**31:
            raise DeltacompError("a delta bank over 2**31 words: split the deltas over several banks")
        tensors = dict(zip(("v_words", "v_scale", "v_offset"), v.tensors()))
        tensors.update(zip(("u_words", "u_scale", "u_offset"), u.tensors()))
        tensors["s"] = torch.cat(s) if s else torch.zeros(0)
        tensors["rows"] = (torch.cat(rows) if rows else torch.zeros(0, ROW_FIELDS, dtype=torch.int64)).to(torch.int32)
        tensors["projs"] = torch.tensor(projs, dtype=torch.int32).reshape(-1, 4)
        tensors["spans"] = torch.tensor(spans, dtype=torch.int32).reshape(-1, k + 1)
        tensors.update(_columns(tensors, len(outs), k) if k <= FUSED_MAX_DELTAS else _no_columns(len(outs) * k))
        return cls(tensors, n, outs, k)

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    @property
    def nbytes(self) -> int:
        """Bytes the op reads for the factors: packed words, scales, offsets and S."""
        return sum(getattr(self, t).numel() * getattr(self, t).element_size() for t in TENSORS[:7])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        buffers = self._buffers  # not nn.Module.__getattr__: this runs at every call of the op
        return tuple(buffers[t] for t in TENSORS)

    def columns(self) -> tuple[torch.Tensor, ...]:
        """U by block column (empty when the column path cannot take the bank), in ``COLUMN_TENSORS`` order."""
        buffers = self._buffers
        return tuple(buffers[t] for t in COLUMN_TENSORS)

    def base_op_args(self) -> tuple:
        """The bank's arguments of ``deltacomp::delta_linear_base``: its tensors, then U by block column."""
        return (*self.tensors(), *self.columns(), self.col_len)

    def alone(self, d: int) -> DeltaBank:
        """Delta d of this bank as a bank of one delta, made once and kept: its rank rows, whose offsets point into
        this bank's packed tensors (shared, not copied), and U by block column when the column path takes it (this
        bank's columns of delta d, shared, or, when this bank has none, a copy of delta d's U words laid out for it).
        What a one-hot weight on d computes, at the speed of a one-delta bank."""
        if not 0 <= d < self.num_deltas:
            raise DeltacompError(f"delta {d} of a bank of {self.num_deltas}")
        if self.num_deltas == 1:
            return self
        kept = self._alone.get(d)
        if kept is None:
            kept = self._alone[d] = self._view(range(len(self.out_features)), d)
        return kept

    def projection(self, p: int) -> DeltaBank:
        """Projection p of this bank (every delta) as a bank of its own, made once and kept, over the shared words
        and columns as :meth:`alone` is: what one of the layers that share the bank's input computes alone."""
        if not 0 <= p < len(self.out_features):
            raise DeltacompError(f"projection {p} of a bank of {len(self.out_features)}")
        if len(self.out_features) == 1:
            return self
        kept = self._proj.get(p)
        if kept is None:
            kept = self._proj[p] = self._view([p], None)
        return kept

    def _view(self, projections: Sequence[int], d: int | None) -> DeltaBank:
        """The rank rows of ``projections`` (in that order) of delta ``d`` (None: of every delta), as a bank."""
        rows, s, spans = self.rows.cpu(), self.s.cpu(), self.spans.cpu().long()
        k = self.num_deltas if d is None else 1
        every = self.projs.cpu().tolist()
        picked, projs, new_spans, segments, j, out_off = [], [], [], [], 0, 0
        for p in projections:
            lo, hi = (int(spans[p, 0]), int(spans[p, -1])) if d is None else (int(spans[p, d]), int(spans[p, d + 1]))
            picked.append(torch.arange(lo, hi))
            projs.append([j, j + hi - lo, out_off, every[p][3]])
            new_spans.append((spans[p] - lo + j).tolist() if d is None else [j, j + hi - lo])
            segments += [p * self.num_deltas + e for e in (range(self.num_deltas) if d is None else [d])]
            j += hi - lo
            out_off += every[p][3]
        picked = torch.cat(picked)
        t = {name: getattr(self, name) for name in TENSORS[:6]}
        t["rows"], t["s"] = rows[picked], s[picked]  # indexing copies: the bank's own tables stay as they are
        if d is not None:
            t["rows"][:, DELTA] = 0
        t["projs"] = torch.tensor(projs, dtype=torch.int32).reshape(-1, 4)
        t["spans"] = torch.tensor(new_spans, dtype=torch.int32).reshape(-1, k + 1)
        if self.col_len > 0:  # the segments' columns of this bank, with their rows' descriptors
            info = self.u_colinfo[torch.tensor(segments)]
            t.update(u_cols=self.u_cols, u_desc=self.u_desc[picked], u_pair=self.u_pair[picked], u_colinfo=info,
                     col_len=int(info[:, 1].max()))
        else:
            t.update(_columns(t, len(projs), k) if k <= FUSED_MAX_DELTAS else _no_columns(len(projs) * k))
        device = self.rows.device
        t = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in t.items()}
        return DeltaBank(t, self.in_features, [self.out_features[p] for p in projections], k)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, deltas={self.num_deltas}, "
                f"rank={self.rank}, bytes={self.nbytes}")


def _no_columns(num_segments: int) -> dict:
    empty = torch.zeros(0, dtype=torch.int32)
    return {"u_cols": empty, "u_desc": empty, "u_pair": empty,
            "u_colinfo": torch.zeros(num_segments, 3, dtype=torch.int32), "col_len": 0}


def _columns(t: dict[str, torch.Tensor], num_projs: int, k: int = 1) -> dict:
    """U by block column (see the module docstring): an exact copy of the rows' words, rearranged, a set of columns
    per (projection, delta); none when some delta has more than ``COLUMN_MAX_ROWS`` rank rows in a projection or rows
    of several parameter groups. Made on the CPU, wherever the packed words are (a bank's tables are built there;
    ``.to`` moves them all)."""
    t = {name: t[name].cpu() for name in ("rows", "projs", "spans", "u_words", "u_scale", "u_offset")}
    rows = t["rows"].long()
    bits = rows[:, U_BITS]
    desc = torch.zeros(len(rows), dtype=torch.int64)
    pieces, info, start, longest = [], [], 0, 0
    words = t["u_words"].long()
    spans = t["spans"].long()
    for p, (_, _, _, m) in enumerate(t["projs"].long().tolist()):
        for d in range(k):
            j0, j1 = int(spans[p, d]), int(spans[p, d + 1])
            gs = rows[j0:j1, GROUP_SIZE]
            if j1 - j0 > COLUMN_MAX_ROWS or not bool(((gs <= 0) | (gs >= m)).all()):
                return _no_columns(num_projs * k)
            b = bits[j0:j1]
            col_off = torch.cumsum(b, 0) - b
            desc[j0:j1] = b | col_off << 4
            length = -(-int(b.sum()) // ALIGN) * ALIGN
            blocks = -(-m // 32)
            cols = torch.zeros(blocks, length, dtype=torch.int64)
            if j1 > j0 and length:
                # word w of row j's block c: u_words[woff_j + c * bits_j + w] -> column c, word col_off_j + w
                row = torch.repeat_interleave(torch.arange(j0, j1), b)
                w = torch.arange(len(row)) - torch.repeat_interleave(col_off, b)
                c = torch.arange(blocks).unsqueeze(1)
                src = rows[row, U_WORDS] + c * bits[row] + w
                cols[:, col_off[row - j0] + w] = words[src]
            info.append([start, length, 1])
            pieces.append(cols.reshape(-1))
            start += blocks * length
            longest = max(longest, length)
    if start >= 2**31 or longest >= 2**27:  # desc keeps col_off in 27 bits
        raise DeltacompError("a delta bank's U columns over 2**31 words: split the deltas over several banks")
    params = rows[:, U_PARAMS]
    scale, offset = (t[name].view(torch.int16).long() & 0xFFFF for name in ("u_scale", "u_offset"))  # fp16 bits
    pair = scale[params] | offset[params] << 16  # below 2**32: wraps to int32 as the kernel's uint32 reads it
    return {"u_cols": torch.cat(pieces).to(torch.int32), "u_desc": desc.to(torch.int32),
            "u_pair": pair.to(torch.int32), "u_colinfo": torch.tensor(info, dtype=torch.int32).reshape(-1, 3),
            "col_len": longest}
