"""PNG heatmaps (layers x query heads) of the head reports; matplotlib is imported only here, on the Agg backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def head_grid(rows, field: str) -> np.ndarray:
    """``[n_layers, n_q_heads]`` of one report field (NaN where a layer has no such head)."""
    n_layers = max(r.layer for r in rows) + 1
    n_heads = max(r.q_head for r in rows) + 1
    grid = np.full((n_layers, n_heads), np.nan)
    for r in rows:
        grid[r.layer, r.q_head] = getattr(r, field)
    return grid


def plot_heads(rows, path: str | Path, title: str = "") -> Path:
    """Entropy (0..1) and phi gain (-1..1, > 0 where phi helps) side by side; returns the written path."""
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError("--plot needs matplotlib: pip install 'topkphi[plot]'") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("nothing to plot: no heads were inspected")
    entropy, gain = head_grid(rows, "entropy"), head_grid(rows, "phi_gain")
    n_layers, n_heads = entropy.shape
    size = (max(6.0, 1.2 + 0.45 * n_heads) * 2, max(3.0, 1.0 + 0.25 * n_layers))
    fig, axes = plt.subplots(1, 2, figsize=size, constrained_layout=True)
    panels = ((entropy, "H / log N (dense attention)", "viridis", 0.0, 1.0),
              (gain, "phi gain: (err Top-K - err phi) / max", "RdBu", -1.0, 1.0))
    for ax, (grid, label, cmap, lo, hi) in zip(axes, panels):
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(label)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
