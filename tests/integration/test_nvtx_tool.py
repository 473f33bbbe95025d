"""NVTX ranges proven end to end: the real `nvtx` package talking to a real injection tool, no GPU.

Each test runs a fresh interpreter (NVTX picks its tool once per process) under
`tests/nvtx_tool/nvtx_logger.c`, and checks the lines the tool wrote.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.nvtx_tool.harness import range_events, run_script_with_tool, run_with_tool

pytest.importorskip("nvtx", reason="the nvtx package is not installed")


def _balanced(events: list[tuple[str, str, str]]) -> bool:
    depth = 0
    for kind, _, _ in events:
        depth += {"push": 1, "pop": -1}.get(kind, 0)
        if depth < 0:
            return False
    return depth == 0


def test_nvtx_ranges_reach_the_tool_in_order(tmp_path: Path) -> None:
    # GIVEN a script that nests two ranges and drops a mark through NvtxRanges
    script = textwrap.dedent(
        """
        from kvtrace.nvtx_ranges import NvtxRanges
        ranges = NvtxRanges()
        assert ranges.enabled, "the logger tool is attached, so NVTX must be live"
        ranges.push("prefill")
        ranges.push("kv_update L0")
        ranges.pop()
        ranges.pop()
        ranges.mark("evict")
        """
    )
    # WHEN it runs under the logger tool
    events = run_with_tool(script, tmp_path)

    # THEN the tool saw the domain, each string registered once, and the ranges in call order
    kvtrace_events = [e for e in events if e[1] == "kvtrace"]
    assert kvtrace_events == [
        ("domain", "kvtrace", ""),
        ("register", "kvtrace", "prefill"),
        ("push", "kvtrace", "prefill"),
        ("register", "kvtrace", "kv_update L0"),
        ("push", "kvtrace", "kv_update L0"),
        ("pop", "kvtrace", ""),
        ("pop", "kvtrace", ""),
        ("register", "kvtrace", "evict"),
        ("mark", "kvtrace", "evict"),
    ]
    assert range_events(events, domain=None) == range_events(events), "ranges outside the kvtrace domain"
    assert _balanced(range_events(events))


def test_each_message_is_registered_once(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        from kvtrace.nvtx_ranges import NvtxRanges
        ranges = NvtxRanges()
        for _ in range(3):
            ranges.push("decode")
            ranges.mark("decode")
            ranges.pop()
        """
    )
    events = run_with_tool(script, tmp_path)
    registers = [e for e in events if e[0] == "register"]
    assert registers == [("register", "kvtrace", "decode")]
    one_step = [("push", "kvtrace", "decode"), ("mark", "kvtrace", "decode"), ("pop", "kvtrace", "")]
    assert range_events(events) == one_step * 3


def test_custom_domain_and_awkward_message(tmp_path: Path) -> None:
    script = textwrap.dedent(
        r"""
        from kvtrace.nvtx_ranges import NvtxRanges
        ranges = NvtxRanges("kvtrace-test")
        ranges.push("layer\t3\\n")
        ranges.pop()
        """
    )
    events = run_with_tool(script, tmp_path)
    assert range_events(events, domain="kvtrace-test") == [
        ("push", "kvtrace-test", "layer\t3\\n"),
        ("pop", "kvtrace-test", ""),
    ]


def test_no_tool_means_disabled_and_silent(tmp_path: Path) -> None:
    # "./." is NVTX's explicit request for no injection library.
    script = textwrap.dedent(
        """
        import sys
        from kvtrace.nvtx_ranges import NvtxRanges
        ranges = NvtxRanges()
        ranges.push("prefill")
        ranges.mark("evict")
        ranges.pop()
        print(ranges.enabled, "torch" in sys.modules)
        """
    )
    run = run_script_with_tool(script, tmp_path, extra_env={"NVTX_INJECTION64_PATH": "./."})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]
    assert run.events == []


def test_missing_nvtx_package_means_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtrace.nvtx_ranges import NvtxRanges

    monkeypatch.setitem(sys.modules, "nvtx", None)  # makes `import nvtx` raise ImportError
    ranges = NvtxRanges()
    assert not ranges.enabled
    ranges.push("prefill")
    ranges.mark("evict")
    ranges.pop()


