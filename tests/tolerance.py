"""Float bounds the tests assert, each recorded with the value it bounded: in, a measured error and its bound;
out, an assertion, and with MOEGRAFT_TOLERANCE_LOG set one JSON line per check for bench_tolerances.py.

Every bound in the suite goes through `within` or `close`, so one run under other thread counts and seeds shows
how much of each bound the arithmetic uses (benchmarks/bench_tolerances.py). A bound is set at least 5x over the
largest value seen there and its comment says where it comes from: a bound that only one machine meets is a defect.
"""

from __future__ import annotations

import json
import os

import torch


def _record(value: float, bound: float, what: str) -> None:
    log = os.environ.get("MOEGRAFT_TOLERANCE_LOG")
    if not log:
        return
    # "tests/test_x.py::test_y[param] (call)": the node id without the phase
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    with open(log, "a") as f:
        f.write(json.dumps({"test": test, "what": what, "value": value, "bound": bound}) + "\n")


def within(value, bound: float, what: str) -> None:
    """Assert `value <= bound` (a measured error, a tensor of one element or a float) and record both."""
    value = float(value)
    _record(value, float(bound), what)
    assert value <= bound, f"{what}: {value:.4g} > bound {bound:.4g}"


def close(actual, expected, *, rel: float = 0.0, abs: float = 0.0, what: str) -> None:  # noqa: A002 (pytest's names)
    """Assert |actual - expected| <= abs + rel * |expected| elementwise (tensors or floats), as pytest.approx and
    torch.allclose do, and record the largest share of that bound used (so the bound recorded is 1)."""
    # detached: a compared value may carry a gradient (a loss), which float() of it would warn about
    a = torch.as_tensor(actual, dtype=torch.float64).detach()
    e = torch.as_tensor(expected, dtype=torch.float64).detach()
    assert a.shape == e.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(e.shape)}"
    if not (abs > 0 or rel > 0):
        raise ValueError("close() needs abs or rel > 0; use torch.equal for an exact check")
    diff = (a - e).abs()
    # equal elements use none of the bound, even where it is 0 (rel only, expected 0)
    used = float(torch.where(diff == 0, 0.0, diff / (abs + rel * e.abs())).max()) if a.numel() else 0.0
    _record(used, 1.0, f"{what} [share of {abs:g} + {rel:g}|x|]")
    assert used <= 1.0, f"{what}: |diff| is {used:.4g}x the bound {abs:g} + {rel:g}|x|"
