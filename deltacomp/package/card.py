"""The package's README.md model card, with Hub metadata (``base_model``, ``library_name``, tags)."""

from __future__ import annotations

import json
import math
from pathlib import Path

EVAL_FILE = "eval.json"
# eval row keys shown in the card's quality table, in this order, with their column titles and formats
_EVAL_COLUMNS = (
    ("factor_bits_per_entry", "bits/entry", ".3f"), ("all_in_bits_per_entry", "all-in bits", ".3f"),
    ("package_bytes", "MB", "mb"), ("error.mean", "rel. error (mean)", ".4f"), ("ppl", "perplexity", ".3f"),
    ("kl", "KL(ft || model)", ".5f"), ("top1", "top-1 agreement", ".4f"), ("cos_mean", "cosine (mean)", ".5f"),
    ("cos_min", "cosine (min)", ".5f"),
)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def load_eval(folder: Path, manifest: dict) -> dict | list | None:
    """The package's evaluation: ``manifest["eval"]``, else an ``eval.json`` beside the manifest, else None."""
    if manifest.get("eval"):
        return manifest["eval"]
    path = Path(folder) / EVAL_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None
    return None


def _get(row: dict, key: str):
    for part in key.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "/")
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value / 1e6:.2f}" if fmt == "mb" else format(value, fmt)


def eval_markdown(evaluation) -> str | None:
    """A markdown table of an evaluation: deltacomp eval's result (``rows`` of models), a list of such rows,
    or one flat dict of metrics. None when there is nothing to show."""
    data = evaluation.get("data") if isinstance(evaluation, dict) else None
    if isinstance(data, str) and data.startswith(("/", "~")):  # a local data file: its name only
        data = Path(data).name
    rows = evaluation.get("rows") if isinstance(evaluation, dict) and "rows" in evaluation else evaluation
    if isinstance(rows, dict):
        rows = [{"model": "package", **rows}]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return None
    columns = [(k, t, f) for k, t, f in _EVAL_COLUMNS if any(_get(r, k) is not None for r in rows)]
    known = {k.split(".")[0] for k, _, _ in _EVAL_COLUMNS} | {"model"}
    extra = sorted({k for r in rows for k, v in r.items()
                    if k not in known and isinstance(v, (int, float)) and not isinstance(v, bool)})
    columns += [(k, k, ".4g") for k in extra]
    if not columns:
        return None
    lines = [f"Evaluated on {data}." if data else "", "" if data else None,
             "| model | " + " | ".join(t for _, t, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for r in rows:
        lines.append(f"| {_cell(r.get('model', '-'), '')} | " + " | ".join(_cell(_get(r, k), f) for k, _, f in columns)
                     + " |")
    return "\n".join(x for x in lines if x is not None).lstrip("\n")


def card_base_model(manifest: dict) -> str | None:
    """The base's Hub id for the card's metadata (None when the package was made from a local folder)."""
    return manifest["base"].get("repo_id")


def base_label(manifest: dict) -> str:
    """The base as a card shows it: its Hub id, else its folder's name (never a local absolute path, which
    packages made before deltacomp recorded only names may still hold)."""
    base = manifest["base"]
    if base.get("repo_id"):
        return base["repo_id"]
    source = str(base.get("source") or "unknown")
    return Path(source).name if source.startswith(("/", "~", ".")) or "\\" in source else source


def render_card(manifest: dict, repo_id: str | None = None, eval_table: str | None = None,
                evaluation=None, base_model: str | None = None, peft_folder: str | None = None) -> str:
    """The README of a package folder or Hub repo.

    ``evaluation`` (see :func:`eval_markdown`) or a ready ``eval_table`` add a quality section;
    ``base_model`` overrides the base's Hub id; ``peft_folder`` names a PEFT adapter shipped alongside.
    """
    base = manifest["base"]
    base_id = base_model or card_base_model(manifest)
    shown_base = base_id or base_label(manifest)
    totals, budget = manifest["totals"], manifest["budget"]
    tags = ["deltacomp", "delta-compression", f"deltacomp-{manifest['method']}"]
    if peft_folder:
        tags += ["peft", "lora"]
    lines = ["---"]
    if base_id:
        lines.append(f"base_model: {base_id}")
    lines += ["library_name: deltacomp", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", f"# {repo_id or 'Compressed delta'}", ""]
    lines += [
        f"A compressed fine-tuning delta over `{shown_base}`, made with deltacomp "
        f"{manifest['deltacomp_version']} (method `{manifest['method']}`).",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{manifest['method']}` |",
        f"| budget asked | {budget['bits_per_entry']:g} bits per entry of each compressed matrix |",
        f"| achieved (packed factors) | {budget['achieved_factor_bits_per_entry']:.4f} bits per entry |",
        f"| achieved (all-in: scales, offsets, S) | {budget['achieved_all_in_bits_per_entry']:.4f} bits per entry |",
        f"| compressed matrices | {totals['compressed_modules']} ({totals['compressed_entries']:,} entries) |",
        f"| tensors stored exactly | {totals['exact_modules']} |",
        f"| package tensors | {_size(totals['package_tensor_bytes'])} |",
        *([f"| package, every file | {_size(totals['package_bytes'])} |"] if "package_bytes" in totals else []),
        f"| fp16 delta | {_size(totals['fp16_delta_bytes'])} |",
        f"| fine-tuned checkpoint | {_size(totals['finetuned_weight_bytes'])} |",
        f"| ratio vs the fp16 delta | {totals['ratio_vs_fp16_delta']:.2f}x |",
        f"| ratio vs the fine-tuned checkpoint | {totals['ratio_vs_finetuned']:.2f}x |",
        "",
    ]
    table = eval_table or (eval_markdown(evaluation) if evaluation is not None else None)
    if table:
        lines += ["## Quality", "", table.rstrip(), ""]
    src = repo_id or "PACKAGE"
    lines += [
        "## Use",
        "",
        "```bash",
        "pip install deltacomp",
        f"deltacomp inspect {src}",
        f"deltacomp apply {src} --base {shown_base} -o finetuned-model",
    ]
    if repo_id:
        lines.append(f"deltacomp pull {repo_id} -o package   # a local copy, every file checked against its sha256")
    lines += ["```", ""]
    if peft_folder:
        auto = "AutoModelForCausalLM" if "ForCausalLM" in str(base.get("architecture", "")) else "AutoModel"
        lines += [
            f"The `{peft_folder}/` folder holds the same delta as a PEFT LoRA adapter:",
            "",
            "```python",
            f"from transformers import {auto}",
            "from peft import PeftModel",
            "",
            f'base = {auto}.from_pretrained("{shown_base}")',
            f'model = PeftModel.from_pretrained(base, "{repo_id or "PACKAGE"}", subfolder="{peft_folder}")',
            "```",
            "",
        ]
    lines += [
        "The package holds `deltacomp.json` (manifest with per-module ranks and bits, the base fingerprint and",
        "file checksums), packed factors in safetensors, and under `model/` the fine-tune's config and tokenizer",
        "files that differ from the base's (the others are taken from the base, checked by sha256).",
        "",
    ]
    return "\n".join(lines)
