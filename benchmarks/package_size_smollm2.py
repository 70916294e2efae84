"""Package size (every file) and KL to the fine-tune on SmolLM2-135M: the embedding compressed vs stored whole.

SmolLM2-135M ties its input and output embeddings (49152 x 576), about 28M of its 135M weights. For each full
fine-tune given, two packages at the default budget are written and scored with ``deltacomp.evaluate``:

- ``default``: ``deltacomp compress`` with no options (the embedding's changed rows are compressed too);
- ``embedding whole``: the same, with ``--exclude embed_tokens`` (the embedding's delta stored whole in fp16);
- two allocation settings that move bits between matrices (``--allocation optimal``, and with ``--budget-scope
  model`` one budget shared by every matrix).

Scores: all-in package bytes, and KL(fine-tune || rebuilt model) per token, perplexity and top-1 agreement on
the evaluation's built-in texts (generic text the fine-tunes never saw). The issue's goal: the default package at
most 20 MB, with a KL at most 1.1x the embedding-whole package's.

    python benchmarks/package_size_smollm2.py --base BASE --tuned FT0 --tuned FT1 [--device cuda] [--out r.json]

(``benchmarks/fusion_smollm2.py --work W`` leaves a base and two fine-tunes in W/base, W/ft0 and W/ft1.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.evaluate import EvalConfig, evaluate_packages
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.package.store import DeltaPackage
from deltacomp.report import format_table

SETTINGS = (("default", {}), ("embedding whole", {"exclude": ("embed_tokens",)}),
            ("--allocation optimal", {"allocation": "optimal"}),
            ("--budget-scope model --allocation optimal", {"budget_scope": "model", "allocation": "optimal"}))
# more settings, chosen by label with --settings (with "default" and "embedding whole", which every table keeps)
NAMED = dict(SETTINGS) | {
    "--vocab-bits 1.5": {"vocab_bits": 1.5},
    "--vocab-weights counts": {"vocab_weights": "counts"},
    "--vocab-weights counts --vocab-bits 1.5": {"vocab_weights": "counts", "vocab_bits": 1.5},
    "--vocab-weights head": {"vocab_weights": "head"},
    "--vocab-weights head --vocab-bits 1.5": {"vocab_weights": "head", "vocab_bits": 1.5},
    "--vocab-weights head --vocab-bits 1.4": {"vocab_weights": "head", "vocab_bits": 1.4},
}


def measure(base: Path, tuned: Path, work: Path, device: str, settings=SETTINGS) -> list[dict]:
    """One row per (label, CompressConfig options) of ``settings``, scored together on the built-in texts."""
    packages = []
    for i, (label, options) in enumerate(settings):
        out = work / f"{tuned.name}-{i}"
        t0 = time.perf_counter()
        manifest = compress(base, tuned, out, CompressConfig(device=device, **options), overwrite=True,
                            progress=False)
        packages.append((label, DeltaPackage(out), time.perf_counter() - t0, manifest["totals"]["package_bytes"]))
    res = evaluate_packages([(label, pkg, secs) for label, pkg, secs, _ in packages], Checkpoint(base),
                            Checkpoint(tuned), EvalConfig(device=device, compare=(), module_errors=False))
    by_label = {r["model"]: r for r in res["rows"]}
    return [{"tuned": tuned.name, "package": label, "bytes": nbytes, "seconds": secs, "kl": by_label[label]["kl"],
             "ppl": by_label[label]["ppl"], "top1": by_label[label]["top1"], "tokens": by_label[label]["tokens"],
             "fine_tune_ppl": by_label["fine-tuned"]["ppl"], "data": res["data"]}
            for label, _, secs, nbytes in packages]


def render(rows: list[dict]) -> str:
    table, whole = [], {r["tuned"]: r for r in rows if r["package"] == "embedding whole"}
    for r in rows:
        ratio = r["kl"] / whole[r["tuned"]]["kl"] if whole[r["tuned"]]["kl"] > 0 else float("nan")
        table.append([r["tuned"], r["package"], f"{r['bytes'] / 1e6:.2f}", f"{r['kl']:.5f}", f"{ratio:.2f}x",
                      f"{r['ppl']:.3f} ({r['fine_tune_ppl']:.3f})", f"{r['top1']:.4f}", f"{r['seconds']:.1f}"])
    head = f"scored on {rows[0]['data']}, {rows[0]['tokens']} tokens per model" if rows else ""
    return head + "\n" + format_table(["fine-tune", "package", "MB (every file)", "KL/token", "KL vs whole",
                                       "ppl (fine-tune)", "top-1 agree", "compress s"], table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="Base model folder.")
    ap.add_argument("--tuned", action="append", required=True, help="Fine-tune folder (repeatable).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="Folder for the packages (default: a temporary one).")
    ap.add_argument("--out", default=None, help="Write the rows as JSON here.")
    ap.add_argument("--settings", default=None, help=f"Comma-separated labels of {sorted(NAMED)} to measure beside "
                    "the default and the embedding whole [default: the first four].")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp())
    settings = SETTINGS
    if args.settings:
        labels = dict.fromkeys(["default", "embedding whole", *args.settings.split(",")])
        unknown = [lb for lb in labels if lb not in NAMED]
        if unknown:
            ap.error(f"unknown settings {unknown}; known: {sorted(NAMED)}")
        settings = tuple((lb, NAMED[lb]) for lb in labels)
    rows = [r for t in args.tuned for r in measure(Path(args.base), Path(t), work, args.device, settings)]
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(render(rows))


if __name__ == "__main__":
    main()