def test_a_crashing_process_leaves_its_lines(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os
        from kvtrace.nvtx_ranges import NvtxRanges
        ranges = NvtxRanges()
        ranges.push("prefill")
        ranges.mark("about to crash")
        os.abort()
        """
    )
    run = run_script_with_tool(script, tmp_path)
    assert run.returncode != 0
    assert range_events(run.events) == [("push", "kvtrace", "prefill"), ("mark", "kvtrace", "about to crash")]


# Drives the tool through two fake NVTX copies with ctypes, covering what the nvtx package never
# sends: ASCII messages, the default domain, start/end ranges, and a second initialisation.
_FAKE_NVTX_COPIES = textwrap.dedent(
    """
    import ctypes, json, os
    from ctypes import CFUNCTYPE, POINTER, Structure, c_char_p, c_int, c_int32, c_uint, c_uint16
    from ctypes import c_uint32, c_uint64, c_void_p, c_size_t, addressof, sizeof

    ASCII, REGISTERED = 1, 3

    class Attr(Structure):
        _fields_ = [("version", c_uint16), ("size", c_uint16), ("category", c_uint32),
                    ("colorType", c_int32), ("color", c_uint32), ("payloadType", c_int32),
                    ("reserved0", c_int32), ("payload", c_uint64), ("messageType", c_int32),
                    ("message", c_void_p)]

    GetTable = CFUNCTYPE(c_int, c_int, POINTER(c_void_p), POINTER(c_uint))
    GetExportTable = CFUNCTYPE(c_void_p, c_uint32)

    class Callbacks(Structure):
        _fields_ = [("struct_size", c_size_t), ("get_module_function_table", GetTable)]

    class FakeNvtxCopy:
        # One compiled copy of NVTX: per module, slots for function pointers and a table of their addresses.
        def __init__(self):
            self.slots = {m: (c_void_p * 17)() for m in (1, 5)}  # CORE, CORE2
            self.tables = {
                m: (c_void_p * 17)(None, *[addressof(s) + i * sizeof(c_void_p) for i in range(1, 17)])
                for m, s in self.slots.items()
            }
            def get_table(module, out_table, out_size):
                if module not in self.tables:
                    return 0
                out_table[0] = addressof(self.tables[module])
                out_size[0] = 16
                return 1
            self.get_table = GetTable(get_table)
            self.callbacks = Callbacks(sizeof(Callbacks), self.get_table)
            self.get_export_table = GetExportTable(
                lambda etid: addressof(self.callbacks) if etid == 1 else None
            )

        def fn(self, module, cbid, restype, *argtypes):
            address = self.slots[module][cbid]
            assert address, f"slot {module}/{cbid} left empty"
            return CFUNCTYPE(restype, *argtypes)(address)

    tool = ctypes.CDLL(os.environ["NVTX_INJECTION64_PATH"])
    tool.InitializeInjectionNvtx2.argtypes = [GetExportTable]
    first, second = FakeNvtxCopy(), FakeNvtxCopy()
    status = [tool.InitializeInjectionNvtx2(c.get_export_table) for c in (first, second)]

    def attr(kind, message):
        a = Attr(version=3, size=sizeof(Attr), messageType=kind)
        a.message = ctypes.cast(message, c_void_p).value
        return a

    create = first.fn(5, 12, c_void_p, c_char_p)
    register = second.fn(5, 10, c_void_p, c_void_p, c_char_p)  # handles are shared across copies
    domain = create(b"kvtrace")
    handle = register(domain, b"prefill")
    keep = [c_char_p(b"decode step 1"), c_char_p(b"evict 3"), c_char_p(b"copy")]
    first.fn(5, 4, c_int, c_void_p, POINTER(Attr))(domain, attr(REGISTERED, handle))
    second.fn(5, 4, c_int, c_void_p, POINTER(Attr))(domain, attr(ASCII, keep[0]))
    second.fn(5, 5, c_int, c_void_p)(domain)
    first.fn(5, 5, c_int, c_void_p)(domain)
    first.fn(5, 1, None, c_void_p, POINTER(Attr))(domain, attr(ASCII, keep[1]))
    range_id = second.fn(5, 2, c_uint64, c_void_p, POINTER(Attr))(domain, attr(ASCII, keep[2]))
    first.fn(5, 3, None, c_void_p, c_uint64)(domain, range_id)
    second.fn(1, 9, c_int, c_char_p)(b"global")
    second.fn(1, 11, c_int)()
    second.fn(1, 2, None, c_char_p)(b"global mark")
    print(json.dumps(status))
    """
)


def test_tool_fills_every_copy_and_resolves_ascii_and_registered(tmp_path: Path) -> None:
    run = run_script_with_tool(_FAKE_NVTX_COPIES, tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [1, 1], "each NVTX copy must get a successful initialisation"
    assert run.events == [
        ("domain", "kvtrace", ""),
        ("register", "kvtrace", "prefill"),
        ("push", "kvtrace", "prefill"),
        ("push", "kvtrace", "decode step 1"),
        ("pop", "kvtrace", ""),
        ("pop", "kvtrace", ""),
        ("mark", "kvtrace", "evict 3"),
        ("start", "kvtrace", "copy"),
        ("end", "kvtrace", "copy"),
        ("push", "", "global"),
        ("pop", "", ""),
        ("mark", "", "global mark"),
    ]


_TIMING = textwrap.dedent(
    """
    import json, time
    import nvtx
    from kvtrace.nvtx_ranges import NvtxRanges

    def per_pair_ns(push, pop, n=20_000):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                push()
                pop()
            best = min(best, (time.perf_counter_ns() - t0) / n)
        return best

    ranges = NvtxRanges()
    domain = nvtx.get_domain("kvtrace-bare")
    attributes = domain.get_event_attributes(message="step")
    print(json.dumps({
        "enabled": ranges.enabled,
        "NvtxRanges push/pop": per_pair_ns(lambda: ranges.push("step"), ranges.pop),
        "nvtx domain push_range/pop_range": per_pair_ns(
            lambda: domain.push_range(attributes), domain.pop_range),
        "empty loop (lambda + call)": per_pair_ns(lambda: None, lambda: None),
    }))
    """
)


@pytest.mark.slow
def test_measure_cost_per_range(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    """Measures, never asserts, the cost of one push/pop pair with and without a tool."""
    rows: dict[str, dict[str, object]] = {}
    setups: dict[str, dict[str, str]] = {
        "no tool": {"NVTX_INJECTION64_PATH": "./."},
        "tool, not logging": {"KVTRACE_NVTX_LOG": ""},
        "tool, logging to a file": {},
    }
    for label, extra_env in setups.items():
        run = run_script_with_tool(_TIMING, tmp_path, extra_env=extra_env, timeout_s=300)
        assert run.returncode == 0, run.stderr
        rows[label] = json.loads(run.stdout)
        record_property(f"nvtx ns per pair, {label}", rows[label])
    print()
    for label, row in rows.items():
        cells = ", ".join(f"{k} {v:.0f} ns" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        print(f"{label:24} {cells}")
