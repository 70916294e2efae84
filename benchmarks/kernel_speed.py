"""Speed of the dequant-matmul op on Llama-2-7B decode-step shapes (run on one GPU; prints tables).

The deltas: for each of a layer's seven linear shapes (q, k, v, o 4096x4096; gate, up 11008x4096; down
4096x11008), the delta of ``benchmarks/compress_7b_speed.py``'s pair (decaying spectrum ``s_i ~ i^-0.8``, 1% of
an N(0, 0.02) weight's norm), compressed by deltacomp's default ``mixed`` method at 1 bit per entry. That layer's
packed factors are copied to 32 layers at distinct addresses (the same bytes; nothing is shared or cached), and
the base weights are 224 distinct bf16 matrices (12.95 GB), so neither fits in the 60 MB L2.

Every figure is the median over ``--repeats`` timings (CUDA events) of a CUDA graph that replays one whole decode
step (224 matrices, or 32 layers x 4 fused launches), after warm-up, with the step's input rotated among 8 buffers.

    python benchmarks/kernel_speed.py [--rows 1,8,32] [--layers 32] [--parts widths,tenants] [--json out.json]
    python benchmarks/kernel_speed.py --render out.json      # the tables of an earlier run
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

from deltacomp import native
from deltacomp.config import CompressConfig
from deltacomp.kernels import DeltaBank, delta_linear, status
from deltacomp.kernels.bank import COLUMN_TENSORS, TENSORS
from deltacomp.methods.base import get_method
from deltacomp.quant import packing
from deltacomp.quant.packed import packed_from_parts
from deltacomp.report import format_table

H, F = 4096, 11008  # hidden, intermediate
SHAPES = {"q": (H, H), "k": (H, H), "v": (H, H), "o": (H, H), "gate": (F, H), "up": (F, H), "down": (H, F)}
FUSED = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))  # projections that share an input
DT = torch.bfloat16
ROTATE = 8


def make_delta(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    base_norm = 0.02 * (m * n) ** 0.5
    r = min(m, n)
    s = torch.arange(1, r + 1, device="cuda", dtype=torch.float32) ** -0.8
    a = torch.randn(m, r, device="cuda", generator=g) / m**0.5
    b = torch.randn(n, r, device="cuda", generator=g) / n**0.5
    delta = (a * s) @ b.T
    return delta * (0.01 * base_norm / delta.norm())


def compress_layer(bits: float = 1.0):
    """One layer's seven deltas as packed modules (deltacomp's default mixed method)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    method, config = get_method("mixed"), CompressConfig(bits=bits, device="cuda")
    mods = {}
    for name, (m, n) in SHAPES.items():
        c = method.compress(make_delta(m, n, g), config)
        mods[name] = packed_from_parts(name, c.tensors, c.info, (m, n))
    return mods


def time_graph(fn, repeats: int, inner: int = 5) -> float:
    """Median milliseconds of one call of ``fn`` (captured once in a CUDA graph, replayed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


class Step:
    """Rotating inputs: each call of a step function reads the next of ROTATE input buffers."""

    def __init__(self, rows: int, width: int):
        self.xs = [torch.randn(rows, width, device="cuda", dtype=DT) for _ in range(ROTATE)]
        self.i = 0

    def next(self) -> torch.Tensor:
        self.i = (self.i + 1) % ROTATE
        return self.xs[self.i]


class LayerInputs:
    """A layer's two inputs, rotated together: rows of hidden width (q, k, v, o, gate, up) and of the intermediate
    width (down)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.hidden, self.inter = Step(rows, H), Step(rows, F)

    def next(self) -> None:
        self.hidden.next(), self.inter.next()

    def x(self, k: str) -> torch.Tensor:
        step = self.inter if k == "down" else self.hidden
        return step.xs[step.i]


