"""The default bit allocation, judged by function: the fixed schedule vs the optimal allocation vs the plain reference
method, at 1 and 0.5 bit per entry, and the presets of ``deltacomp compress --preset``.

- MiniLM (the real pair, fetched from PyPI): mean and minimum cosine of the held-out sentences' embeddings to the
  fine-tune's (``package_size_minilm.measure``).
- SmolLM2-135M full fine-tunes (``fusion_smollm2.py``'s skills, e.g. made on the CPU): KL(fine-tune || rebuilt) per
  token and top-1 agreement on the evaluation's built-in texts (``package_size_smollm2.measure``), with the package
  storing the embedding whole (``--exclude embed_tokens``) beside, as the size goal is stated against it.

Every row records its package bytes (every file) and compress seconds.

    python benchmarks/allocation_default.py --smollm2-base BASE --tuned FT0 --tuned FT1 \\
        --calib-minilm benchmarks/data/calib_sre.txt --calib-smollm2 benchmarks/data/calib_everyday.txt --out r.json
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import package_size_minilm
import package_size_smollm2

from deltacomp.config import PLAIN_ALLOCATION_BITS, CompressConfig, parse_bits
from deltacomp.report import format_table

# label -> CompressConfig options (every allocation setting given explicitly, so the rows do not move with defaults)
ALLOCATIONS = (("reference", {"method": "reference"}), ("schedule", {"allocation": "schedule"}),
               ("optimal", {"allocation": "optimal"}))
# the reference's quantizer choices (min-max range, no refit) under deltacomp's allocations
RANGES = (("optimal, minmax", {"allocation": "optimal", "vector_range": "minmax"}),
          ("optimal, minmax, no refit", {"allocation": "optimal", "vector_range": "minmax", "refit": False}),
          ("optimal, no refit", {"allocation": "optimal", "refit": False}))
# the weight of a kept vector's rounding error against a dropped vector's (``--noise-weight``)
# the defaults as they ship, and with the token table's rows all weighted alike (the default weighs them by token
# counts and the head by its inputs where the model has a tokenizer)
DEFAULTS = (("default", {}), ("default, vocab off", {"vocab_weights": "off"}))
NOISE = tuple((f"optimal, noise {w:g}", {"allocation": "optimal", "noise_weight": w}) for w in (1.0, 0.3, 0.1, 0.03))
# how much each singular direction is taken to be excited by the inputs without calibration (``--excitation-power``)
EXCITATION = tuple((f"optimal, excitation {p:g}", {"allocation": "optimal", "excitation_power": p})
                   for p in (0.0, 1.0, 2.0, 3.0))

# one budget shared by every matrix, each matrix's error weighted by the model's sensitivity to it
SHARED = {"budget_scope": "model", "sensitivity": True}


def settings(bits: float, calib: str | None, whole: bool, pick: str | None = None,
             sizes: tuple[int, ...] = (128,)) -> list[tuple[str, dict]]:
    """The rows at ``bits``; ``pick``: only the labels this regex finds; ``sizes``: calibration lines (the first N)."""
    rows = [(f"{label} @{bits:g}", {"bits": bits, **options})
            for label, options in (*ALLOCATIONS, *RANGES, *NOISE, *EXCITATION, *DEFAULTS)]
    if whole:
        rows += [(f"{label}, embedding whole @{bits:g}", {"bits": bits, "exclude": ("embed_tokens",), **options})
                 for label, options in ALLOCATIONS[1:]]
    for n in sizes if calib else ():  # GPTQ defaults
        calibrated = {"bits": bits, "calib": calib, "calib_samples": n, "allocation": "optimal"}
        tag = "calib" if n == 128 else f"calib {n}"
        rows += [(f"{tag} optimal @{bits:g}", calibrated),
                 (f"{tag} optimal sequential @{bits:g}", {**calibrated, "sequential": True}),
                 (f"{tag} optimal, tune 3 @{bits:g}", {**calibrated, "tune": 3}),
                 (f"{tag} optimal, model scope, sensitivity @{bits:g}", {**calibrated, **SHARED}),
                 (f"{tag} optimal, model scope, sensitivity, tune 3 @{bits:g}", {**calibrated, **SHARED, "tune": 3}),
                 (f"{tag} optimal, no refit @{bits:g}", {**calibrated, "refit": False}),
                 *((f"{tag} {label} @{bits:g}", {**calibrated, **options}) for label, options in NOISE),
                 (f"{tag} optimal, noise 0.1, widths 2,3,4,8 @{bits:g}",
                  {**calibrated, "noise_weight": 0.1, "allocation_bits": parse_bits(PLAIN_ALLOCATION_BITS)})]
    return [row for row in rows if pick is None or re.search(pick, row[0])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm2-base", help="SmolLM2-135M base folder (gguf_to_folder of the GGUF).")
    ap.add_argument("--tuned", action="append", default=[], help="SmolLM2 fine-tune folder (repeatable).")
    ap.add_argument("--calib-minilm", help="Calibration text for MiniLM (the calibrated rows).")
    ap.add_argument("--calib-smollm2", help="Calibration text for the SmolLM2 fine-tunes (the calibrated rows).")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None, help="Write the rows as JSON here.")
    ap.add_argument("--settings", default=None, help="Only the rows whose label this regex finds.")
    ap.add_argument("--budgets", default="1,0.5", help="Bits per entry, comma-separated.")
    ap.add_argument("--calib-samples", default="128", help="Calibration lines of the calibrated rows (the first N), "
                    "comma-separated: one set of rows per size.")
    args = ap.parse_args()
    budgets = tuple(float(b) for b in args.budgets.split(","))
    sizes = tuple(int(n) for n in args.calib_samples.split(","))
    work = Path(args.work or tempfile.mkdtemp())
    rows = []
    if not args.no_minilm:
        plan = [(label, CompressConfig(**options)) for bits in budgets
                for label, options in settings(bits, args.calib_minilm, False, args.settings, sizes)]
        ref, measured = package_size_minilm.measure(work / "minilm", plan)
        rows += [{"pair": "MiniLM", "package": r["package"], "bytes": r["totals"]["package_bytes"],
                  "seconds": r["seconds"], "mean_cos": r["mean_cos"], "min_cos": r["min_cos"]} for r in measured]
    for tuned in args.tuned:
        plan = [row for bits in budgets
                for row in settings(bits, args.calib_smollm2, bits == 1.0, args.settings, sizes)]
        measured = package_size_smollm2.measure(Path(args.smollm2_base), Path(tuned), work / "smollm2", "cpu", plan)
        rows += [{"pair": Path(tuned).name, **{k: r[k] for k in ("package", "bytes", "seconds", "kl", "top1")}}
                 for r in measured]
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(render(rows))


def render(rows: list[dict]) -> str:
    table = []
    for r in rows:
        quality = (f"{r['mean_cos']:.5f} / {r['min_cos']:.5f}" if "mean_cos" in r
                   else f"{r['kl']:.6f} / {r['top1']:.4f}")
        table.append([r["pair"], r["package"], f"{r['bytes'] / 1e6:.2f}", quality, f"{r['seconds']:.1f}"])
    return format_table(["pair", "package", "MB (every file)", "mean/min cos or KL/top-1", "compress s"], table)


if __name__ == "__main__":
    main()
