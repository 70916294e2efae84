"""Decide where each tensor of a package goes in a LoRA adapter, from the manifest alone (and the base's names).

    compressed weight of module M      -> LoRA factors on M (a target module); of an embedding table or head
                                          (or stored row-sparse): M under ``modules_to_save``, rebuilt
    changed bias of a target module M  -> ``lora_B.bias`` of M (the delta; the config then sets ``lora_bias``)
    any other changed tensor of M      -> M under ``modules_to_save``: M's full state (fine-tuned values for
                                          what changed, the base's for the rest)
    removed non-float buffer           -> ignored (an index buffer such as ``position_ids``)

What an adapter cannot express (a new tensor, a resized vocabulary, a removed weight, a non-bias tensor
beside a compressed weight) is refused with the names, unless the target drops it with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from deltacomp.errors import DeltacompError
from deltacomp.io.safetensors_file import DTYPES

log = logging.getLogger(__name__)

_EMBEDDING_LEAVES = ("embed", "lm_head", "wte", "wpe", "shared", "embed_out")


def split_name(name: str) -> tuple[str, str]:
    """``a.b.weight`` -> (``a.b``, ``weight``)."""
    module, _, param = name.rpartition(".")
    if not module:
        raise DeltacompError(f"{name}: a tensor outside any module cannot go into a LoRA adapter")
    return module, param


def is_embedding_like(module: str) -> bool:
    """An embedding table or output head, judged by the module's own name (``model.embed_tokens``, ``lm_head``,
    ``embeddings.word_embeddings``, ``transformer.wte``), not by a parent's (``embeddings.LayerNorm`` is not)."""
    leaf = module.rpartition(".")[2]
    return any(w in leaf for w in _EMBEDDING_LEAVES)


@dataclass
class AdapterPlan:
    lora: dict[str, str] = field(default_factory=dict)  # target module -> its compressed tensor name
    bias: dict[str, str] = field(default_factory=dict)  # target module -> its changed bias tensor name
    save: dict[str, set[str]] = field(default_factory=dict)  # module -> names of its changed tensors
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (tensor name, why)
    ignored: list[str] = field(default_factory=list)

    def needs_base(self) -> list[str]:
        """Tensor names whose export needs the base weights (bias deltas, full states of saved modules)."""
        return sorted(self.bias.values()) + sorted(n for names in self.save.values() for n in names)


def plan_adapter(modules: dict[str, dict], full_modules: bool = True, lora_only: bool = False) -> AdapterPlan:
    """Sort the manifest's ``modules`` records into an :class:`AdapterPlan`.

    ``full_modules=False`` drops everything that would go under ``modules_to_save``; ``lora_only`` (a
    vLLM export) also drops bias deltas and anything else that is not a LoRA factor.
    """
    plan = AdapterPlan()
    refused: list[str] = []
    for name, rec in modules.items():
        if rec["action"] != "compress":
            continue
        module, param = split_name(name)
        if is_embedding_like(module) or "rows" in rec:
            continue  # a token table: its rebuilt weight goes where a stored one would (below)
        if param != "weight" or len(rec["shape"]) != 2:
            refused.append(f"{name} (compressed, but not the 2-D weight of a linear layer)")
            continue
        plan.lora[module] = name
    for name, rec in modules.items():
        action = rec["action"]
        if action == "compress" and plan.lora.get(split_name(name)[0]) == name:
            continue
        module, param = split_name(name)
        if action == "removed":
            if DTYPES[rec["dtype"]].is_floating_point:
                plan.dropped.append((name, "removed by the fine-tune; an adapter cannot remove a base weight"))
            else:
                plan.ignored.append(name)
            continue
        if module in plan.lora:
            if param == "bias" and action == "exact":
                if lora_only:
                    plan.dropped.append((name, "bias delta (vLLM loads LoRA factors only)"))
                else:
                    plan.bias[module] = name
            else:
                refused.append(f"{name} ({action} beside the compressed {plan.lora[module]})")
            continue
        why = {"added": "a tensor the base does not have", "resized": "a resized vocabulary"}.get(action)
        if lora_only:
            kind = "full embedding/lm_head tensor" if is_embedding_like(module) else "full tensor"
            plan.dropped.append((name, f"{kind} (vLLM rejects modules_to_save)" + (f"; {why}" if why else "")))
        elif why:
            refused.append(f"{name} ({why})")
        elif not full_modules:
            plan.dropped.append((name, "full tensor (--no-modules-to-save)"))
        else:
            plan.save.setdefault(module, set()).add(name)
    for module in plan.save:
        inner = [t for t in plan.lora if t.startswith(module + ".")]
        if inner:
            refused.append(f"{module} (its changed tensors would go under modules_to_save, which would hide the "
                           f"LoRA target {inner[0]} inside it)")
    if refused:
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise DeltacompError(
            "a PEFT LoRA adapter cannot express " + "; ".join(refused[:3]) + more
            + " (use --format merged for a full checkpoint)"
        )
    return plan