def bench(args) -> dict:
    torch.manual_seed(0)
    layer = compress_layer(args.bits) if args.rows or {"tenants", "calls"} & set(args.parts.split(",")) else None
    results = {"kernel_path": status().path, "rows": {}}
    if args.rows:
        decode_steps(layer, args, results)
    if "widths" in args.parts:
        results["widths"] = widths(args)
        _save(results, args)
    if "eager" in args.parts:
        results["eager_us"] = eager_calls(args)
        _save(results, args)
    if "tenants" in args.parts:
        one_row = results["rows"].get(1)  # the base step at 1 row, when the decode steps timed it
        base_step = (one_row["base"], results["base_bytes"]) if one_row else None
        results["multi_tenant"] = multi_tenant(layer, args, base_step)
        _save(results, args)
    if "calls" in args.parts and native.extension() is not None:
        results["calls"] = per_call(layer, args)
        _save(results, args)
    return results


def decode_steps(layer, args, results: dict) -> None:
    """Fills ``results`` with the decode-step tables, one row count at a time."""
    L = args.layers
    base = base_weights(L)
    single = [{k: DeltaBank.build([[mod]]).to("cuda") for k, mod in layer.items()}]
    fused = [[DeltaBank.build([[layer[p]] for p in group]).to("cuda") for group in FUSED]]
    four = [[DeltaBank.build([[layer[p]] * 4 for p in group]).to("cuda") for group in FUSED]]
    for _ in range(L - 1):  # the same bytes at distinct addresses
        single.append({k: _clone(b) for k, b in single[0].items()})
        fused.append([_clone(b) for b in fused[0]])
        four.append([_clone(b) for b in four[0]])
    merged = [[torch.cat([lw[p] for p in group]) for group in FUSED] for lw in base]
    base_bytes = sum(w.numel() * 2 for lw in base for w in lw.values())
    delta_bytes = sum(b.nbytes for lw in single for b in lw.values())
    results.update(base_bytes=base_bytes, delta_bytes=delta_bytes)
    lora_ranks = {"lora16": 16, "lora_same_bytes": _same_bytes_rank(delta_bytes, L)}
    results["lora_same_bytes_rank"] = lora_ranks["lora_same_bytes"]
    for rows in args.rows:
        inputs = LayerInputs(rows)
        results["rows"][rows] = step_times(inputs, base, single, fused, lora_ranks, args.repeats)
        results["rows"][rows].update(overlap_times(inputs, base, merged, single, fused, four, args.repeats))
        if native.extension() is not None:
            results["rows"][rows].update(fused_base_times(inputs, base, merged, single, fused, four, args.repeats))
        _save(results, args)
    del base, merged, single, fused, four
    torch.cuda.empty_cache()


def _save(results: dict, args) -> None:
    """Write what is measured so far (a long run that stops early keeps its tables)."""
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def base_weights(layers: int) -> list[dict]:
    """The base: 224 distinct bf16 matrices of the 7B shapes (32 layers)."""
    return [{k: torch.randn(m, n, device="cuda", dtype=DT) * 0.02 for k, (m, n) in SHAPES.items()}
            for _ in range(layers)]


def base_step_time(inputs: LayerInputs, base, repeats: int) -> float:
    """Milliseconds of the base's matmuls for one decode step."""
    def base_step():
        inputs.next()
        for lw in base:
            for k, w in lw.items():
                inputs.x(k) @ w.T

    return time_graph(base_step, repeats)


