"""Package size (every file) and quality of the MiniLM package: embeddings whole (before) vs compressed.

Quality on the held-out sentences (deltacomp.quality.texts.HELDOUT_SENTENCES): mean and minimum cosine of pooled
embeddings to the fine-tune's, and the learned cosine cos("pod keeps crashing", "CrashLoopBackOff").

    python benchmarks/package_size_minilm.py [--work DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from deltacomp.apply import apply
from deltacomp.compress import compress
from deltacomp.config import LEGACY_EXCLUDE, CompressConfig
from deltacomp.material import fetch
from deltacomp.quality import encoder
from deltacomp.quality.texts import HELDOUT_SENTENCES
from deltacomp.report import format_table

SETTINGS = (
    ("embeddings whole, --exact full (before)", CompressConfig(exclude=LEGACY_EXCLUDE, exact="full")),
    ("default", CompressConfig()),
    ("default, --rows-energy 1 (dense embedding)", CompressConfig(rows_energy=1.0)),
    ("default, --budget all-in", CompressConfig(budget="all-in")),
    ("default, --allocation optimal", CompressConfig(allocation="optimal")),
)


def measure(work: Path, settings=SETTINGS) -> tuple[dict, list[dict]]:
    """The fine-tune's report and one row per (label, config) of ``settings``: package bytes, the cosines of its
    rebuilt model's held-out embeddings to the fine-tune's (mean and minimum), the learned cosine, compress seconds."""
    base, ft = fetch("minilm-base"), fetch("minilm-finetuned")
    ref = encoder.report(ft, sentences=HELDOUT_SENTENCES)
    rows = []
    for i, (label, config) in enumerate(settings):
        pkg, model = work / f"pkg{i}", work / f"model{i}"
        t0 = time.perf_counter()
        m = compress(base, ft, pkg, config, overwrite=True, progress=False)
        seconds = time.perf_counter() - t0
        apply(pkg, base, model, overwrite=True, progress=False)
        r = encoder.report(model, ref["embeddings"], sentences=HELDOUT_SENTENCES)
        rows.append({"package": label, "totals": m["totals"], "mean_cos": r["agreement"],
                     "min_cos": float((r["embeddings"] * ref["embeddings"]).sum(-1).min()),
                     "learned_cos": r["behaviour"], "seconds": seconds})
    return ref, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    ref, rows = measure(Path(args.work or tempfile.mkdtemp()))
    table = [[r["package"], f"{r['totals']['package_bytes'] / 1e6:.2f}", f"{r['totals']['ratio_vs_fp16_delta']:.1f}x",
              f"{r['mean_cos']:.5f}", f"{r['min_cos']:.5f}", f"{r['learned_cos']:.4f}",
              f"{abs(r['learned_cos'] - ref['behaviour']):.4f}", f"{r['seconds']:.1f}"] for r in rows]
    print(f"fine-tune: learned cosine {ref['behaviour']:.4f}")
    print(format_table(["package", "MB (every file)", "vs fp16 delta", "mean cos", "min cos", "learned cos",
                        "|diff|", "compress s"], table))


if __name__ == "__main__":
    main()
