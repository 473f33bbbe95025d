"""NVTX ranges and marks in the "kvtrace" domain, so recordings line up with Nsight Systems timelines.

The recorder brackets prefill, decode steps and cache updates with ranges and drops a mark at each
eviction. Everything goes through the ``nvtx`` package's domain API with one ``EventAttributes``
object per distinct message, built (and its string registered with the tool) on first use and kept:
given a ``message=`` keyword instead, the package builds a fresh one on every call.

``enabled`` is False, and every method returns at once, when ``nvtx`` is not installed, when
``NVTX_DISABLE`` is set, or when no NVTX tool (Nsight Systems, or the test logger in
``tests/nvtx_tool``) is attached to the process. NVTX reads ``NVTX_INJECTION64_PATH`` once, at the
process's first NVTX call, so a tool cannot appear later and the check is made once, in ``__init__``.

Cost of one push/pop pair (``tests/integration/test_nvtx_tool.py::test_measure_cost_per_range`` prints
it; CPython 3.11, nvtx 0.2.17, a busy 2-core x86-64 container, best of several runs, loop included):

    no tool attached (enabled False)          ~0.1-0.2 us   about two empty Python calls
    a tool attached that records nothing      ~0.6-0.7 us   bare nvtx domain push_range/pop_range: ~0.35 us
    the test logger tool writing its file     ~3-5 us       the tool's two write(2) calls dominate

The ~0.3 us this class adds over bare domain calls is its two Python frames and the cache lookup;
the first use of a message costs more (the string is registered with the tool).

This module does not import torch, and imports ``nvtx`` only when an ``NvtxRanges`` is created.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NvtxRanges"]


class NvtxRanges:
    """Push, pop and mark NVTX events in one domain; no-ops unless a tool is listening.

    Ranges are per thread and must be popped on the thread that pushed them (NVTX's push/pop rule).
    """

    def __init__(self, domain: str = "kvtrace") -> None:
        self.domain = domain
        self.enabled = False
        # message -> nvtx EventAttributes, whose string is registered with the domain once.
        self._attributes: dict[str, Any] = {}
        self._domain: Any = None
        self._push_range: Any = None
        self._pop_range: Any = None
        self._mark: Any = None
        try:
            import nvtx
        except ImportError:
            return
        if not nvtx.enabled():
            return
        handle = nvtx.get_domain(domain)
        # Without a tool the package hands back its shared DummyDomain, whose calls do nothing.
        if not isinstance(handle, nvtx.Domain):
            return
        self._domain = handle
        # Bound once: attribute lookups on the Cython class show up at this call rate.
        self._push_range = handle.push_range
        self._pop_range = handle.pop_range
        self._mark = handle.mark
        self.enabled = True

    def push(self, name: str) -> None:
        """Open a nested range called ``name`` on this thread."""
        if not self.enabled:
            return
        try:
            attributes = self._attributes[name]
        except KeyError:
            attributes = self._attributes_for(name)
        self._push_range(attributes)

    def pop(self) -> None:
        """Close the innermost range this thread opened with :meth:`push`."""
        if not self.enabled:
            return
        self._pop_range()

    def mark(self, name: str) -> None:
        """Record an instant event called ``name``."""
        if not self.enabled:
            return
        try:
            attributes = self._attributes[name]
        except KeyError:
            attributes = self._attributes_for(name)
        self._mark(attributes)

    def _attributes_for(self, name: str) -> Any:
        attributes = self._domain.get_event_attributes(message=name)
        self._attributes[name] = attributes
        return attributes

    def __repr__(self) -> str:
        return f"NvtxRanges(domain={self.domain!r}, enabled={self.enabled})"
