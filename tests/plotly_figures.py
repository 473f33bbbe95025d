"""Plotly figures as the browser gets them, for the tests of the HTML report and the TensorBoard tab: the
data and layout of a `Plotly.newPlot` call in a page, or a figure served as JSON, with the numeric arrays
plotly writes as base64 (`{"dtype": "f8", "bdata": ...}`) decoded to plain lists."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import numpy as np

__all__ = ["decoded", "page_configs", "page_figure"]


def decoded(value: Any) -> Any:
    """A figure (or any part of one) with every base64 array as a list of numbers."""
    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        array = np.frombuffer(
            base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]).newbyteorder("<")
        )
        if "shape" in value:
            array = array.reshape([int(n) for n in str(value["shape"]).split(",")])
        return array.tolist()
    if isinstance(value, dict):
        return {key: decoded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decoded(item) for item in value]
    return value


def page_figure(page: str, div_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(traces, layout) of the plot drawn into `div_id` by a page that plotly's `to_html` wrote."""
    call = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', page)
    assert call is not None, f"no plot {div_id!r} in the page"
    decoder = json.JSONDecoder()
    traces, end = decoder.raw_decode(page, call.end())
    comma = re.compile(r"\s*,\s*").match(page, end)
    assert comma is not None
    layout, _ = decoder.raw_decode(page, comma.end())
    return decoded(traces), decoded(layout)


def page_configs(page: str) -> list[dict[str, Any]]:
    """The config (newPlot's fourth argument, after the data and the layout) of every plot a page draws."""
    decoder = json.JSONDecoder()
    comma = re.compile(r"\s*,\s*")
    configs = []
    for call in re.finditer(r'Plotly\.newPlot\(\s*"[^"]*",\s*', page):
        end = call.end()
        for _ in range(2):  # skip the data, then the layout
            end = decoder.raw_decode(page, end)[1]
            after = comma.match(page, end)
            assert after is not None, "a newPlot call without a config"
            end = after.end()
        configs.append(decoder.raw_decode(page, end)[0])
    return configs