def step_times(inputs: LayerInputs, base, single, fused, lora_ranks: dict, repeats: int) -> dict:
    """Milliseconds of one decode step: base matmuls, deltas alone (7 or 4 fused launches a layer), base + delta,
    and fp16 LoRAs done with torch matmuls."""
    x_for = inputs.x

    def delta_step():
        inputs.next()
        for lw in single:
            for k, b in lw.items():
                delta_linear(x_for(k), b)

    def fused_step():
        inputs.next()
        for lw in fused:
            for group, b in zip(FUSED, lw):
                delta_linear(x_for(group[0]), b)

    def base_plus_delta():
        inputs.next()
        for lw, lb in zip(base, single):
            for k, w in lw.items():
                x = x_for(k)
                delta_linear(x, lb[k], x @ w.T)

    r = {"base": base_step_time(inputs, base, repeats), "delta": time_graph(delta_step, repeats),
         "delta_fused": time_graph(fused_step, repeats), "base+delta": time_graph(base_plus_delta, repeats)}
    r["dense_delta"] = r["base"]  # a dense bf16 delta is the base's 224 bf16 matmuls again: same shapes, bytes

    def lora_time(rank: int) -> float:
        factors = [{k: (torch.randn(rank, n, device="cuda", dtype=DT), torch.randn(m, rank, device="cuda", dtype=DT))
                    for k, (m, n) in SHAPES.items()} for _ in range(len(base))]

        def lora_step():
            inputs.next()
            for lw in factors:
                for k, (a, b) in lw.items():
                    (x_for(k) @ a.T) @ b.T

        return time_graph(lora_step, repeats)

    r.update({label: lora_time(rank) for label, rank in lora_ranks.items()})
    return r


@functools.cache
def _side_stream() -> torch.cuda.Stream:
    return torch.cuda.Stream(priority=-1)  # a lower number is a higher priority


def add_beside(x: torch.Tensor, base, delta) -> torch.Tensor:
    """``base(x) + delta(x)`` with ``delta`` on a side stream (forked from and joined to the current stream, so a
    CUDA graph captures two concurrent branches): whether the delta can hide behind the base matmul."""
    main, side = torch.cuda.current_stream(), _side_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        d = delta(x)
    y = base(x)
    main.wait_stream(side)
    return y + d


def _gate_maps(four) -> list[list[torch.Tensor]]:
    """A 4-way linear map of x per bank of four deltas: the token gate's (and top-2 router's) weights."""
    return [[torch.randn(4, b.in_features, device="cuda") * 0.05 for b in lw] for lw in four]


def _one_of_four(rows: int) -> torch.Tensor:
    """Every row on delta 2 of four: what the sentence router hands the op."""
    return torch.nn.functional.one_hot(torch.full((rows,), 2, device="cuda"), 4).float()


def _token_gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.float() @ g.T, -1)


def _top2_gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    logits = x.float() @ g.T
    kept = logits.topk(2, -1)
    return torch.zeros_like(logits).scatter_(-1, kept.indices, torch.softmax(kept.values, -1))


def overlap_times(inputs: LayerInputs, base, merged, single, fused, four, repeats: int) -> dict:
    """Milliseconds of a decode step with the deltas beside the base matmuls (``add_beside``: side stream, joined
    before the next call, so calls stay ordered as in a model): per linear layer (7 a layer); merged base matmuls
    (q|k|v and gate|up concatenated, as serving engines store them: 4 a layer) with the fused delta banks; and
    four deltas per bank mixed per token by a gate (softmax of a 4-way linear map of x), top-2 of four, or one of
    four picked for the whole sequence (a one-hot weight, as the sentence router does)."""
    x_for = inputs.x
    gates, one_hot = _gate_maps(four), _one_of_four(inputs.rows)

    def per_linear():
        inputs.next()
        for lw, lb in zip(base, single):
            for k, w in lw.items():
                add_beside(x_for(k), lambda x, w=w: x @ w.T, lambda x, b=lb[k]: delta_linear(x, b))

    def merged_step(banks=None, weights=None):
        def step():
            inputs.next()
            for i, lm in enumerate(merged):
                for j, (group, w) in enumerate(zip(FUSED, lm)):
                    x = x_for(group[0])
                    if banks is None:
                        x @ w.T
                        continue
                    b = banks[i][j]
                    g = gates[i][j]
                    add_beside(x, lambda x, w=w: x @ w.T,
                               lambda x, b=b, g=g: delta_linear(x, b, weights=weights(x, g) if weights else None))
        return step

    return {"base_merged": time_graph(merged_step(), repeats),
            "beside": time_graph(per_linear, repeats),
            "merged_beside_fused": time_graph(merged_step(fused), repeats),
            "four_token": time_graph(merged_step(four, _token_gate), repeats),
            "four_top2": time_graph(merged_step(four, _top2_gate), repeats),
            "four_sentence": time_graph(merged_step(four, lambda x, g: one_hot), repeats)}


