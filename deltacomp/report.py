"""Human-readable tables of a package's manifest (``deltacomp inspect``)."""

from __future__ import annotations

from deltacomp.package.card import base_label
from deltacomp.package.manifest import bits_text


def format_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A plain-text table; ``align`` is one of l/r per column (default: first left, others right)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(values):
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(values, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def module_rows(manifest: dict) -> list[list]:
    rows = []
    for name, m in manifest["modules"].items():
        shape = "x".join(str(s) for s in m["shape"])
        if m["action"] == "compress":
            info = m["info"]
            rank = info.get("rank", "-")
            if "rows" in m:
                shape += f" ({m['rows']} rows)"
            rows.append([name, m["method"], shape, rank, bits_text(info) or "-", m["bytes"],
                         f"{m['factor_bits_per_entry']:.3f}", f"{m['all_in_bits_per_entry']:.3f}"])
        else:
            rows.append([name, m["action"], shape, "-", "-", m.get("bytes", 0), "-", "-"])
    return rows


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


KIND_LABELS = {"matrices": "compressed matrices", "embeddings": "embeddings / lm_head", "norms_biases":
               "norms and biases", "other": "other tensors", "metadata": "metadata (manifest, card, config, "
               "tokenizer, headers)"}


def size_lines(manifest: dict) -> list[str]:
    """The package's size, every file counted, against the fp16 delta and the fine-tune, and by kind."""
    t = manifest["totals"]
    if "package_bytes" not in t:  # packages of format 1 counted tensors only
        return [f"package tensors: {t['package_tensor_bytes']:,} bytes",
                f"ratio vs fp16 delta: {t['ratio_vs_fp16_delta']:.2f}x    ratio vs fine-tuned checkpoint "
                f"({t['finetuned_weight_bytes']:,} bytes): {t['ratio_vs_finetuned']:.2f}x"]
    total = t["package_bytes"]
    lines = [f"package: {mb(total)} ({total:,} bytes, every file), {t['ratio_vs_fp16_delta']:.1f}x smaller than "
             f"the fp16 delta ({mb(t['fp16_delta_bytes'])}), {t['ratio_vs_finetuned']:.1f}x smaller than the "
             f"fine-tuned weights ({mb(t['finetuned_weight_bytes'])})"]
    kinds = t.get("bytes_by_kind", {})
    lines += [f"  {KIND_LABELS.get(k, k):<56} {mb(v):>9}  {100 * v / max(total, 1):5.1f}%"
              for k, v in kinds.items() if v]
    return lines


def render_summary(manifest: dict) -> str:
    t, b = manifest["totals"], manifest["budget"]
    scope = manifest.get("settings", {}).get("budget", "factors")
    summary = [
        f"method: {manifest['method']}    base: {base_label(manifest)}",
        f"budget: {b['bits_per_entry']:g} bits/entry asked ({scope}); achieved "
        f"{b['achieved_factor_bits_per_entry']:.4f} (packed factors), {b['achieved_all_in_bits_per_entry']:.4f} "
        f"(all-in with scales, offsets, S)",
        f"modules: {t['compressed_modules']} compressed ({t['compressed_entries']:,} entries, "
        f"{t['compressed_bytes']:,} bytes), {t['exact_modules']} stored exactly, {t['removed_modules']} removed",
        *size_lines(manifest),
        *tuning_lines(manifest),
    ]
    return "\n".join(summary)


def tuning_lines(manifest: dict) -> list[str]:
    """What ``--tune`` did, when it ran."""
    t = manifest.get("tuning")
    if t is None:
        return []
    where = f"{t['held_out_samples']} held-out calibration samples" if t["held_out_samples"] else "the calibration"
    return [f"tuned: S, scales and offsets of {t['matrices']} matrices, {t['epochs']} epochs (epoch {t['kept_epoch']} "
            f"kept); {t['loss']} on {where}: {t['loss_before']:.4g} -> {t['loss_after']:.4g}"]


def render_inspect(manifest: dict, modules: bool = True) -> str:
    """The summary, after the per-module table when ``modules``."""
    if not modules:
        return render_summary(manifest)
    table = format_table(
        ["module", "method", "shape", "rank", "bits", "bytes", "bits/entry", "all-in"],
        module_rows(manifest),
        "llrrlrrr",
    )
    return table + "\n\n" + render_summary(manifest)
