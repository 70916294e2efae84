"""Time and peak memory of ``compress`` per method, with quality beside them; prints a table.

Two pairs:

* the real MiniLM pair (all-MiniLM-L6-v2 and its SRE fine-tune, fp32, 87 MB each), at 1.0 bit per entry;
* a larger synthetic Llama-style pair (bf16, built here: the real memory test, since MiniLM is small next to
  the interpreter), to show that compress streams one tensor pair at a time.

Each measurement runs in a fresh subprocess; a thread samples its resident memory every 2 ms. "extra" is
the peak during the work minus the resident memory right after imports, i.e. what the work itself costs.
The baseline row, "load both", is what a non-streaming tool does first: both state dicts in memory
(safetensors ``load_file``), then the deltas.

    python benchmarks/compress_minilm.py [--work DIR] [--skip-large]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from deltacomp.report import format_table

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    import deltacomp.compress, deltacomp.methods, safetensors.torch
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    peak = [0.0]
    def sample():
        while True:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)
    torch.set_num_threads({threads})
    job = json.loads(sys.argv[1])
    start_rss = rss_mb()
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    if job["kind"] == "load-both":
        from deltacomp.io.checkpoint import Checkpoint
        base = {{}}
        ft = {{}}
        for side, d in (("base", base), ("ft", ft)):
            for f in Checkpoint(job[side]).files:
                d.update(safetensors.torch.load_file(f))
        deltas = {{k: ft[k].float() - base[k].float() for k in ft if k in base and ft[k].is_floating_point()}}
        result = {{}}
    else:
        from deltacomp.config import CompressConfig
        m = deltacomp.compress.compress(job["base"], job["ft"], job["out"],
                                        CompressConfig(method=job["method"], bits=job["bits"]), overwrite=True,
                                        progress=False)
        result = {{"factor": m["budget"]["achieved_factor_bits_per_entry"],
                   "all_in": m["budget"]["achieved_all_in_bits_per_entry"],
                   "pkg_bytes": m["totals"]["package_tensor_bytes"]}}
    seconds = time.perf_counter() - t0
    time.sleep(0.01)
    print(json.dumps({{**result, "seconds": seconds, "start_mb": start_rss, "peak_mb": peak[0]}}))
""")


def measure(job: dict, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(threads=threads), json.dumps(job)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def delta_error(base, ft, applied, names) -> float:
    from deltacomp.io.checkpoint import Checkpoint

    b, f, a = Checkpoint(base), Checkpoint(ft), Checkpoint(applied)
    num = den = 0.0
    for n in names:
        d = f.read(n).float() - b.read(n).float()
        num += float((a.read(n).float() - f.read(n).float()).pow(2).sum())
        den += float(d.pow(2).sum())
    return (num / den) ** 0.5


def quality(base, ft, pkg, work: Path, reference) -> dict:
    from deltacomp.apply import apply
    from deltacomp.package.store import DeltaPackage
    from deltacomp.quality import encoder

    model = work / (pkg.name + "-model")
    apply(pkg, base, model, overwrite=True, progress=False)
    names = [n for n, m in DeltaPackage(pkg).modules.items() if m["action"] == "compress"]
    r = encoder.report(model, reference["embeddings"])
    return {"behaviour": r["behaviour"], "agreement": r["agreement"], "rel_err": delta_error(base, ft, model, names)}


def build_large_pair(work: Path, layers: int) -> tuple[Path, Path]:
    """A Llama-style pair (hidden 1024, intermediate 2816, bf16) with a decaying-spectrum delta per matrix."""
    import torch
    from decoder_finetune import add_decaying_deltas
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, ft_dir = work / "large-base", work / "large-finetuned"
    if (ft_dir / "config.json").is_file():
        return base_dir, ft_dir
    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base_dir, max_shard_size="200MB")
    add_decaying_deltas(model)
    model.save_pretrained(ft_dir, max_shard_size="200MB")
    return base_dir, ft_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="Working folder (default: a temporary one).")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each measured process.")
    ap.add_argument("--large-layers", type=int, default=12)
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="deltacomp-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    from deltacomp.io.checkpoint import Checkpoint
    from deltacomp.material import fetch
    from deltacomp.quality import encoder

    base, ft = fetch("minilm-base"), fetch("minilm-finetuned")
    reference = encoder.report(ft)
    headers = ["pair", "method", "bits/entry", "all-in", "package MB", "seconds", "peak RSS MB", "extra MB",
               "rel. error", "behaviour", "cos to fine-tune"]
    rows = []

    def row(pair, label, r, q=None):
        extra = r["peak_mb"] - r["start_mb"]
        q = q or {}
        rows.append([pair, label, f"{r['factor']:.3f}" if "factor" in r else "-",
                     f"{r['all_in']:.3f}" if "all_in" in r else "-",
                     f"{r['pkg_bytes'] / 1e6:.1f}" if "pkg_bytes" in r else "-",
                     f"{r['seconds']:.2f}", f"{r['peak_mb']:.0f}", f"{extra:.0f}",
                     f"{q['rel_err']:.3f}" if q else "-", f"{q['behaviour']:.3f}" if q else "-",
                     f"{q['agreement']:.4f}" if q else "-"])

    mb = Checkpoint(ft).weight_bytes() / 1e6
    row(f"MiniLM ({mb:.0f} MB)", "load both (baseline)",
        measure({"kind": "load-both", "base": str(base), "ft": str(ft)}, args.threads))
    for method in ("mixed", "lowrank", "bitdelta", "dense"):
        pkg = work / f"minilm-{method}"
        job = {"kind": "compress", "base": str(base), "ft": str(ft), "out": str(pkg), "method": method, "bits": 1.0}
        r = measure(job, args.threads)
        row("MiniLM", method, r, quality(base, ft, pkg, work, reference))
    rows.append(["fine-tuned", "-", "-", "-", "-", "-", "-", "-", "0", f"{reference['behaviour']:.3f}", "1.0000"])

    if not args.skip_large:
        lbase, lft = build_large_pair(work, args.large_layers)
        mb = Checkpoint(lft).weight_bytes() / 1e6
        row(f"Llama-style ({mb:.0f} MB bf16)", "load both (baseline)",
            measure({"kind": "load-both", "base": str(lbase), "ft": str(lft)}, args.threads))
        for method in ("mixed", "lowrank"):
            pkg = work / f"large-{method}"
            r = measure({"kind": "compress", "base": str(lbase), "ft": str(lft), "out": str(pkg), "method": method,
                         "bits": 1.0}, args.threads)
            row(f"Llama-style ({mb:.0f} MB bf16)", method, r)
    print(format_table(headers, rows, "ll" + "r" * 9))


if __name__ == "__main__":
    main()