def fused_base_times(inputs: LayerInputs, base, merged, single, fused, four, repeats: int) -> dict:
    """Milliseconds of a decode step with the base product computed by the fused op (the op
    ``delta_linear_base``, one launch pair per call, called at every row count): per linear layer (7 a layer),
    per merged group (q|k|v and gate|up: 4 a layer, each projection's base weight in place), and four deltas a
    group mixed per token by a gate, its top 2, or one of four picked for the sequence (as in ``overlap_times``), the
    latter also as the fusion runtime runs it: the picked delta's rows as a bank of one delta
    (``DeltaBank.alone``); the token gate as the fusion runtime computes it, once a layer from the layer's input
    for all its groups; and, at several rows, the sentence router's sequences each on its own delta of the four
    (row r on delta r % 4), as the runtime runs them: the merged base matmul, then one multi-tenant call."""
    ext = native.extension()
    x_for = inputs.x
    ones = torch.ones(inputs.rows, 1, device="cuda")
    gates, one_hot = _gate_maps(four), _one_of_four(inputs.rows)

    def per_linear():
        inputs.next()
        for lw, lb in zip(base, single):
            for k, w in lw.items():
                ext.delta_linear_base(x_for(k), [w], None, ones, *lb[k].base_op_args())

    def merged_step(banks, weights=None, columns=True, per_layer=False):
        def step():
            inputs.next()
            for i, lw in enumerate(base):
                g = ones
                for j, group in enumerate(FUSED):
                    x, b = x_for(group[0]), banks[i][j]
                    if weights is not None and (j == 0 or not per_layer):
                        g = weights(x, gates[i][j]).contiguous()
                    bank = b.base_op_args() if columns else b.tensors()
                    ext.delta_linear_base(x, [lw[p] for p in group], None, g, *bank)
        return step

    picks = torch.arange(inputs.rows, device="cuda") % 4

    def picked_step():
        inputs.next()
        for lm, lb in zip(merged, four):
            for group, w, b in zip(FUSED, lm, lb):
                x = x_for(group[0])
                delta_linear(x, b, x @ w.T, index=picks)

    empty = [[_empty_bank(group) for group in FUSED]] * len(base)
    picked = {"fused_four_picks": time_graph(picked_step, repeats)} if inputs.rows > 1 else {}
    return picked | {"fused_empty": time_graph(merged_step(empty), repeats),
            "fused_per_linear": time_graph(per_linear, repeats),
            "fused_merged": time_graph(merged_step(fused), repeats),
            "fused_merged_rows": time_graph(merged_step(fused, columns=False), repeats),
            "fused_four_token": time_graph(merged_step(four, _token_gate), repeats),
            "fused_four_token_layer": time_graph(merged_step(four, _token_gate, per_layer=True), repeats),
            "fused_four_top2": time_graph(merged_step(four, _top2_gate), repeats),
            "fused_four_sentence": time_graph(merged_step(four, lambda x, g: one_hot), repeats),
            "fused_four_alone": time_graph(merged_step(_alone(four, 2)), repeats)}


def _clone(bank: DeltaBank) -> DeltaBank:
    """The same bank at new addresses."""
    tensors = {k: t.clone() for k, t in zip(TENSORS + COLUMN_TENSORS, bank.tensors() + bank.columns())}
    return DeltaBank(tensors | {"col_len": bank.col_len}, bank.in_features, bank.out_features, bank.num_deltas)


def _alone(banks: list[list[DeltaBank]], d: int) -> list[list[DeltaBank]]:
    """Each layer's banks' delta d as banks of one delta (made for the first layer, copied to new addresses)."""
    first = [b.alone(d) for b in banks[0]]
    return [first] + [[_clone(b) for b in first] for _ in banks[1:]]


