"""``deltacomp push`` / ``pull``: share packages on the Hugging Face Hub (the token: huggingface_hub's sources)."""

from __future__ import annotations

import json

import click

from deltacomp.cli import cli, handle_errors
from deltacomp.errors import DeltacompError


@cli.command()
@click.argument("package")
@click.argument("repo_id")
@click.option("--private/--public", default=None,
              help="Visibility of a repo this creates (default: the Hub's default); an existing repo keeps its own.")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing; default main).")
@click.option("--with-peft/--no-with-peft", default=False, show_default=True,
              help="Also upload the package as a PEFT LoRA adapter in peft/.")
@click.option("--base", default=None, help="The base model, for --with-peft when tensors outside the compressed "
                                           "layers changed (see deltacomp export).")
@click.option("--max-rank", type=int, default=None, help="With --with-peft: cap the adapter's rank.")
@click.option("--base-model", default=None,
              help="Hub id for the card's base_model metadata (default: the base's Hub id, if it came from the Hub).")
@click.option("-m", "--message", default=None, help="Commit message.")
@click.option("--progress/--no-progress", default=None, help="Show upload progress (default: on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def push(package, repo_id, private, revision, with_peft, base, max_rank, base_model, message, progress, as_json):
    """Upload PACKAGE (folder or Hub id) to the Hub repo REPO_ID with a generated model card."""
    from deltacomp.publish import PEFT_FOLDER
    from deltacomp.publish import push as run

    if not with_peft:
        if max_rank is not None or base is not None:
            raise DeltacompError("--max-rank and --base only apply with --with-peft")
        result = run(package, repo_id, private=private, revision=revision, base_model=base_model, message=message,
                     progress=progress)
    else:
        from deltacomp.export.peft import PeftExportConfig, export_peft
        from deltacomp.fusion.folder import is_gate_folder
        from deltacomp.io.hub import check_repo_id
        from deltacomp.io.output import scratch_dir

        check_repo_id(repo_id)
        if is_gate_folder(package):
            raise DeltacompError(f"{package} is a fusion gate; --with-peft and --base-model apply to packages only")
        with scratch_dir("push-peft") as tmp:
            export_peft(package, tmp / PEFT_FOLDER, base, PeftExportConfig(max_rank=max_rank), progress=False)
            result = run(package, repo_id, private=private, revision=revision, attach={PEFT_FOLDER: tmp / PEFT_FOLDER},
                         base_model=base_model, message=message, progress=progress)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"pushed {len(result['files'])} files to {repo_id} ({result['revision']}) "
               f"as commit {result['commit']}")
    click.echo(result["url"])


@cli.command()
@click.argument("repo")
@click.option("-o", "--output", required=True, help="Package folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--progress/--no-progress", default=None, help="Show download progress (default: on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def pull(repo, output, overwrite, progress, as_json):
    """Download the package REPO (org/name[@revision]) into a folder, checking every file's sha256."""
    from deltacomp.publish import pull as run

    result = run(repo, output, overwrite=overwrite, progress=progress)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"pulled {repo} at commit {result['commit']}: {len(result['files'])} files, all verified")
    click.echo(f"wrote {output}")
