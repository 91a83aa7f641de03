"""bnlib.printing: rounded, negative-zero-free output for reproducible notebooks."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from _helpers import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlib.printing import below, fmt, print_table


@pytest.mark.parametrize(
    "value, sig, expected",
    [
        (0.123456, 4, "0.1235"),
        (0.123456, 2, "0.12"),
        (2 / 3, 3, "0.667"),
        (123456.789, 3, "1.23e+05"),
        (1e-10, 4, "1e-10"),
        (-1e-20, 3, "-1e-20"),  # tiny but not zero: keeps its sign
        (0.1 + 0.2, 4, "0.3"),  # rounding hides the last-bit noise
        (1 - 1e-12, 4, "1"),
        (1.0, 4, "1"),
        (-2.5, 4, "-2.5"),
        (0.0, 4, "0"),
        (-0.0, 4, "0"),  # no negative zero
        (float("nan"), 4, "nan"),
        (float("inf"), 4, "inf"),
        (float("-inf"), 4, "-inf"),
        (3, 4, "3"),  # ints as they are, whatever sig
        (123456789, 2, "123456789"),
        (True, 4, "True"),
        (False, 4, "False"),
        ("text", 4, "text"),
        (None, 4, "None"),
    ],
)
def test_fmt_scalars(value, sig, expected):
    assert fmt(value, sig=sig) == expected


def test_fmt_default_is_four_significant_digits():
    assert fmt(math.pi) == "3.142"
    assert fmt(-math.e * 1e-7) == "-2.718e-07"


@pytest.mark.parametrize(
    "value, expected",
    [
        (np.float64(-0.0), "0"),
        (np.float32(0.5), "0.5"),
        (np.float16(-0.0), "0"),
        (np.int64(7), "7"),
        (np.bool_(True), "True"),
        (np.array(0.123456), "0.1235"),
        (np.array([1.234567, -0.0, 2.0]), "[1.235, 0, 2]"),
        (np.array([[1, 2], [3, 4]]), "[[1, 2], [3, 4]]"),
        (np.array([[0.5, -0.0], [1e-9, -3.14159]]), "[[0.5, 0], [1e-09, -3.142]]"),
        (np.array([], dtype=np.float64), "[]"),
        ([0.1, [-0.0, 2 / 3], (1, 2.0)], "[0.1, [0, 0.6667], [1, 2]]"),
        ((1.0, 2.5), "[1, 2.5]"),
        ([np.float64(-0.0), torch.tensor(0.25)], "[0, 0.25]"),
    ],
)
def test_fmt_arrays_and_nested_lists(value, expected):
    assert fmt(value) == expected


@pytest.mark.parametrize("device", DEVICES)
def test_fmt_tensors(device):
    assert fmt(torch.tensor(-0.0, device=device)) == "0"
    assert fmt(torch.tensor([1.234567, -0.0], device=device)) == "[1.235, 0]"
    assert fmt(torch.tensor([[1, 2]], device=device)) == "[[1, 2]]"
    t = torch.tensor([0.5, -1.0 / 3], device=device, requires_grad=True) * 2
    assert fmt(t, sig=2) == "[1, -0.67]"  # works on tensors that carry a graph
    assert fmt(torch.tensor([0.1], dtype=torch.bfloat16, device=device), sig=2) == "[0.1]"
    assert fmt(torch.tensor(True, device=device)) == "True"


def test_fmt_of_a_float32_value_does_not_depend_on_its_last_bits():
    a = np.float32(0)
    for _ in range(10):
        a += np.float32(0.1)  # 1.0000001 in float32
    b = np.float32(1)
    assert a != b and fmt(a) == fmt(b) == "1"


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not abs(v) > 1e300),
    st.integers(1, 8),
)
def test_fmt_never_prints_negative_zero_and_rounds_correctly(v, sig):
    s = fmt(v, sig=sig)
    assert not re.fullmatch(r"-0(\.0*)?(e[+-]?\d+)?", s), s
    if math.isfinite(v):
        back = float(s)
        if v == 0:
            assert s == "0"
        else:
            digits = 10 ** (math.floor(math.log10(abs(v))) - sig + 1)
            assert abs(back - v) <= 0.5 * digits * (1 + 1e-9) + 1e-300, (v, s)
            assert math.copysign(1, back) == math.copysign(1, v)


def test_print_table_layout(capsys):
    print_table(["name", "value"], [["a", 0.123456], ["bb", -0.0]])
    assert capsys.readouterr().out == (
        "name   value\n"
        "----  ------\n"
        "   a  0.1235\n"
        "  bb       0\n"
    )


def test_print_table_formats_every_kind_of_cell(capsys):
    rows = [
        [1, 2 / 3, np.float64(-0.0), torch.tensor(1e-12)],
        [10, np.float32(2.5), torch.tensor([0.5, -0.0]), True],
    ]
    print_table(["n", "x", "arr", "t"], rows, sig=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        " n     x       arr      t",
        "--  ----  --------  -----",
        " 1  0.67         0  1e-12",
        "10   2.5  [0.5, 0]   True",
    ]
    assert len({len(line) for line in lines}) == 1  # aligned


def test_print_table_headers_only(capsys):
    print_table(["a", "long header"], [])
    assert capsys.readouterr().out == "a  long header\n-  -----------\n"


def test_print_table_row_length_must_match_headers():
    with pytest.raises((ValueError, IndexError)):
        print_table(["a", "b"], [[1, 2, 3]])
    with pytest.raises((ValueError, IndexError)):
        print_table(["a", "b"], [[1]])


@pytest.mark.parametrize(
    "err, tol, expected",
    [
        (2.2e-16, 1e-12, "< 1e-12"),
        (0.0, 1e-12, "< 1e-12"),
        (1e-12, 1e-12, "1e-12"),  # not below: the value itself
        (3.14159e-3, 1e-6, "0.0031"),
        (float("nan"), 1e-12, "nan"),  # a broken check must show, not hide behind the bound
        (float("inf"), 1e-12, "inf"),
        (np.float32(1e-9), 1e-6, "< 1e-06"),
    ],
)
def test_below_prints_a_bound_or_the_value(err, tol, expected):
    assert below(err, tol) == expected


def test_below_of_a_tensor_scalar_and_default_tolerance():
    assert below(torch.tensor(5e-16, dtype=torch.float64)) == "< 1e-12"


@given(st.floats(min_value=0, max_value=1e-13), st.floats(min_value=0, max_value=1e-13))
@settings(max_examples=50, deadline=None)
def test_below_hides_the_digits_that_rounding_changes(a, b):
    """Two machines' rounding errors, however different, print the same line."""
    assert below(a, 1e-12) == below(b, 1e-12)


@pytest.mark.parametrize("err, tol", [(-1e-16, 1e-12), (1e-16, 0.0), (1e-16, -1.0)])
def test_below_rejects_negative_errors_and_non_positive_tolerances(err, tol):
    with pytest.raises(ValueError, match="below"):
        below(err, tol)
