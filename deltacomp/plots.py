"""PNG figures of an evaluation (``deltacomp eval --plot DIR``). matplotlib (the ``plot`` extra) loads lazily."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def _figure(path: Path, title: str, xlabel: str, ylabel: str, size=(7, 4.5), legend_size=8) -> Iterator:
    """Yield the axes of a new figure; label it, add the legend and write it to ``path`` as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def _short(name: str) -> str:
    return name.removesuffix(".weight").replace("model.layers.", "L").replace("encoder.layer.", "L")


def plot_spectra(spectra: dict, path: Path) -> Path:
    """Singular values of each module's delta (log scale), the kept rank marked."""
    with _figure(path, "Delta spectra (dotted: rank kept by the package)", "singular vector (descending)",
                 "singular value of the delta") as ax:
        for name, d in spectra.items():
            s = d["singular_values"]
            line = ax.semilogy(range(1, len(s) + 1), s, label=_short(name))[0]
            kept = len(d["vector_bits"])
            if 0 < kept <= len(s):
                ax.axvline(kept, color=line.get_color(), linestyle=":", linewidth=1)
    return path


def plot_bits(spectra: dict, path: Path) -> Path:
    """Bits given to each kept singular vector of each module."""
    with _figure(path, "Bit allocation per singular vector", "singular vector (descending singular value, log scale)",
                 "bits per entry of the vector") as ax:
        for name, d in spectra.items():
            bits = d["vector_bits"]
            if bits:
                ax.step(range(1, len(bits) + 1), bits, where="post", label=_short(name))
        ax.set_xscale("log")
    return path


def plot_error_curve(curve: dict, path: Path) -> Path:
    """Global relative weight error of each method against the budget in bits per entry."""
    with _figure(path, "Error against budget", "budget (bits per delta entry)",
                 "relative error ||dW - dW_hat|| / ||dW||", size=(6, 4.5), legend_size=None) as ax:
        for method, points in curve.items():
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
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
