"""One figure style for the whole book.

Call :func:`use_book_style` once at the top of a chapter. It fixes the figure
size, resolution and fonts, and makes Jupyter store figures as PNG (SVG output
carries random ids that nbval would compare).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BOOK_COLORS", "use_book_style"]

#: Colour cycle used across the book (colour-blind friendly; Okabe & Ito).
BOOK_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]


def use_book_style(figsize: tuple[float, float] = (6.4, 3.6)) -> None:
    """Apply the book's matplotlib style, and PNG output in Jupyter.

    Parameters
    ----------
    figsize : (float, float), default (6.4, 3.6)
        Default figure size in inches; pass ``figsize=`` explicitly to
        ``plt.subplots`` for other shapes.
    """
    import matplotlib as mpl
    from cycler import cycler

    mpl.rcParams.update(
        {
            "figure.figsize": figsize,
            "figure.dpi": 110,
            "savefig.dpi": 220,
            "figure.constrained_layout.use": True,
            "axes.prop_cycle": cycler(color=BOOK_COLORS),
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "font.size": 10,
            "axes.titlesize": 10,
            "legend.fontsize": 9,
            "legend.frameon": False,
            "image.cmap": "viridis",
        }
    )
    try:  # inside IPython: store figures as (high-DPI) PNG only
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            from matplotlib_inline import backend_inline

            set_formats: Any = backend_inline.set_matplotlib_formats  # untyped upstream
            set_formats("retina")
    except ImportError:
        pass
