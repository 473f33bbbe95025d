"""Python stacks for the memory events of a Chrome trace recorded with `with_stack=True`.

Kineto does not attach a stack to a `[memory]` event; it writes `python_function` ranges
("transformers/cache_utils.py(123): update") that enclose it in time. A second streaming pass collects
those ranges, and a sweep over time gives each allocation the stack of ranges open at its moment.
Limitation: ranges of all threads are merged, which is exact for the usual single-threaded generate loop.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any

import numpy as np

from analyzers.model import MemorySource
from analyzers.readers.chrome_trace import offset_us
from analyzers.readers.json_stream import JsonStream
from analyzers.readers.sources import open_input
from analyzers.readers.unescaped_names import merge_unescaped_names

_FRAME = re.compile(r"^(?P<file>.*)\((?P<line>\d+)\): (?P<func>.*)$")


def _normalise(name: str) -> str:
    """Kineto's "file(line): func" -> the "file:line:func" form snapshots use, so one rule list fits both."""
    match = _FRAME.match(name)
    return f"{match['file']}:{match['line']}:{match['func']}" if match else name


def _collect(path: str | os.PathLike[str]) -> tuple[list[tuple[float, float, str]], Any, Counter[str]]:
    ranges: list[tuple[float, float, str]] = []
    top: dict[str, Any] = {}

    def on_event(event: Any) -> None:
        if isinstance(event, dict) and event.get("cat") == "python_function" and event.get("ph") == "X":
            start = float(event.get("ts", 0))
            ranges.append((start, start + float(event.get("dur", 0)), str(event.get("name", ""))))

    with open_input(path, None) as binary:
        stream = JsonStream(binary, str(path))
        if stream.peek() != "{":
            return ranges, None, stream.unescaped_names
        stream.pos += 1
        while stream.peek() != "}":
            key = stream.value("the top-level object")
            stream.expect(":", "the top-level object")
            if key == "traceEvents":
                stream.each_element("traceEvents", on_event, ('"python_function"',))
            else:
                kept = key == "baseTimeNanoseconds"  # the one field this pass needs: the others are dropped
                value = stream.value("a top-level field", dropped=not kept)
                if kept:
                    top[key] = value
            if stream.expect(",}", "the top-level object") == "}":
                break
    return ranges, top.get("baseTimeNanoseconds"), stream.unescaped_names


def attach_python_stacks(source: MemorySource, path: str | os.PathLike[str]) -> int:
    """Fill `frame_id` of every device's events from the trace's python_function ranges; returns how many
    allocation events got a stack (0 when the trace was recorded without stacks)."""
    ranges, base_ns, unescaped = _collect(path)
    merge_unescaped_names(source.meta, unescaped)
    if not ranges:
        return 0
    offset = float(offset_us(base_ns, False))  # the reader's own, so that both clocks agree
    ranges.sort(key=lambda r: (r[0], -r[1]))
    interned: dict[str, int] = {text: i for i, text in enumerate(source.frames)}
    with_stack = 0
    for dev in source.devices:
        frame_id = np.full(len(dev), -1, dtype=np.int32)
        order = np.argsort(dev.ts_us, kind="stable")
        stack: list[tuple[float, float, str]] = []
        next_range = 0
        cache: dict[tuple[int, ...], int] = {}
        for i in order:
            t = float(dev.ts_us[i]) - offset
            while next_range < len(ranges) and ranges[next_range][0] <= t:
                while stack and stack[-1][1] < ranges[next_range][0]:
                    stack.pop()
                stack.append(ranges[next_range])
                next_range += 1
            while stack and stack[-1][1] < t:
                stack.pop()
            if not stack or dev.delta_bytes[i] <= 0:
                continue
            key = tuple(id(r) for r in stack)
            fid = cache.get(key)
            if fid is None:
                text = "\n".join(_normalise(r[2]) for r in reversed(stack))
                fid = interned.setdefault(text, len(interned))
                if fid == len(source.frames):
                    source.frames.append(text)
                cache[key] = fid
            frame_id[i] = fid
            with_stack += 1
        dev.frame_id = frame_id
    return with_stack
