"""Write a delta package as a PEFT LoRA adapter that PEFT, vLLM and LoRAX load.

Files: ``adapter_config.json``, ``adapter_model.safetensors`` and a ``README.md`` card. Each compressed
matrix becomes ``lora_B (out, r) @ lora_A (r, in)`` (dequantized factors, sqrt(S) on each side) with
``lora_alpha = r`` so the scale is 1; per-module ranks go to ``rank_pattern`` with equal ``alpha_pattern``.
Full-rank methods (bitdelta, dense) have no factors: their reconstruction is cut to a truncated SVD at
``--max-rank`` (64 when not given), with a warning that says how much of the delta it keeps.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from deltacomp.errors import DeltacompError
from deltacomp.export.adapter_plan import AdapterPlan, is_embedding_like, plan_adapter
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.io.output import atomic_dir, check_output
from deltacomp.io.safetensors_file import DTYPES, SafetensorsWriter
from deltacomp.lowrank.lora import truncate
from deltacomp.methods.base import get_method
from deltacomp.package.reader import check_base, stored_weight
from deltacomp.package.store import DeltaPackage

log = logging.getLogger(__name__)

TARGETS = ("peft", "vllm")
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig accepts these --max-lora-rank values
FULL_RANK_DEFAULT = 64
ADAPTER_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
          ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


@dataclass(frozen=True)
class PeftExportConfig:
    max_rank: int | None = None  # cap on every module's rank (truncated SVD of its factors)
    target: str = "peft"  # peft | vllm (rank capped at 512, LoRA factors only)
    dtype: str = "auto"  # adapter tensors: auto (each weight's own dtype) | float32 | float16 | bfloat16
    modules_to_save: bool = True  # export changed tensors outside the compressed layers as full modules

    def __post_init__(self):
        if self.target not in TARGETS:
            raise DeltacompError(f"unknown --target {self.target!r}; choose from {', '.join(TARGETS)}")
        if self.dtype not in ADAPTER_DTYPES:
            raise DeltacompError(f"unknown --dtype {self.dtype!r}; choose from {', '.join(ADAPTER_DTYPES)}")
        if self.max_rank is not None and self.max_rank < 1:
            raise DeltacompError(f"--max-rank must be a positive rank, got {self.max_rank}")
        if self.target == "vllm" and self.max_rank is not None and self.max_rank > VLLM_MAX_RANKS[-1]:
            raise DeltacompError(f"--max-rank {self.max_rank} is above what vLLM serves ({VLLM_MAX_RANKS[-1]})")

    @property
    def rank_cap(self) -> int | None:
        if self.target == "vllm":
            return min(self.max_rank or VLLM_MAX_RANKS[-1], VLLM_MAX_RANKS[-1])
        return self.max_rank


def task_type(model_config: dict) -> str | None:
    """PEFT's task type for a transformers config: CAUSAL_LM for ``*ForCausalLM``, FEATURE_EXTRACTION for a
    bare ``*Model`` such as BertModel (CAUSAL_LM would make PEFT fail on an encoder), None when unknown."""
    for arch in model_config.get("architectures") or []:
        for suffix, task in _TASKS:
            if arch.endswith(suffix):
                return task
        if arch.endswith("Model"):
            return "FEATURE_EXTRACTION"
    return None


def vllm_rank(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that serves an adapter of rank ``r``."""
    return next(x for x in VLLM_MAX_RANKS if x >= r)


def _model_config(pkg: DeltaPackage, base: Checkpoint | None) -> dict:
    path = pkg.path / "model" / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            log.warning("%s: unreadable; the adapter's task type is left out", path)
    return dict(base.config) if base is not None else {}


def _warn_dropped(plan: AdapterPlan) -> None:
    def names(items):
        shown = ", ".join(items[:12])
        return shown + (f" and {len(items) - 12} more" if len(items) > 12 else "")

    groups: dict[str, list[str]] = {}
    for name, why in plan.dropped:
        groups.setdefault(why, []).append(name)
    for why, items in groups.items():
        log.warning("dropped %d tensor(s), %s: %s; the adapter does not reproduce their change",
                    len(items), why, names(items))


def _factors(pkg: DeltaPackage, name: str, cap: int | None) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
    """LoRA factors of one compressed module: B (m, r), A (r, n), the energy they keep, and if they were cut."""
    rec = pkg.modules[name]
    method, shape, info = get_method(rec["method"]), tuple(rec["shape"]), rec["info"]
    parts = pkg.parts(name)
    if method.exact_factors:
        b, a = method.factors(parts, info, shape)
        if cap is not None and a.shape[0] > cap:
            b, a, kept = truncate(b, a, cap)
            return b, a, kept, True
        return b, a, 1.0, False
    rank = min(cap or FULL_RANK_DEFAULT, *shape)
    full = method.reconstruct(parts, info, shape)  # (m, n)
    b, a = method.factors(parts, info, shape, rank)
    total = float(full.double().pow(2).sum())
    kept = float(((b.T @ b) * (a @ a.T)).double().sum()) / total if total > 0 else 1.0  # ||B A||^2 / ||delta||^2
    return b, a, kept, True


