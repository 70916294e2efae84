"""The package's README.md model card, with Hub metadata."""

from __future__ import annotations


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def render_card(manifest: dict, repo_id: str | None = None, eval_table: str | None = None) -> str:
    base = manifest["base"]
    base_id = base.get("repo_id") or base.get("source", "unknown")
    totals, budget = manifest["totals"], manifest["budget"]
    tags = ["deltacomp", "delta-compression", f"deltacomp-{manifest['method']}"]
    lines = ["---", f"base_model: {base_id}", "library_name: deltacomp", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", f"# {repo_id or 'Compressed delta'}", ""]
    lines += [
        f"A compressed fine-tuning delta over `{base_id}`, made with deltacomp "
        f"{manifest['deltacomp_version']} (method `{manifest['method']}`).",
        "",
        "| | |",
        "|---|---|",
        f"| budget asked | {budget['bits_per_entry']:g} bits per entry of each compressed matrix |",
        f"| achieved (packed factors) | {budget['achieved_factor_bits_per_entry']:.4f} bits per entry |",
        f"| achieved (all-in: scales, offsets, S) | {budget['achieved_all_in_bits_per_entry']:.4f} bits per entry |",
        f"| compressed matrices | {totals['compressed_modules']} ({totals['compressed_entries']:,} entries) |",
        f"| tensors stored exactly | {totals['exact_modules']} |",
        f"| package tensors | {_size(totals['package_tensor_bytes'])} |",
        f"| ratio vs the fp16 delta | {totals['ratio_vs_fp16_delta']:.2f}x |",
        f"| ratio vs the fine-tuned checkpoint | {totals['ratio_vs_finetuned']:.2f}x |",
        "",
    ]
    if eval_table:
        lines += ["## Quality", "", eval_table.rstrip(), ""]
    src = repo_id or "PACKAGE"
    lines += [
        "## Use",
        "",
        "```bash",
        "pip install deltacomp",
        f"deltacomp inspect {src}",
        f"deltacomp apply {src} --base {base_id} -o finetuned-model",
        "```",
        "",
        "The package holds `deltacomp.json` (manifest with per-module ranks and bits, the base fingerprint and",
        "file checksums), packed factors in safetensors, and the fine-tune's config and tokenizer under `model/`.",
        "",
    ]
    return "\n".join(lines)
