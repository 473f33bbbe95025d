"""What one event of kvtrace's KV log says beyond its fields: whether its tensor holds the KV itself (its
`part`) and in which layout, how many batch rows its tokens are per, and what its `reason` says (the kind of
eviction, a beam search's rows).
"""

from __future__ import annotations

from kvtrace.format import KvEvent

# Why tokens left a cache: its own sliding window, a crop (assisted decoding), or an eviction library
# (kvpress) or other code rebinding keys/values, which the recorder sees as `evicted` events.
EVICTION_REASONS = ("window", "press", "crop")

# A beam search's first `reordered` events say how many rows each prompt has: `reason` "beams:3".
BEAMS_REASON = "beams:"


# Parts whose tensor is the KV itself, shaped [batch, kv_heads, tokens, head_dim] (or Meta's [batch, tokens,
# heads, dim]: SEQ_MAJOR_PARTS): full-precision data, module buffers, tracked tensors, and the quantized data
# of fp8 (`q.0`, next to its scale `q.1`) and quanto (`q._data`). Their dtype is the cache's, their first
# dimension the batch. hqq's packed `q.0` is 2-D, so the shape test leaves it out.
_WHOLE_PARTS = ("data", "buffer", "buffer_bhsd", "tracked", "tracked_bshd")
_KV_DATA_PARTS = (*_WHOLE_PARTS, "q.0", "q._data")

# Parts laid out [batch, tokens, kv_heads, head_dim]: module buffers (Meta's reference code) and tensors
# given to `kvtrace.track(..., layout="bshd")`. Logs before the layout keyword have only `tracked`; logs
# before module caches had a layout have only `buffer`.
SEQ_MAJOR_PARTS = ("buffer", "tracked_bshd")

# Module buffers by the dim of their positions: Meta's [batch, tokens, kv_heads, head_dim] (`buffer`),
# gpt-fast's [batch, kv_heads, tokens, head_dim] (`buffer_bhsd`).
BUFFER_PARTS = {"buffer": 1, "buffer_bhsd": 2}


def event_rows(ev: KvEvent) -> int:
    """Batch rows an event's tokens are per: the rows in use where the log says (a preallocated module
    cache written for a smaller batch), else its tensor's batch dim; 0 without a shape."""
    return ev.rows or (ev.shape[0] if ev.shape else 0)


def buffer_shape(ev: KvEvent) -> list[int]:
    """A module buffer's shape with its positions at dim 1, whatever its layout (`BUFFER_PARTS`)."""
    shape = list(ev.shape)
    if BUFFER_PARTS.get(ev.part) == 2 and len(shape) >= 3:
        shape[1], shape[2] = shape[2], shape[1]
    return shape


def is_kv_data(ev: KvEvent) -> bool:
    """Whether the event's tensor holds the KV values themselves (not a scale, nor packed bits)."""
    if ev.part in _WHOLE_PARTS:
        return True
    return ev.part in _KV_DATA_PARTS and len(ev.shape or ()) >= 4


# A QuantizedCache's packed values whatever their shape: hqq's 2-D `q.0` and quanto's `q._data._data` too
_PACKED_PARTS = ("q.0", "q._data", "q._data._data")


def holds_tokens(ev: KvEvent) -> bool:
    """Whether the event tells the tokens its cache holds: its KV data, or a QuantizedCache's packed values,
    whose `tokens` are the layer's too. They alone say it for a cache that requantizes every step
    (`residual_length=1`), which never keeps a full-precision `data` part. Their shape tells no rows."""
    return is_kv_data(ev) or (ev.part in _PACKED_PARTS and ev.tokens > 0)


def eviction_reason(ev: KvEvent) -> str:
    """The kind of eviction an event with `evicted_tokens` reports (runs before the window kind: press)."""
    if ev.reason == "window":
        return "window"
    if ev.event == "cropped":
        return "crop"
    return "press"
