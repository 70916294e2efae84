"""``deltacomp export``: a package as a PEFT LoRA adapter or as a merged full checkpoint."""

from __future__ import annotations

import json

import click

from deltacomp.cli import cli, handle_errors
from deltacomp.errors import DeltacompError

FORMATS = ("peft", "merged")


@cli.command()
@click.argument("package")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="peft", show_default=True,
              help="peft: a LoRA adapter (adapter_config.json + adapter_model.safetensors); merged: a full checkpoint.")
@click.option("-o", "--output", required=True, help="Folder to write.")
@click.option("--base", default=None,
              help="The base model (folder or Hub id): required for merged; for peft when tensors outside the "
                   "compressed layers changed (biases, norms, embeddings).")
@click.option("--max-rank", type=int, default=None,
              help="Cap every module's LoRA rank (best truncation of its factors). Full-rank methods default to 64.")
@click.option("--target", type=click.Choice(["peft", "vllm"]), default="peft", show_default=True,
              help="vllm: rank capped at 512, LoRA factors only (full tensors and bias deltas dropped with a warning).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Adapter tensor dtype (auto: each weight's own dtype).")
@click.option("--modules-to-save/--no-modules-to-save", default=True, show_default=True,
              help="Export changed tensors outside the compressed layers as full modules (PEFT modules_to_save).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar (default: on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@handle_errors
def export(package, fmt, output, base, max_rank, target, dtype, modules_to_save, overwrite, progress, as_json):
    """Export PACKAGE (folder or Hub id) as a PEFT LoRA adapter or a merged checkpoint."""
    if fmt == "merged":
        from deltacomp.export.merged import export_merged

        if base is None:
            raise DeltacompError("--format merged needs --base BASE (the model the package applies to)")
        peft_only = [o for o, v in (("--max-rank", max_rank), ("--target", target != "peft"),
                                    ("--dtype", dtype != "auto")) if v]
        if peft_only:
            verb = "applies" if len(peft_only) == 1 else "apply"
            raise DeltacompError(f"{', '.join(peft_only)} only {verb} to --format peft")
        files = export_merged(package, base, output, overwrite=overwrite, progress=progress)
        summary = {"path": output, "format": "merged", "files": files}
        click.echo(json.dumps(summary, indent=2) if as_json else f"wrote {output} ({', '.join(files)})")
        return

    from deltacomp.export.peft import PeftExportConfig, export_peft, vllm_rank

    config = PeftExportConfig(max_rank=max_rank, target=target, dtype=dtype, modules_to_save=modules_to_save)
    summary = export_peft(package, output, base, config, overwrite=overwrite, progress=progress)
    if as_json:
        click.echo(json.dumps({"format": "peft", **summary}, indent=2))
        return
    click.echo(f"LoRA modules: {summary['modules']} (rank <= {summary['r']}), full modules: "
               f"{len(summary['modules_to_save'])}, bias deltas: {len(summary['bias_deltas'])}, "
               f"dropped: {len(summary['dropped'])}, {summary['bytes'] / 1e6:.2f} MB")
    if target == "vllm":
        click.echo(f"serve with: vllm serve {summary['base_model']} --enable-lora "
                   f"--max-lora-rank {vllm_rank(summary['r'])} --lora-modules NAME={output}")
    click.echo(f"wrote {output}")
