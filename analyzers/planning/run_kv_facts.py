"""The figures of a run's KV that diagnose's prices start from, read from its report and KV log: how many
layers a token is written to, what one token costs (each kind of layer at its own width), which layers
slide, the KV's dtype and whether (and in how many bits) the cache quantizes. Pure, torch-free."""

from __future__ import annotations

from typing import Any

from analyzers.caches import CROSS_ATTENTION, layers_holding, model_kv_layers
from analyzers.kv_events import is_kv_data
from analyzers.kv_widths import kind_token_bytes
from analyzers.model import MemorySource
from analyzers.summary import Report

__all__ = [
    "DTYPE_BITS",
    "PACKED_PARTS",
    "all_windowed",
    "compute_dtype_bits",
    "growing_bytes_per_token",
    "kv_dtype_bits",
    "kv_layers",
    "layer_kind_token_bytes",
    "layer_token_bytes",
    "model_sliding_layers",
    "prefill_packed_tokens",
    "quantized_bits",
    "quantized_cache",
    "sliding_layer_ids",
    "sliding_layers",
    "token_elements",
    "token_layers",
]

# A QuantizedCache's packed values: quanto's `q._data._data`, HQQ's `q.0` (also the fp8 backend's data)
PACKED_PARTS = ("q._data._data", "q._data", "q.0")

DTYPE_BITS = {
    "float32": 32,
    "float16": 16,
    "bfloat16": 16,
    "float64": 64,
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
    "int8": 8,
}


def _windowed_layers(report: Report) -> tuple[list[Any], list[Any]]:
    """(layers whose window let tokens go, the others) of the run's final KV."""
    windowed = [layer for layer in report.kv.per_layer if layer.evicted_by_reason.get("window")]
    others = [layer for layer in report.kv.per_layer if not layer.evicted_by_reason.get("window")]
    return windowed, others


def all_windowed(report: Report) -> bool:
    """Every KV layer slides (Mistral), so the cache's size does not follow the context; a hybrid (Gemma 2:
    sliding and global layers) grows with it through its global layers."""
    windowed, others = _windowed_layers(report)
    return bool(windowed) and not others


def growing_bytes_per_token(report: Report) -> float | None:
    """KV bytes one more token of context costs per sequence: the run's own figure (storages over tokens
    held), but for the layers that keep every token only when others slide; a fully sliding cache's token
    of window costs the arithmetic (its storages keep a spare slot), and so does a token of a run that
    stopped in its first step before every layer held KV: the run's figure counts the layers that did, and
    a token costs them all."""
    kv = report.kv
    windowed, others = _windowed_layers(report)
    if not windowed:
        layers, holding = kv_layers(report), len(layers_holding(kv.per_layer, kv.main_cache))
        if kv.bytes_per_token_expected and layers and 0 < holding < layers:
            return kv.bytes_per_token_expected
        return kv.bytes_per_token_measured
    if not others:
        return kv.bytes_per_token_expected or kv.bytes_per_token_measured
    if not kv.batch:
        return None
    return sum((layer.k_bytes + layer.v_bytes) / layer.tokens for layer in others if layer.tokens) / kv.batch


def token_layers(report: Report) -> set[int]:
    """The layers holding the tokens' own KV: not a cross-attention cache's (an encoder's output, Mllama's
    image), whose KV does not follow the context."""
    cross = {c.cache for c in report.kv.caches if c.role == CROSS_ATTENTION}
    return {layer.layer for layer in report.kv.per_layer if layer.cache not in cross}


def kv_layers(report: Report) -> int | None:
    """The layers a token's KV is written to: the model's (`model_kv_layers`), else those holding it, not
    only those holding KV at the end, which a run that stopped in a step before its last layers has fewer
    of."""
    return model_kv_layers(report.geometry) or len(token_layers(report)) or None


def layer_token_bytes(report: Report) -> float | None:
    """KV bytes one token costs one layer of one sequence: the arithmetic (every KV layer's), shared by the
    model's KV layers (`kv_layers`)."""
    layers = kv_layers(report)
    expected = report.kv.bytes_per_token_expected
    return expected / layers if expected and layers else None


def layer_kind_token_bytes(report: Report) -> tuple[float, float] | None:
    """(a sliding layer's, a full layer's) KV bytes of one token of one sequence: `layer_token_bytes` by
    each kind's own width (Gemma 4's full layers are wider), for the prices that follow one kind only."""
    return kind_token_bytes(report.geometry, report.kv.bytes_per_token_expected, kv_layers(report))


def sliding_layer_ids(report: Report) -> tuple[int, ...]:
    """The layers whose window let tokens go, by index."""
    return tuple(sorted({layer.layer for layer in _windowed_layers(report)[0]}))


