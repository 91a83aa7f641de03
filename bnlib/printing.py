"""Printing numbers so that notebook outputs reproduce across machines.

The book's notebooks are checked by nbval, which compares printed text
exactly. Values are therefore printed rounded to a few significant digits,
with negative zero shown as ``0``, so that rounding noise from different
thread counts or BLAS builds does not change the output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["below", "fmt", "print_table"]


def _scalar(v: float, sig: int) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    s = f"{v:.{sig}g}"
    if float(s) == 0.0:  # no "-0" or "-0.0"
        return "0"
    return s


def fmt(value: Any, sig: int = 4) -> str:
    """Format a number, array or tensor with ``sig`` significant digits.

    Parameters
    ----------
    value : float, int, numpy array, torch tensor, or a (nested) sequence of these
    sig : int, default 4
        Significant digits.

    Returns
    -------
    str
        Scalars as e.g. ``'0.1235'`` or ``'1.2e-10'``; arrays as a bracketed,
        comma-separated list (nested for 2-D). Negative zero prints as ``0``.

    Examples
    --------
    >>> fmt(-1e-20, sig=3)
    '-1e-20'
    >>> fmt([0.123456, -0.0])
    '[0.1235, 0]'
    """
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().tolist()
    elif hasattr(value, "tolist"):  # numpy array or scalar
        value = value.tolist()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _scalar(value, sig)
    if isinstance(value, Iterable) and not isinstance(value, str):
        return "[" + ", ".join(fmt(v, sig) for v in value) + "]"
    return str(value)


def below(err: float, tol: float = 1e-12, sig: int = 2) -> str:
    """A tiny error printed as a bound: ``'< tol'`` when ``err < tol``, else the value.

    Rounding errors depend on the order in which a CPU adds numbers up, so
    their digits differ between machines; the bound does not. An error at or
    above ``tol`` (or NaN) is printed with :func:`fmt`, so a cell that checks a
    formula still shows when the formula is wrong.

    Examples
    --------
    >>> below(2.2e-16)
    '< 1e-12'
    >>> below(3.14159e-3, tol=1e-6)
    '0.0031'
    """
    err = float(err)
    if err < 0:
        raise ValueError(f"below() takes an error (an absolute value or a norm, >= 0); got {err}")
    if not tol > 0:
        raise ValueError(f"below() needs a tolerance > 0; got {tol}")
    if err < tol:
        return f"< {tol:g}"
    return _scalar(err, sig)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], sig: int = 4) -> None:
    """Print rows as an aligned plain-text table, numbers through :func:`fmt`.

    Parameters
    ----------
    headers : sequence of str
    rows : iterable of sequences, one value per header
    sig : int, default 4
        Significant digits for floating-point cells.
    """
    cells = [list(headers)] + [[fmt(v, sig) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))
