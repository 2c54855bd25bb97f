"""A layer x expert heatmap [L, E] whose memory does not grow with the model.

Why: `imshow` resamples the grid to the output's pixel size and colour-maps that image in float64
RGBA; at Qwen3-30B-A3B's 48 x 128 cells drawn 0.35 x 0.45 inch each at 110 dpi that alone was
~330 MiB, the peak of `pascal profile` on the 48-layer shape-real model (docs/scale.md).
`pcolormesh` draws one quad per cell instead, and the figure is capped at `MAX_INCHES` a side
(a 256-expert model would otherwise be 90 inches wide): 48 MiB for the same grid.
"""

from __future__ import annotations

import numpy as np

MAX_INCHES = 24.0


def figsize(width: float, height: float) -> tuple[float, float]:
    """(width, height) in inches, each capped at MAX_INCHES."""
    return min(width, MAX_INCHES), min(height, MAX_INCHES)


def draw(ax, grid: np.ndarray, **kwargs):
    """Cells of `grid` [L, E] centred on integer (expert, layer) coordinates, layer 0 on top, as `imshow`
    places them; kwargs go to `pcolormesh` (cmap, norm, vmin, vmax); returns the mappable for a colorbar."""
    L, E = grid.shape
    im = ax.pcolormesh(np.arange(E + 1) - 0.5, np.arange(L + 1) - 0.5, grid, **kwargs)
    ax.set_xlim(-0.5, E - 0.5)
    ax.set_ylim(L - 0.5, -0.5)
    return im
