"""Two readings of one trace (byte scan, whole text, streamed) hold the same devices, column for column."""

from __future__ import annotations

from typing import Any

import numpy as np

COLUMNS = ("ts_us", "addr", "delta_bytes", "total_allocated", "total_reserved")


def assert_same_devices(left: Any, right: Any) -> None:
    """Each device's columns (dtype and values, or both absent), baseline and capacity are equal."""
    assert [d.device for d in left.devices] == [d.device for d in right.devices]
    for one, other in zip(left.devices, right.devices, strict=True):
        for column in COLUMNS:
            a, b = getattr(one, column), getattr(other, column)
            assert (a is None) == (b is None), column
            if a is not None:
                assert a.dtype == b.dtype, column
                np.testing.assert_array_equal(a, b)
        assert (one.baseline_bytes, one.capacity_bytes) == (other.baseline_bytes, other.capacity_bytes)
