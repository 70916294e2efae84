"""PNG figures of an evaluation (``deltacomp eval --plot DIR``). matplotlib (the ``plot`` extra) loads lazily."""

from __future__ import annotations

import os
from pathlib import Path

from deltacomp.errors import DeltacompError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DeltacompError("--plot needs matplotlib: pip install 'deltacomp[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    return name.removesuffix(".weight").replace("model.layers.", "L").replace("encoder.layer.", "L")


def plot_spectra(spectra: dict, path: Path) -> Path:
    """Singular values of each module's delta (log scale), the kept rank marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, d in spectra.items():
        s = d["singular_values"]
        line = ax.semilogy(range(1, len(s) + 1), s, label=_short(name))[0]
        kept = len(d["vector_bits"])
        if 0 < kept <= len(s):
            ax.axvline(kept, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("singular vector (descending)")
    ax.set_ylabel("singular value of the delta")
    ax.set_title("Delta spectra (dotted: rank kept by the package)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bits(spectra: dict, path: Path) -> Path:
    """Bits given to each kept singular vector of each module."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, d in spectra.items():
        bits = d["vector_bits"]
        if bits:
            ax.step(range(1, len(bits) + 1), bits, where="post", label=_short(name))
    ax.set_xscale("log")
    ax.set_xlabel("singular vector (descending singular value, log scale)")
    ax.set_ylabel("bits per entry of the vector")
    ax.set_title("Bit allocation per singular vector")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_error_curve(curve: dict, path: Path) -> Path:
    """Global relative weight error of each method against the budget in bits per entry."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, points in curve.items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (bits per delta entry)")
    ax.set_ylabel("relative error ||dW - dW_hat|| / ||dW||")
    ax.set_title("Error against budget")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(result: dict, folder: str | os.PathLike) -> list[Path]:
    """Every figure the result has data for; returns the files written."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if result.get("spectra"):
        written.append(plot_spectra(result["spectra"], out / "spectra.png"))
        written.append(plot_bits(result["spectra"], out / "bits.png"))
    if result.get("curve"):
        written.append(plot_error_curve(result["curve"], out / "error_vs_budget.png"))
    return written