def _same_bytes_rank(delta_bytes: int, layers: int) -> int:
    """fp16 LoRA rank whose factors over the seven shapes take the packed deltas' bytes."""
    per_rank = 2 * sum(m + n for m, n in SHAPES.values()) * layers
    return max(1, round(delta_bytes / per_rank))


def multi_tenant(layer, args, base_step: tuple[float, int] | None = None, tenants: int = 16) -> dict:
    """16 rows, each with its own delta (16 distinct copies), one launch per matrix vs 16 separate calls, and the
    base's step at 1 row in the same run (its bandwidth sets the byte floor): base_step, (ms, bytes), when the decode
    steps timed it, else timed here."""
    if base_step is None:
        base = base_weights(args.layers)
        base_step = (base_step_time(LayerInputs(1), base, args.repeats),
                     sum(w.numel() * w.element_size() for lw in base for w in lw.values()))
        del base
        torch.cuda.empty_cache()
    base_ms, base_bytes = base_step
    first = {k: DeltaBank.build([[layer[k]] * tenants]).to("cuda") for k in SHAPES}
    banks = [{k: _clone(b) for k, b in first.items()} for _ in range(args.layers)]
    first = {k: DeltaBank.build([[layer[k]]]).to("cuda") for k in SHAPES}
    one = [{k: _clone(b) for k, b in first.items()} for _ in range(args.layers * tenants)]
    inputs = LayerInputs(tenants)
    x_for = inputs.x
    index = torch.arange(tenants, device="cuda")

    def batched():
        inputs.next()
        for lw in banks:
            for k, b in lw.items():
                delta_linear(x_for(k), b, index=index)

    def separate():
        inputs.next()
        for layer_i in range(args.layers):
            for t in range(tenants):
                for k, b in one[layer_i * tenants + t].items():
                    delta_linear(x_for(k)[t:t + 1], b)

    def one_bank(k: str):  # one matrix's bank in every layer, alone (each shape once: q, gate, down)
        def run():
            inputs.next()
            for lw in banks:
                delta_linear(x_for(k), lw[k], index=index)
        return run

    bytes_used = sum(b.nbytes for lw in one for b in lw.values())
    by_bank = {k: {"ms": time_graph(one_bank(k), args.repeats, inner=1), "bytes": sum(lw[k].nbytes for lw in banks)}
               for k in ("q", "gate", "down")}
    return {"tenants": tenants, "bytes": bytes_used, "batched": time_graph(batched, args.repeats, inner=1),
            "separate": time_graph(separate, args.repeats, inner=1), "by_bank": by_bank, "base_ms": base_ms,
            "base_bytes": base_bytes}


def widths(args) -> dict:
    """Achieved bandwidth of one width at a time: eight 11008x4096 modules (4 bits per entry each, 180 MB in all),
    every vector at that width, 1 row."""
    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for bits in (2, 3, 4, 8):
        rank = round(4 * F * H / (bits * (F + H)))
        tensors, info = _uniform(F, H, rank, bits, g)
        first = DeltaBank.build([[packed_from_parts("w", tensors, info, (F, H))]]).to("cuda")
        banks = [_clone(first) for _ in range(8)]
        ms = _time_banks(banks, args.repeats)
        nbytes = sum(b.nbytes for b in banks)
        out[bits] = {"rank": rank, "bytes": nbytes, "ms": ms, "GBps": nbytes / ms / 1e6}
    return out


