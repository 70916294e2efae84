"""Mixed precision (Delta-CoMe style): SVD, then more bits for singular vectors with larger singular values."""

from __future__ import annotations

import torch

from deltacomp.calib.context import MatrixContext
from deltacomp.config import EXCITATION_POWER, NOISE_WEIGHT, CompressConfig
from deltacomp.errors import BudgetError
from deltacomp.lowrank.lora import balance
from deltacomp.lowrank.svd import svd
from deltacomp.methods.base import Compressed, Method, info_int, register, stored_bits
from deltacomp.quant import allocate, factors, packing, rtn
from deltacomp.quant.budget import BitGroup, budget_bits, fill_schedule, overhead_bits, vector_cost
from deltacomp.quant.packed import packed_from_parts
from deltacomp.stages import stage

# ``--allocation auto`` is the optimal allocation; it weighs rounding noise at NOISE_WEIGHT of a dropped vector's
# error (deltacomp.quant.allocate). Measured by function (BENCHMARKS.md, "The noise weight"): on four
# SmolLM2-135M fine-tunes this kept the answers closer to the fine-tune than the plain reference on 3 of 4 at 1 bit,
# 2 of 4 at 0.5 and 4 of 4 at 0.25 (geometric mean of the answer KL 0.61x, 1.07x, 0.38x the reference's), where the
# weight-error allocation (noise weight 1) lost on 3 or 4 of the 4 at every budget.


def noise_weight(config: CompressConfig) -> float:
    """``--noise-weight``, or its default :data:`NOISE_WEIGHT` (calibrated or not)."""
    return config.noise_weight if config.noise_weight is not None else NOISE_WEIGHT


def excitation_power(config: CompressConfig) -> float:
    """``--excitation-power``, or its default :data:`EXCITATION_POWER` (read only where no calibration weighs the
    allocation)."""
    return config.excitation_power if config.excitation_power is not None else EXCITATION_POWER


