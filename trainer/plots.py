"""PNG plots beside the SAE: training curves and the feature density histogram (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """FVU, MSE, L0, dead fraction and learning rate against step."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    panels = [
        ("fvu", "FVU", True),
        ("mse", "MSE", True),
        ("l0", "L0", False),
        ("dead_frac", "dead fraction", False),
        ("lr", "learning rate", False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title, log) in zip(axes, panels):
        ax.plot(steps, [r.get(key) for r in records])
        ax.set_title(title)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for resumed in sorted({r["resumed_from"] for r in records if r.get("resumed_from") is not None}):
        for ax in axes:
            ax.axvline(resumed, color="grey", linestyle=":", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_density_histogram(histogram: dict[str, Any], path: Path) -> Path:
    """log10 feature density histogram; never-active features noted in the title."""
    plt = _pyplot()
    edges, counts = histogram["log10_bin_edges"], histogram["counts"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.stairs(counts, edges, fill=True)
    ax.set_xlabel("log10 feature density (held-out tokens)")
    ax.set_ylabel("features")
    ax.set_title(f"feature density ({histogram['never_active']} never active)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