def eager_calls(args) -> dict:
    """Microseconds per eager call (no graph) at 1 row on a SmolLM2-sized layer (576x576, 2 bits): the base matmul,
    the dispatch point ``delta_linear`` (which calls the extension directly in inference) and the same call through
    the ``deltacomp::delta_linear`` custom op (what ``torch.compile`` traces): host time per call, which eager
    decoding pays at every adapted layer."""
    import time

    g = torch.Generator(device="cuda").manual_seed(0)
    tensors, info = _uniform(576, 576, 288, 2, g)
    bank = DeltaBank.build([[packed_from_parts("w", tensors, info, (576, 576))]]).to("cuda")
    x = torch.randn(1, 576, device="cuda", dtype=DT)
    w = torch.randn(576, 576, device="cuda", dtype=DT)
    ones = torch.ones(1, 1, device="cuda")
    calls = {"base matmul": lambda: x @ w.T, "delta_linear": lambda: delta_linear(x, bank, x),
             "custom op": lambda: torch.ops.deltacomp.delta_linear(x, x, ones, *bank.tensors(), 0)}
    out = {}
    with torch.no_grad():
        for name, fn in calls.items():
            for _ in range(100):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.repeats * 100):
                fn()
            torch.cuda.synchronize()
            out[name] = (time.perf_counter() - t0) / (args.repeats * 100) * 1e6
    return out


def _empty_bank(group: tuple) -> DeltaBank:
    """A bank of the group's projections without rank rows: the fused op's base product alone."""
    return DeltaBank.build([[None]] * len(group), out_features=[SHAPES[p][0] for p in group],
                           in_features=SHAPES[group[0]][1]).to("cuda")


def per_call(layer, args) -> dict:
    """Microseconds per call at 1 row for each merged group (q|k|v, o, gate|up, down), 32 copies at distinct
    addresses called in turn (one graph): the cuBLAS matmul, the fused op's base product alone (an empty bank), the
    delta op alone, the matmul then the delta op, and the fused op."""
    out = {}
    for group in FUSED:
        out["|".join(group)] = _group_calls(group, layer, args)
        torch.cuda.empty_cache()
    return out


def _group_calls(group: tuple, layer, args) -> dict:
    ext = native.extension()
    ones = torch.ones(1, 1, device="cuda")
    m, n = sum(SHAPES[p][0] for p in group), SHAPES[group[0]][1]
    ws = [[torch.randn(SHAPES[p][0], n, device="cuda", dtype=DT) * 0.02 for p in group] for _ in range(args.layers)]
    merged = [torch.cat(w) for w in ws]
    first = DeltaBank.build([[layer[p]] for p in group]).to("cuda")
    banks = [first] + [_clone(first) for _ in range(args.layers - 1)]
    empty = _empty_bank(group)
    step = Step(1, n)
    zeros = torch.zeros(1, m, device="cuda", dtype=DT)

    def calls(fn):
        def run():
            x = step.next()
            for i in range(args.layers):
                fn(x, i)
        return time_graph(run, args.repeats) * 1e3 / args.layers

    t = {"cublas": calls(lambda x, i: x @ merged[i].T),
         "fused_empty": calls(lambda x, i: ext.delta_linear_base(x, ws[i], None, ones, *empty.tensors())),
         "delta": calls(lambda x, i: ext.delta_linear(x, zeros, ones, *banks[i].tensors(), 0)),
         "matmul_then_delta": calls(lambda x, i: ext.delta_linear(x, x @ merged[i].T, ones, *banks[i].tensors(), 0)),
         "fused_rows": calls(lambda x, i: ext.delta_linear_base(x, ws[i], None, ones, *banks[i].tensors())),
         "fused": calls(lambda x, i: ext.delta_linear_base(x, ws[i], None, ones, *banks[i].base_op_args()))}
    t.update(base_bytes=m * n * 2, delta_bytes=first.nbytes)
    return t


def _time_banks(banks: list[DeltaBank], repeats: int) -> float:
    step = Step(1, H)

    def run():
        x = step.next()
        for b in banks:
            delta_linear(x, b)

    return time_graph(run, repeats, inner=2)


