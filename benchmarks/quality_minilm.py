"""Quality of every deltacomp setting on the real MiniLM pair (all-MiniLM-L6-v2 -> its SRE fine-tune), on the CPU.

For budgets 1.0, 0.5 and 0.25 bit per entry: bitdelta, lowrank, mixed (round-to-nearest, 8/3/2 schedule), and,
when ``deltacomp compress`` has the options, mixed with ``--allocation optimal``, with ``--calib`` (GPTQ), and
with both. Compression goes through the CLI (in process) so that the options are exactly the user's.

Agreement is measured on held-out sentences (deltacomp.quality.texts.HELDOUT_SENTENCES); calibration uses the
other, disjoint half (CALIB_SENTENCES). Columns: packed-factor and all-in bits per entry, package MB, compress
seconds, behaviour score cos("pod keeps crashing", "CrashLoopBackOff") (base 0.330, fine-tune 0.967), mean and
minimum cosine of pooled embeddings to the fine-tune's, and the global relative weight error of the deltas.

    python benchmarks/quality_minilm.py [--budgets 1,0.5,0.25] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import calib_corpus
from click.testing import CliRunner

from deltacomp.cli import cli
from deltacomp.evaluate import EvalConfig, evaluate_packages
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.material import fetch
from deltacomp.package.store import DeltaPackage
from deltacomp.quality import encoder
from deltacomp.quality.texts import CALIB_SENTENCES, HELDOUT_SENTENCES
from deltacomp.report import format_table

# The domain corpus (benchmarks/calib_corpus.py): the 53 built-in calibration sentences plus written and
# template SRE and everyday text, none sharing three words in a row with a held-out sentence. With ~100x the
# calibration tokens the sequential fit needs less shrinkage: --seq-damp 0.3 (1.0 on the 53 sentences alone).
DOMAIN_SRE, DOMAIN_GENERAL, DOMAIN_SEQ_DAMP = 800, 300, "0.3"


def compress_help() -> str:
    return CliRunner().invoke(cli, ["compress", "--help"]).output


def settings(calib_file: Path, domain_file: Path) -> list[tuple[str, list[str]]]:
    """(label, extra compress options) of every setting this deltacomp supports."""
    have = compress_help()
    out = [("bitdelta", ["--method", "bitdelta"]), ("lowrank", ["--method", "lowrank"]),
           ("mixed", ["--method", "mixed"])]
    if "--allocation" in have:
        out.append(("mixed optimal", ["--method", "mixed", "--allocation", "optimal"]))
    if "--calib" in have:
        calib = ["--calib", str(calib_file)]
        out.append(("mixed calib", ["--method", "mixed", *calib]))
        if "--allocation" in have:
            out.append(("mixed calib+optimal", ["--method", "mixed", "--allocation", "optimal", *calib]))
            if "--sequential" in have:
                out.append(("mixed calib+optimal sequential",
                            ["--method", "mixed", "--allocation", "optimal", "--sequential", *calib]))
                domain = ["--calib", str(domain_file)]  # all 5,242 records: within the default token budget
                out.append(("mixed calib+optimal, domain corpus",
                            ["--method", "mixed", "--allocation", "optimal", *domain]))
                best = ["--method", "mixed", "--allocation", "optimal", "--sequential", "--seq-damp", DOMAIN_SEQ_DAMP,
                        *domain]
                out.append(("mixed calib+optimal sequential, domain corpus", best))
                if "--allocation-bits" in have:  # the calibrated default is U/V widths: equal widths for contrast
                    out.append(("mixed calib+optimal sequential, domain corpus, widths 2,3,4,8",
                                [*best, "--allocation-bits", "2,3,4,8"]))
            if "--budget-scope" in have:
                out.append(("mixed calib+optimal model-scope",
                            ["--method", "mixed", "--allocation", "optimal", "--budget-scope", "model", *calib]))
    return out


def run(budgets, work: Path) -> dict:
    base, ft = fetch("minilm-base"), fetch("minilm-finetuned")
    calib_file = work / "calib.txt"
    calib_file.write_text("\n".join(CALIB_SENTENCES) + "\n")
    domain_file = calib_corpus.write(work / "domain.txt", calib_corpus.corpus(DOMAIN_SRE, DOMAIN_GENERAL))
    packages, failed = [], {}
    runner = CliRunner()
    for bits in budgets:
        for label, opts in settings(calib_file, domain_file):
            out = work / f"{label.replace(' ', '_')}-{bits:g}"
            args = ["compress", str(base), str(ft), "-o", str(out), "--bits", str(bits), "--no-progress", *opts]
            t0 = time.perf_counter()
            r = runner.invoke(cli, args)
            seconds = time.perf_counter() - t0
            name = f"{label} @{bits:g}"
            if r.exit_code != 0:
                failed[name] = r.output.strip().splitlines()[-1] if r.output.strip() else f"exit {r.exit_code}"
                continue
            packages.append((name, DeltaPackage(out, verify=False), seconds))
    probes = {"behaviour": lambda tok, model: encoder.behaviour(tok, model)}
    config = EvalConfig(texts=HELDOUT_SENTENCES, compare=(), batch_size=64)
    result = evaluate_packages(packages, Checkpoint(base), Checkpoint(ft), config, probes)
    result["failed"] = failed
    result["settings"] = [label for label, _ in settings(calib_file, domain_file)]
    return result


def render(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        def f(key, fmt, src=r):
            return format(src[key], fmt) if src.get(key) is not None else "-"

        mb = format(r["package_bytes"] / 1e6, ".3f") if "package_bytes" in r else "-"
        err = format(r["error"]["global"], ".4f") if "error" in r else "-"
        rows.append([r["model"], f("factor_bits_per_entry", ".3f"), f("all_in_bits_per_entry", ".3f"), mb,
                     f("compress_seconds", ".1f"), f("behaviour", ".3f"), f("cos_mean", ".5f"), f("cos_min", ".4f"),
                     err])
    table = format_table(["setting", "bits/entry", "all-in", "MB", "compress s", "behaviour", "cos mean", "cos min",
                          "rel.err"], rows)
    notes = [f"agreement on {result['data']} (held out from calibration)"]
    notes += [f"{k}: failed ({v})" for k, v in result["failed"].items()]
    return table + "\n" + "\n".join(notes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="1,0.5,0.25")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="quality-minilm-") as tmp:
        result = run([float(b) for b in args.budgets.split(",")], Path(tmp))
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
