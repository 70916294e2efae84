"""Human-readable tables of a package's manifest (``deltacomp inspect``)."""

from __future__ import annotations

from deltacomp.package.card import base_label


def format_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A plain-text table; ``align`` is one of l/r per column (default: first left, others right)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(values):
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(values, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def bits_text(info: dict) -> str:
    """A package module's bit groups: ``8b x2 3/2b x10`` (U/V where V's width differs from U's)."""
    return " ".join(f"{g['bits']}{'/' + str(g['v_bits']) if 'v_bits' in g else ''}b x{g['rank']}"
                    for g in info.get("groups") or [])


def module_rows(manifest: dict) -> list[list]:
    rows = []
    for name, m in manifest["modules"].items():
        shape = "x".join(str(s) for s in m["shape"])
        if m["action"] == "compress":
            info = m["info"]
            rank = info.get("rank", "-")
            rows.append([name, m["method"], shape, rank, bits_text(info) or "-", m["bytes"],
                         f"{m['factor_bits_per_entry']:.3f}", f"{m['all_in_bits_per_entry']:.3f}"])
        else:
            rows.append([name, m["action"], shape, "-", "-", m.get("bytes", 0), "-", "-"])
    return rows


def render_inspect(manifest: dict) -> str:
    t, b = manifest["totals"], manifest["budget"]
    table = format_table(
        ["module", "method", "shape", "rank", "bits", "bytes", "bits/entry", "all-in"],
        module_rows(manifest),
        "llrrlrrr",
    )
    summary = [
        f"method: {manifest['method']}    base: {base_label(manifest)}",
        f"budget: {b['bits_per_entry']:g} bits/entry asked; achieved {b['achieved_factor_bits_per_entry']:.4f} "
        f"(packed factors), {b['achieved_all_in_bits_per_entry']:.4f} (all-in with scales, offsets, S)",
        f"modules: {t['compressed_modules']} compressed ({t['compressed_entries']:,} entries, "
        f"{t['compressed_bytes']:,} bytes), {t['exact_modules']} stored exactly, {t['removed_modules']} removed",
        f"package tensors: {t['package_tensor_bytes']:,} bytes",
        f"ratio vs fp16 delta: {t['ratio_vs_fp16_delta']:.2f}x    "
        f"ratio vs fine-tuned checkpoint ({t['finetuned_weight_bytes']:,} bytes): {t['ratio_vs_finetuned']:.2f}x",
    ]
    if t["compressed_entries"]:
        ratio = 2 * t["compressed_entries"] / max(t["compressed_bytes"], 1)
        summary.append(f"compressed matrices alone: {ratio:.2f}x smaller than their fp16 delta")
    return table + "\n\n" + "\n".join(summary)