def _uniform(m: int, n: int, rank: int, bits: int, g: torch.Generator):
    """Stored tensors of one bit group of random codes (on the GPU)."""
    def param(value):
        return torch.full((rank, 1), value, dtype=torch.float16, device="cuda")

    t = {"g0.u": packing.pack(torch.randint(0, 1 << bits, (rank, m), generator=g, device="cuda"), bits),
         "g0.v": packing.pack(torch.randint(0, 1 << bits, (rank, n), generator=g, device="cuda"), bits),
         "g0.u_scale": param(1e-2), "g0.u_offset": param(-1e-2 * (1 << bits) / 2),
         "g0.v_scale": param(1e-2), "g0.v_offset": param(-1e-2 * (1 << bits) / 2),
         "g0.s": torch.rand(rank, generator=g, device="cuda").half()}
    return t, {"group_size": 0, "groups": [{"bits": bits, "rank": rank}]}


def render(res: dict) -> str:
    lines = [f"kernel path: {res['kernel_path']}"]
    if res["rows"]:
        lines += _step_tables(res)
    if res.get("widths"):
        lines += ["", format_table(["bits", "rank", "MB", "ms", "GB/s"],
                                   [[b, w["rank"], f"{w['bytes'] / 1e6:.1f}", f"{w['ms']:.3f}", f"{w['GBps']:.0f}"]
                                    for b, w in res["widths"].items()])]
    if res.get("eager_us"):
        lines += ["", "eager call, 1 row, 576x576 (us per call, host-bound): " +
                  ", ".join(f"{k} {v:.1f}" for k, v in res["eager_us"].items())]
    if res.get("calls"):
        rows = []
        for group, t in res["calls"].items():
            gbps = {k: (t["base_bytes"] + (t["delta_bytes"] if k != "fused_empty" else 0)) / t[k] / 1e3
                    for k in ("fused_empty", "fused")}
            rows.append([group, f"{t['cublas']:.1f} ({t['base_bytes'] / t['cublas'] / 1e3:.0f} GB/s)",
                         f"{t['fused_empty']:.1f} ({gbps['fused_empty']:.0f} GB/s)", f"{t['delta']:.1f}",
                         f"{t['matmul_then_delta']:.1f}", f"{t.get('fused_rows', float('nan')):.1f}",
                         f"{t['fused']:.1f} ({gbps['fused']:.0f} GB/s)", f"{t['fused'] / t['cublas']:.2f}x"])
        lines += ["", "one call at 1 row, microseconds (32 copies called in turn):",
                  format_table(["group", "cuBLAS matmul", "fused, empty bank", "delta op alone",
                                "matmul then delta op", "fused op, U by row", "fused op", "fused / matmul"], rows)]
    if "multi_tenant" in res:
        mt = res["multi_tenant"]
        lines += ["", f"multi-tenant: {mt['tenants']} rows, each its own delta ({mt['bytes'] / 1e9:.2f} GB): one "
                  f"launch per matrix {mt['batched']:.3f} ms; {mt['tenants']} separate calls {mt['separate']:.3f} ms"]
        if "base_ms" in mt or res["rows"]:  # (results written before the part timed its base: the decode step's)
            base_ms, base_bytes = ((mt["base_ms"], mt["base_bytes"]) if "base_ms" in mt else
                                   (res["rows"][min(res["rows"])]["base"], res["base_bytes"]))
            def floor(nbytes: float) -> float:  # ms at the base's bandwidth
                return nbytes * base_ms / base_bytes

            lines[-1] += (f" ({mt['batched'] / floor(mt['bytes']):.2f}x the byte floor at the base's bandwidth, "
                          f"{floor(mt['bytes']):.3f} ms)")
            if mt.get("by_bank"):
                lines += ["one matrix's banks alone (every layer): " + "; ".join(
                    f"{k} {b['ms']:.3f} ms ({b['ms'] / floor(b['bytes']):.2f}x its floor)"
                    for k, b in mt["by_bank"].items())]
    return "\n".join(lines)


