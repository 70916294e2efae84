"""``deltacomp eval``: quality of a package against its fine-tune, with baselines at the same budget."""

from __future__ import annotations

import json
import math

import click

from deltacomp.cli import cli, handle_errors


def _num(x, fmt: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, fmt)


def render(result: dict, modules: bool = False) -> str:
    from deltacomp.report import format_table

    causal = result["kind"] == "causal"
    quality = ["ppl", "KL(ft||model)", "top-1"] if causal else ["cos mean", "cos min"]
    ratio = "KL / reference" if causal else "(1 - cos) / reference"
    headers = ["model", "bits/entry", "all-in", "MB", "rel.err mean", "rel.err global", *quality, ratio]
    rows = []
    for r in result["rows"]:
        err = r.get("error", {})
        q = ([_num(r["ppl"], ".3f"), _num(r["kl"], ".5f"), _num(r["top1"], ".4f")] if causal
             else [_num(r["cos_mean"], ".5f"), _num(r["cos_min"], ".5f")])
        mb = r["package_bytes"] / 1e6 if "package_bytes" in r else None
        rows.append([r["model"], _num(r.get("factor_bits_per_entry"), ".3f"),
                     _num(r.get("all_in_bits_per_entry"), ".3f"), _num(mb, ".2f"),
                     _num(err.get("mean"), ".4f"), _num(err.get("global"), ".4f"), *q,
                     _num(r.get("vs_reference"), ".3f")])
    scored = result["scored"]
    what = "tokens (every next token of every sample)" if causal else "sentences"
    text = [f"data: {result['data']}; {scored['count']:,} {what} scored per model; agreement is with the fine-tune",
            "", format_table(headers, rows)]
    if result.get("reference"):
        text.append(f"{result['reference']}: the plain reference (exact SVD, the same bit schedule, min-max "
                    f"round-to-nearest per singular vector, no refit, no calibration) at the package's budget")
    for method, reason in result.get("skipped", {}).items():
        text.append(f"{method}: skipped ({reason})")
    if modules:
        pkg_row = result["rows"][2]
        text += ["", f"per-module relative error of {pkg_row['model']}:",
                 format_table(["module", "shape", "rank", "bits", "rel.err"],
                              [[m["name"], "x".join(map(str, m["shape"])), m["rank"] if m["rank"] is not None else "-",
                                m["bits"] or "-", f"{m['relative_error']:.4f}"] for m in pkg_row["modules"]],
                              "llrlr")]
    return "\n".join(text)


@cli.command("eval")
@click.argument("package")
@click.option("--base", required=True, help="The base model (folder or Hub repo id).")
@click.option("--finetuned", required=True, help="The fine-tuned model the package was made from.")
@click.option("--data", default=None, help="Text file (paragraphs or lines) or JSON lines; default: built-in text.")
@click.option("--compare", default="lowrank,bitdelta,mixed", show_default=True,
              help="Baselines compressed at the package's budget and settings ('' or none for no baselines).")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Also compress the plain reference method at the package's budget (whatever --compare says) and "
                   "give each package's KL (encoders: 1 - cosine) as a ratio to its.")
@click.option("--max-samples", type=int, default=None, help="Use at most this many samples of the data.")
@click.option("--max-length", type=int, default=256, show_default=True, help="Tokens per sample.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Texts scored per forward pass.")
@click.option("--device", default="cpu", show_default=True, metavar="[cpu|cuda|cuda:N]",
              help="Where the model runs and packages are compressed.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Dtype the model is loaded in.")
@click.option("--plot", "plot_dir", default=None, help="Write PNG figures (spectra, bits, error vs budget) here.")
@click.option("--plot-budgets", default="0.25,0.5,1,2", show_default=True,
              help="Budgets compressed for the error-against-budget figure (with --plot).")
@click.option("--tokenizer", default=None, help="Tokenizer folder (default: the base's, else the fine-tune's).")
@click.option("--modules", "show_modules", is_flag=True, help="Also print the package's per-module errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--save-json", default=None, help="Also write the JSON result to this file.")
@handle_errors
def eval_(package, base, finetuned, data, compare, reference, max_samples, max_length, batch_size, device, dtype,
          plot_dir, plot_budgets, tokenizer, show_modules, as_json, save_json):
    """Measure how close PACKAGE's rebuilt model is to FINETUNED, next to baselines at the same budget."""
    from deltacomp.errors import DeltacompError
    from deltacomp.evaluate import EvalConfig, evaluate

    methods = tuple(m.strip() for m in compare.split(",") if m.strip() and m.strip() != "none")
    try:
        budgets = tuple(float(b) for b in plot_budgets.split(",") if b.strip()) if plot_dir else ()
    except ValueError:
        raise DeltacompError(f"--plot-budgets must be numbers separated by commas, got {plot_budgets!r}") from None
    config = EvalConfig(compare=methods, reference=reference, data=data, max_samples=max_samples, max_length=max_length,
                        batch_size=batch_size, device=device, dtype=dtype, plot_budgets=budgets,
                        spectra=4 if plot_dir else 0, tokenizer=tokenizer)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    result = evaluate(package, base, finetuned, config)
    if plot_dir:
        from deltacomp.plots import write_plots

        result["plots"] = [str(p) for p in write_plots(result, plot_dir)]
    if save_json:
        with open(save_json, "w") as f:
            json.dump(result, f, indent=2)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(render(result, show_modules))
    for p in result.get("plots", []):
        click.echo(f"wrote {p}")