def kv_dtype_bits(source: MemorySource, report: Report) -> int | None:
    """Bits of one KV element: the dtype of the run's last KV data event, else the model's dtype."""
    run = source.meta.get("run")
    dtype = None
    if run is not None:
        dtypes = [e.dtype for e in run.kv_events if is_kv_data(e) and e.dtype]
        dtype = dtypes[-1] if dtypes else None
    if dtype is None and report.geometry:
        dtype = report.geometry.get("dtype")
    return DTYPE_BITS.get(str(dtype)) if dtype else None


def quantized_cache(source: MemorySource) -> bool:
    """Whether the run's KV is a quantized cache's: any KV data event is a quantized part (`q.*`). Not only
    its last: quanto's and HQQ's caches write their full-precision residual (`data`) at every step, their
    packed values only when they quantize."""
    return _packed_event(source) is not None


def _packed_event(source: MemorySource) -> Any:
    """The first event making a quantized part (`q.*`: the packed values holding tokens first, else a
    scale), None for a cache that quantizes nothing."""
    run = source.meta.get("run")
    if run is None:
        return None
    parts = [
        e
        for e in run.kv_events
        if str(e.part).startswith("q.") and e.dtype and e.event not in ("freed", "written")
    ]
    packed = [e for e in parts if e.part in PACKED_PARTS and e.tokens]
    return (packed or parts or [None])[0]


def prefill_packed_tokens(source: MemorySource, cache: int | None, step: int) -> int | None:
    """Tokens per row that `cache`'s last prefill up to `step` quantized whole: a quanto or HQQ
    QuantizedCache's prompt, which the KV log's count of held data misses (its residual is empty then, its
    packed values are no KV data). None where no prefill packed any."""
    run = source.meta.get("run")
    if run is None:
        return None
    packed = [
        e.tokens
        for e in run.kv_events
        if e.cache == cache
        and e.phase == "prefill"
        and e.step <= step
        and e.part in PACKED_PARTS
        and e.tokens
        and e.event not in ("freed", "written")
    ]
    return packed[-1] if packed else None


def quantized_bits(source: MemorySource, report: Report) -> int | None:
    """Bits a quantized cache packs a value in (4: quanto's or HQQ's int4; 8: the fp8 backend), None for a
    cache that quantizes nothing or whose packed size does not divide into whole bits: the packed bytes over
    the values they hold (rows x tokens x a layer's K or V width)."""
    event = _packed_event(source)
    if event is None:
        return None
    if str(event.dtype).startswith("float8"):
        return 8
    geometry = report.geometry or {}
    heads, head_dim, rows = geometry.get("num_kv_heads"), geometry.get("head_dim"), report.kv.batch
    nbytes = event.logical_bytes or event.storage_bytes
    if not all(isinstance(n, int) and n > 0 for n in (heads, head_dim, rows, event.tokens, nbytes)):
        return None
    values = rows * event.tokens * heads * head_dim
    return nbytes * 8 // values if nbytes * 8 % values == 0 else None


def token_elements(report: Report, kv_bits: int | None) -> float | None:
    """KV elements of one token of one sequence, every layer's K and V: the arithmetic of the report
    (`bytes_per_token_expected`, in the dtype of the run's last KV data event) over that dtype's bytes.
    The other caches' prices start from it, not from the run's storage, which a quantized cache keeps at
    two widths (its packed values, its residual at full precision)."""
    expected = report.kv.bytes_per_token_expected
    return expected * 8 / kv_bits if expected and kv_bits else None


def compute_dtype_bits(report: Report) -> int | None:
    """Bits of the model's own float dtype: a quantized cache keeps its residual and scales in it."""
    dtype = (report.geometry or {}).get("dtype")
    bits = DTYPE_BITS.get(str(dtype)) if dtype else None
    return bits if bits is not None and bits >= 16 else None


def sliding_layers(report: Report) -> int:
    """Layers keeping only a window: the config's (`sliding_layers`; every layer when it gives a window but
    no layer types, as Mistral's), else those whose window let tokens go."""
    geometry = report.geometry or {}
    counted = geometry.get("sliding_layers")
    if isinstance(counted, int):
        return counted
    layers = geometry.get("num_layers")
    if geometry.get("sliding_window") and isinstance(layers, int):
        return layers
    return len(_windowed_layers(report)[0])


def model_sliding_layers(report: Report) -> int:
    """The model's own sliding layers, which a QuantizedCache refuses: the config's count (`sliding_layers`),
    none where it gives no window. A cache that slid on its own (a sliding cache built from a config of its
    own, `kvtrace demo --cache sliding`) leaves the model's layers full; only a run without the model's
    config (its geometry lacks the field) is told by the layers whose window let tokens go."""
    geometry = report.geometry or {}
    if not isinstance(geometry.get("sliding_layers"), int) and "sliding_window" in geometry:
        return 0 if not geometry["sliding_window"] else sliding_layers(report)
    return sliding_layers(report)
