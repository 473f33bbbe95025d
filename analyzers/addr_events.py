"""A device's events at some addresses, grouped by address, for the KV log's join (`analyzers.attribution`).

Each group is a range of flat lists sorted by address, each address's events in index order: a storage's
candidates are read through `bisect`'s and `range`'s bounds, not copied. A dict of three lists per address
was most of a long light run's join memory (180,000 addresses of a 4,000-token run of 32 layers: 100 MiB
for the allocations alone), and that join is the peak of `report`, `diagnose` and `plan --from-run`.
"""

from __future__ import annotations

import numpy as np

from analyzers.model import DeviceEvents

__all__ = ["AddrEvents"]


class AddrEvents:
    """The events `indices` (ascending) of `dev`, by address: `span(addr)` is `(lo, hi, in_time_order)`, the
    address's events being `indices[lo:hi]` in index order, with their `times` (µs) and `sizes` (bytes
    allocated, or freed as negative) at the same positions; `in_time_order`: whether their times never go
    back (a bisect may search them). `values=False`: the indices alone (`times` and `sizes` empty, every
    address read as in time order), where that is all the caller reads."""

    def __init__(self, dev: DeviceEvents, indices: np.ndarray, values: bool = True) -> None:
        addrs = dev.addr[indices]
        order = np.argsort(addrs, kind="stable")  # stable: each address's events stay in index order
        by_addr = addrs[order]
        self.indices: list[int] = indices[order].tolist()
        times = dev.ts_us[indices][order]
        self.times: list[float] = times.tolist() if values else []
        self.sizes: list[int] = dev.delta_bytes[indices][order].tolist() if values else []
        count = len(by_addr)
        starts = np.flatnonzero(np.concatenate(([True], by_addr[1:] != by_addr[:-1]))) if count else by_addr
        ends = np.append(starts[1:], count).astype(np.int64)
        if values and count:
            # a pair of one address's events whose times go back (or are not numbers, as `a <= b` reads them)
            back = ~(times[:-1] <= times[1:]) & (by_addr[1:] == by_addr[:-1])
            seen_back = np.concatenate(([0], np.cumsum(back)))
            in_order = seen_back[ends - 1] == seen_back[starts]
        else:
            in_order = np.ones(len(starts), dtype=bool)
        packed = (starts.astype(np.int64) << 32) | (ends << 1) | in_order.astype(np.int64)
        self._spans: dict[int, int] = dict(zip(by_addr[starts].tolist(), packed.tolist(), strict=True))

    def span(self, addr: int) -> tuple[int, int, bool] | None:
        """`(lo, hi, in_time_order)` of the address's events; None where it has none."""
        packed = self._spans.get(addr)
        if packed is None:
            return None
        return packed >> 32, (packed >> 1) & 0x7FFFFFFF, bool(packed & 1)

    def __len__(self) -> int:
        """How many addresses have events."""
        return len(self._spans)
