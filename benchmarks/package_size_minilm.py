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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp())
    base, ft = fetch("minilm-base"), fetch("minilm-finetuned")
    ref = encoder.report(ft, sentences=HELDOUT_SENTENCES)
    rows = []
    for i, (label, config) in enumerate(SETTINGS):
        pkg, model = work / f"pkg{i}", work / f"model{i}"
        t0 = time.perf_counter()
        m = compress(base, ft, pkg, config, overwrite=True, progress=False)
        seconds = time.perf_counter() - t0
        apply(pkg, base, model, overwrite=True, progress=False)
        r = encoder.report(model, ref["embeddings"], sentences=HELDOUT_SENTENCES)
        t = m["totals"]
        low = float((r["embeddings"] * ref["embeddings"]).sum(-1).min())
        rows.append([label, f"{t['package_bytes'] / 1e6:.2f}", f"{t['ratio_vs_fp16_delta']:.1f}x",
                     f"{r['agreement']:.5f}", f"{low:.5f}", f"{r['behaviour']:.4f}",
                     f"{abs(r['behaviour'] - ref['behaviour']):.4f}", f"{seconds:.1f}"])
    print(f"fine-tune: learned cosine {ref['behaviour']:.4f}")
    print(format_table(["package", "MB (every file)", "vs fp16 delta", "mean cos", "min cos", "learned cos",
                        "|diff|", "compress s"], rows))


if __name__ == "__main__":
    main()