def _module_params(base: Checkpoint) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key in base.keys():
        out.setdefault(key.rpartition(".")[0], []).append(key)
    return out


def _target_modules(lora: list[str], saved: list[str], base_modules: dict[str, list[str]] | None) -> list[str]:
    """Leaf names (``q_proj``) when they select exactly the adapter's modules in the base; else full paths."""
    if base_modules is None:
        return sorted(lora)
    leaves = {m.rpartition(".")[2] for m in lora}
    selected = {m for m in base_modules if m.rpartition(".")[2] in leaves and m not in saved}
    return sorted(leaves) if selected == set(lora) else sorted(lora)


def _check_saved_names(saved: list[str], base_modules: dict[str, list[str]]) -> None:
    """PEFT wraps every module whose name ends with a ``modules_to_save`` entry: refuse ambiguous entries."""
    for m in saved:
        clash = [o for o in base_modules if o != m and (PREFIX + o).endswith(m)]
        if clash:
            raise DeltacompError(f"modules_to_save entry {m!r} would also select {clash[0]!r} in PEFT; "
                                 "export with --no-modules-to-save or --format merged")


def export_peft(package: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None,
                config: PeftExportConfig = PeftExportConfig(), overwrite: bool = False,
                progress: bool | None = None) -> dict:
    """Write ``package`` as a PEFT LoRA adapter folder ``out``; return a summary of what went where.

    ``base`` (folder or Hub id) is needed when the package changes tensors outside its compressed
    layers: biases of the LoRA targets become deltas and other modules are saved whole.
    """
    pkg = DeltaPackage(package)
    plan = plan_adapter(pkg.modules, config.modules_to_save, lora_only=config.target == "vllm")
    if not plan.lora and not plan.save:
        raise DeltacompError(f"{package}: the package changes nothing a LoRA adapter can carry")
    needed = plan.needs_base()
    if needed and base is None:
        raise DeltacompError(
            f"{len(needed)} changed tensor(s) outside the compressed layers (e.g. {needed[0]}) need the base "
            "weights: pass --base BASE (or --no-modules-to-save to leave full modules out)"
        )
    ckpt = Checkpoint(base) if base is not None else None
    if ckpt is not None:
        check_base(pkg, ckpt)
    inputs = (pkg.path, *([ckpt.path] if ckpt is not None else []))
    check_output(out, overwrite, "adapter", inputs)
    _warn_dropped(plan)
    for name in plan.ignored:
        log.info("%s: a buffer the fine-tune removed; ignored", name)
    base_modules = _module_params(ckpt) if ckpt is not None else None
    saved = sorted(plan.save)
    if base_modules is not None:
        _check_saved_names(saved, base_modules)

    cap, dtype = config.rank_cap, ADAPTER_DTYPES[config.dtype]
    ranks: dict[str, int] = {}
    cut: dict[str, float] = {}
    full_rank: set[str] = set()
    with atomic_dir(out, overwrite, "adapter", inputs) as tmp:
        writer = SafetensorsWriter(tmp / WEIGHTS_FILE, {"exported_by": "deltacomp"})
        bar = tqdm(plan.lora.items(), total=len(plan.lora), desc="export", unit="module",
                   disable=progress is False if progress is not None else None)
        for module, name in bar:
            rec = pkg.modules[name]
            out_dtype = dtype or DTYPES[rec["dtype"]]
            b, a, kept, was_cut = _factors(pkg, name, cap)  # (m, r), (r, n)
            if not get_method(rec["method"]).exact_factors:
                full_rank.add(rec["method"])
            if was_cut:
                cut[module] = kept
            ranks[module] = a.shape[0]
            writer.add(f"{PREFIX}{module}.lora_A.weight", a.to(out_dtype).contiguous())
            writer.add(f"{PREFIX}{module}.lora_B.weight", b.to(out_dtype).contiguous())
        if plan.bias:
            for module in plan.lora:  # with lora_bias every lora_B has a bias: zeros where nothing changed
                name = plan.bias.get(module)
                if name is not None:
                    ft = stored_weight(pkg, name, ckpt)
                    bias = (ft.float() - ckpt.read(name).float()).to(dtype or ft.dtype)
                else:
                    rec = pkg.modules[plan.lora[module]]
                    bias = torch.zeros(rec["shape"][0], dtype=dtype or DTYPES[rec["dtype"]])
                writer.add(f"{PREFIX}{module}.lora_B.bias", bias)
        for module in saved:
            params = base_modules.get(module, [])
            missing = sorted(plan.save[module] - set(params))
            if missing:
                raise DeltacompError(f"{missing[0]}: changed by the package but not in the base {ckpt.source}")
            for key in params:
                t = stored_weight(pkg, key, ckpt) if key in plan.save[module] else ckpt.read(key)
                writer.add(PREFIX + key, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
        writer.close()

        model_config = _model_config(pkg, ckpt)
        r = max(ranks.values(), default=1)
        adapter_config = _adapter_config(pkg, model_config, r, ranks, saved, plan, base_modules)
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
        summary = {
            "path": str(out), "target": config.target, "r": r, "modules": len(ranks),
            "ranks": ranks, "modules_to_save": saved, "bias_deltas": sorted(plan.bias),
            "dropped": [n for n, _ in plan.dropped], "truncated": cut,
            "min_kept_energy": min(cut.values(), default=1.0), "task_type": adapter_config["task_type"],
            "base_model": adapter_config["base_model_name_or_path"],
            "bytes": (tmp / WEIGHTS_FILE).stat().st_size,
        }
        (tmp / "README.md").write_text(render_adapter_card(summary, pkg.manifest))
    if full_rank:
        log.warning("method %s stores full-rank deltas; exported their truncated SVD at rank <= %d, keeping "
                    "%.1f%% (worst module) of the delta's energy (choose the rank with --max-rank)",
                    ", ".join(sorted(full_rank)), cap or FULL_RANK_DEFAULT, 100 * summary["min_kept_energy"])
    elif cut:
        log.warning("cut %d module(s) to rank %d; the worst keeps %.1f%% of its delta's energy",
                    len(cut), cap, 100 * summary["min_kept_energy"])
    return summary


def _adapter_config(pkg, model_config, r, ranks, saved, plan, base_modules) -> dict:
    base = pkg.manifest["base"]
    task = task_type(model_config)
    tied = (bool(model_config.get("tie_word_embeddings")) and task in ("CAUSAL_LM", "SEQ_2_SEQ_LM")
            and any(is_embedding_like(m) and "position" not in m for m in saved))
    pattern = {m: k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base.get("repo_id") or base.get("source"),
        "revision": base.get("revision"),
        "r": r,
        "lora_alpha": r,  # scale lora_alpha / r = 1: B @ A is the delta itself
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": _target_modules(list(ranks), saved, base_modules),
        "modules_to_save": saved or None,
        "ensure_weight_tying": tied,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": bool(plan.bias),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def render_adapter_card(summary: dict, manifest: dict) -> str:
    base_id = summary["base_model"]
    auto = "AutoModelForCausalLM" if summary["task_type"] == "CAUSAL_LM" else "AutoModel"
    lines = ["---", f"base_model: {base_id}", "library_name: peft", "tags:", "- deltacomp", "- lora", "---", "",
             "# LoRA adapter exported from a deltacomp package", "",
             f"Exported with deltacomp {manifest['deltacomp_version']} from a `{manifest['method']}` package "
             f"({manifest['budget']['bits_per_entry']:g} bits per entry); the factors are the package's "
             "dequantized factors, sqrt(S) on each side, `lora_alpha = r` (scale 1).", "",
             "| | |", "|---|---|",
             f"| LoRA modules | {summary['modules']} (rank <= {summary['r']}) |",
             f"| full modules (modules_to_save) | {len(summary['modules_to_save'])} |",
             f"| bias deltas (lora_bias) | {len(summary['bias_deltas'])} |",
             f"| target | {summary['target']} |"]
    if summary["truncated"]:
        lines.append(f"| rank-cut modules | {len(summary['truncated'])} (worst keeps "
                     f"{100 * summary['min_kept_energy']:.1f}% of its delta energy) |")
    if summary["dropped"]:
        lines.append(f"| dropped tensors | {', '.join(summary['dropped'][:8])}"
                     f"{' ...' if len(summary['dropped']) > 8 else ''} |")
    lines += ["", "## Use", "", "```python", f"from transformers import {auto}", "from peft import PeftModel", "",
              f'base = {auto}.from_pretrained("{base_id}")', 'model = PeftModel.from_pretrained(base, "ADAPTER")',
              "```", ""]
    if summary["target"] == "vllm":
        lines += ["```bash", f"vllm serve {base_id} --enable-lora --max-lora-rank {vllm_rank(summary['r'])} "
                  "--lora-modules delta=ADAPTER", "```", ""]
    return "\n".join(lines)