@register("mixed")
class Mixed(Method):
    exact_factors = True
    uses = frozenset({"calib", "budget_scope", "budget", "allocation", "vector_range", "noise_weight", "tune",
                      "excitation_power", "vocab_weights"})
    auto = {"allocation": "optimal"}

    @staticmethod
    def overhead(shape: tuple[int, int], config: CompressConfig, group_size: int) -> int:
        """Bits each vector pair costs besides its codes under ``--budget all-in`` (0 under ``factors``)."""
        return overhead_bits(shape[0], shape[1], group_size) if config.budget == "all-in" else 0

    def schedule_groups(self, shape: tuple[int, int], config: CompressConfig,
                        group_size: int | None = None) -> list[BitGroup]:
        """The fixed ``--schedule`` filled under the budget of one ``shape`` matrix."""
        gs = config.group_size if group_size is None else group_size
        return fill_schedule(shape[0], shape[1], config.bits, config.schedule, self.overhead(shape, config, gs))

    @staticmethod
    def hessians(config: CompressConfig, h: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The calibration Hessian ``h`` as the allocation and as the rounding (GPTQ) use it under ``--calib-use``
        (None: as without calibration)."""
        return (h if config.calib_use != "rounding" else None), (h if config.calib_use != "allocation" else None)

    def candidates(self, delta: torch.Tensor, config: CompressConfig, h: torch.Tensor | None = None,
                   share: float = 1.0) -> allocate.Candidates:
        """What ``--allocation optimal`` chooses from for ``delta (m, n)``, calibrated by ``h (n, n)`` if given;
        ``share`` > 1 keeps more vectors than the matrix's own budget affords (the model-scope first pass)."""
        h_alloc, h_round = self.hessians(config, h)
        group_size = config.gptq_group_size if h_round is not None else config.group_size
        return allocate.candidates(delta, config.bits, config.widths, group_size, h_alloc,
                                   (config.act_order, config.damp) if h_round is not None else None,
                                   self.overhead(delta.shape, config, group_size), share, config.device, config.svd,
                                   config.vector_range == "mse", noise_weight(config), excitation_power(config))

    def check_budget(self, shape, config):
        config = self.resolve(config)
        if config.allocation == "schedule":
            self.schedule_groups(shape, config)
        elif config.budget_scope == "matrix":
            m, n = shape
            extra = self.overhead(shape, config, config.group_size)
            need = min(vector_cost(bu, m, n, bv, extra) for bu, bv in config.widths)
            if need > budget_bits(m, n, config.bits):
                raise BudgetError(
                    f"a budget of {config.bits:g} bits per entry is too small for one singular vector of a {m}x{n} "
                    f"matrix at the cheapest allocation width (needs at least {need / (m * n):.4g})"
                )

    def compress(self, delta: torch.Tensor, config: CompressConfig, context: MatrixContext | None = None) -> Compressed:
        """``context``: its ``hessian`` (n, n) turns round-to-nearest into GPTQ; its ``plan`` gives the factors and
        widths of a model-scope allocation, or, with a sequential ``target``, only the matrix's share of the budget
        (the target delta is not the one the plan's factors came from: its vectors are chosen again)."""
        config = self.resolve(config)
        h = context.hessian if context is not None else None
        h_round = self.hessians(config, h)[1]
        plan = context.plan if context is not None else None
        w = context.row_weight if context is not None and plan is None else None
        m, n = delta.shape
        chosen_for = delta if w is None else delta * w.to(delta.device, torch.float32)[:, None]  # (m, n)
        group_size = config.gptq_group_size if h_round is not None else config.group_size
        allocated = None
        retargeted = context is not None and context.target is not None  # a sequential fit: not the plan's delta
        if plan is not None and not retargeted:
            u, s, v, bits = plan.u, plan.s, plan.v, plan.widths  # (m, r), (r,), (n, r), (r, 2)
        elif config.allocation == "optimal":
            allocated = self.candidates(chosen_for, config, h)
            u, s, v = allocated.u, allocated.s, allocated.v
            budget = plan.budget if plan is not None else budget_bits(m, n, config.bits)
            bits = allocate.choose(allocated, config.widths, budget)
        else:
            sched = self.schedule_groups((m, n), config, group_size)
            u, s, v = svd(chosen_for, sum(g.rank for g in sched), config.device, config.svd)
            bits = torch.cat([torch.full((g.rank,), g.bits, dtype=torch.long) for g in sched])
        order, runs = allocate.group_by_bits(bits)
        clip = config.vector_range == "mse"
        order = order.to(u.device)
        # V as the allocation quantized it, where it quantized as the factors do: not again
        reuse = allocated is not None and allocated.v_gptq == (h_round is not None)
        v_rows = (allocated.v_rows, order) if reuse else None
        u, s, v = u[:, order], s[order], v[:, order]
        if w is not None:  # the vectors were chosen under the weights; U S is the plain delta's on them
            u, s = factors.unit_columns(delta.to(v.device) @ v)  # (m, r), (r,)
        groups = [BitGroup(bu, k, bv) for (bu, bv), k in runs]
        delta = delta.to(u.device)
        fg = factors.quantize(delta, u, s, v, groups, group_size, config.refit, h_round, config.act_order, config.damp,
                              clip=clip, v_rows=v_rows)
        with stage("pack"):
            tensors = {k: t.cpu() for k, t in factors.to_tensors(fg).items()}
        factor_bits = sum(stored_bits(t) for k, t in tensors.items() if k.endswith((".u", ".v")))
        info = {
            "rank": sum(g.rank for g in groups),
            "groups": [{"bits": g.bits, "rank": g.rank, **({"v_bits": g.v_bits} if g.v_bits != g.bits else {})}
                       for g in groups],
            "group_size": group_size,
            "allocation": config.allocation,
            "calibrated": h is not None,
        }
        return Compressed(tensors, info, factor_bits, sum(stored_bits(t) for t in tensors.values()))

    def layout(self, info, shape):
        m, n = shape
        gs = info_int(info, "group_size", 0, 1 << 31)
        groups = info.get("groups")
        if not isinstance(groups, list) or not groups:
            raise ValueError(f"groups: must be a non-empty list, got {groups!r}")
        out, total = {}, 0
        for i, g in enumerate(groups):
            at = f"groups[{i}]."
            r = info_int(g, "rank", 1, min(m, n), at)
            widths = [info_int(g, "bits", 1, 8, at)]
            if "v_bits" in g:
                widths.append(info_int(g, "v_bits", 1, 8, at))
            for key, b in zip(("bits", "v_bits"), widths):
                if b not in packing.SUPPORTED_BITS:
                    raise ValueError(f"{at}{key}: {b} is not a supported width {packing.SUPPORTED_BITS}")
            bu, bv = widths[0], widths[-1]
            for side, length, b in (("u", m, bu), ("v", n, bv)):
                out[f"g{i}.{side}"] = ((r, packing.packed_words(length, b)), (torch.int32,))
                for part in ("scale", "offset"):
                    out[f"g{i}.{side}_{part}"] = ((r, rtn.num_groups(length, gs)), (torch.float16,))
            out[f"g{i}.s"] = ((r,), (torch.float16, torch.float32))
            total += r
        if info_int(info, "rank", 1, min(m, n)) != total:
            raise ValueError(f"rank: {info['rank']} is not the sum of the groups' ranks ({total})")
        return out

    def reconstruct(self, tensors, info, shape):
        return packed_from_parts(self.name, tensors, info, shape).dense()

    def factors(self, tensors, info, shape, max_rank=None):
        """B (m, r), A (r, n) of the dequantized groups; sqrt(|S|) on each side, the sign of S on B."""
        u, s, v = packed_from_parts(self.name, tensors, info, shape).factors()
        return balance(u, s, v)  # S may be negative after the least-squares refit