def _step_tables(res: dict) -> list[str]:
    lines = [f"packed deltas {res['delta_bytes'] / 1e9:.3f} GB, base {res['base_bytes'] / 1e9:.2f} GB", ""]
    rows = []
    for n, r in res["rows"].items():
        base_bw = res["base_bytes"] / r["base"] / 1e6
        bw = res["delta_bytes"] / r["delta"] / 1e6
        bwf = res["delta_bytes"] / r["delta_fused"] / 1e6
        rows.append([n, f"{r['base']:.3f}", f"{r['delta']:.3f} ({bw:.0f} GB/s, {bw / base_bw:.0%})",
                     f"{r['delta_fused']:.3f} ({bwf:.0f} GB/s, {bwf / base_bw:.0%})",
                     f"{r['dense_delta'] / r['delta_fused']:.1f}x",
                     f"{r['lora16']:.3f}", f"{r['lora_same_bytes']:.3f}",
                     f"{r['base+delta']:.3f} ({r['base+delta'] / r['base']:.3f}x)"])
    lines.append(format_table(
        ["rows", "base ms", "delta ms, 7 launches/layer (bw, % of base bw)", "delta ms, 4 fused/layer",
         "dense bf16 delta / fused", "LoRA r16 ms", f"LoRA r{res['lora_same_bytes_rank']} ms", "base+delta ms"],
        rows))
    if "beside" in next(iter(res["rows"].values())):
        lines += ["", "deltas beside the base (side stream; ratio to the base step of the same layout):"]
        rows = [[n, f"{r['beside']:.3f} ({r['beside'] / r['base']:.3f}x)", f"{r['base_merged']:.3f}",
                 *[f"{r[k]:.3f} ({r[k] / r['base_merged']:.3f}x)"
                   for k in ("merged_beside_fused", "four_token", "four_top2", "four_sentence")]]
                for n, r in res["rows"].items()]
        lines.append(format_table(["rows", "base + delta beside, 7/layer", "merged base ms", "+ fused delta beside",
                                   "+ 4 deltas, token gate", "+ 4 deltas, top-2", "+ 1 of 4 (sentence)"], rows))
    if "fused_merged" in next(iter(res["rows"].values())):
        lines += ["", "base product in the fused op (delta_linear_base; ratio to the base step of the same "
                  "layout; the delta's bandwidth: its bytes over the time it adds, as a share of the base's; "
                  "empty banks: the kernels' base product alone):"]
        rows = []
        for n, r in res["rows"].items():
            extra = r["fused_merged"] - r["base_merged"]
            bw = res["delta_bytes"] / extra / 1e6 if extra > 0 else float("inf")
            base_bw = res["base_bytes"] / r["base_merged"] / 1e6
            rows.append([n, f"{r['fused_per_linear']:.3f} ({r['fused_per_linear'] / r['base']:.3f}x)",
                         *[f"{r[k]:.3f} ({r[k] / r['base_merged']:.3f}x)" if k in r else "-"
                           for k in ("fused_empty", "fused_merged_rows", "fused_merged", "fused_four_token",
                                     "fused_four_token_layer", "fused_four_top2", "fused_four_sentence",
                                     "fused_four_alone", "fused_four_picks")],
                         f"{bw:.0f} GB/s ({bw / base_bw:.0%})"])
        lines.append(format_table(["rows", "base + delta, 7/layer", "merged, empty banks",
                                   "merged base + fused delta, U by row", "merged base + fused delta",
                                   "+ 4 deltas, token gate", "+ 4 deltas, one gate a layer", "+ 4 deltas, top-2",
                                   "+ 1 of 4 (sentence)", "+ 1 of 4, alone", "+ 1 of 4 a row, base then multi-tenant",
                                   "delta's added time as bandwidth"],
                                  rows))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--bits", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--parts", default="widths,tenants", help="Tables after the decode steps: widths, "
                    "tenants, eager, calls.")
    ap.add_argument("--render", default=None, help="Print the tables of a JSON written by an earlier run.")
    args = ap.parse_args()
    if args.render:
        res = json.loads(Path(args.render).read_text())
        res["rows"] = {int(k): v for k, v in res["rows"].items()}
        print(render(res))
        return
    args.rows = [int(r) for r in args.rows.split(",") if r]  # --rows "": only the --parts tables
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    print(render(bench(args)))


if __name__ == "__main__":
    main()
