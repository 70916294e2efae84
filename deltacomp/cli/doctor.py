"""``deltacomp doctor``: versions, devices, and which path runs the dequant-matmul op on CUDA tensors, and why."""

from __future__ import annotations

import json
import platform

import click

from deltacomp.cli import cli, handle_errors


def report() -> dict:
    import torch

    from deltacomp import __version__, native

    st = native.status()
    cuda = torch.cuda.is_available()
    return {
        "deltacomp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "kernel_path": st.path,
        "kernel_reason": st.reason,
        "kernel_error": st.error,
    }


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def doctor(as_json):
    """Show torch/CUDA versions and the active kernel path (CUDA extension, JIT build, or the pure-torch twin)."""
    r = report()
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    cuda = r["torch_cuda"] or "none"
    click.echo(f"deltacomp {r['deltacomp']}, python {r['python']}, torch {r['torch']} (CUDA {cuda})")
    click.echo(f"GPUs: {', '.join(r['devices']) or 'none visible'}")
    click.echo(f"kernel path: {r['kernel_path']} ({r['kernel_reason']})")
    if r["kernel_error"]:
        click.echo(f"kernel error (raised at the first CUDA call): {r['kernel_error']}")
