"""The remedies for a cache of preallocated module buffers, priced in their own settings. Pure, torch-free.

Meta's reference Llama keeps each layer's K and V in `cache_k`/`cache_v` buffers of [max_batch_size,
max_seq_len, kv_heads, head_dim], allocated once when the model is built (the KV log's part `buffer`,
analyzers.kv_capacity.preallocated_capacity). Their bytes follow those two settings, never the rows a forward
writes nor the tokens written so far: running fewer rows or a shorter context frees nothing.

* the settings are those of the buffers live at the diagnosed moment (`kv_capacity.buffers_live_at`),
  never the run's last ones: a run that re-makes its caches (`rediscover()`) holds buffers of several shapes
  in turn. A smaller max_batch_size frees their bytes / max_batch_size per row of it, a smaller max_seq_len
  their bytes / max_seq_len per position, exact where every KV storage of the moment has that shape (the
  copy a `.to(dtype)` of the buffers makes too); where the moment holds KV in other shapes as well (a
  re-made buffer's predecessor not yet freed), they price the largest shape's buffers only, and the
  diagnosis says so. The most rows and tokens forwards wrote into those buffers are the smallest settings
  the run still runs at, and a setting below them says so;
* a sliding window, fp8 buffers and int4 quantization need the model's code changed (its attention writes
  every position up to max_seq_len, in the buffers' dtype); a sliding window kept as a ring of W positions
  frees what max_seq_len=W frees, fp8 buffers a quarter or half of the KV; transformers' QuantizedCache and
  OffloadedCache manage its own caches, not a model's buffers, so they are not priced;
* a static cache is what these buffers already are: that remedy is left out.

A hand-written decoder's one preallocated tensor whose per-layer views are given to `kvtrace.track()`
(`capacity_of` "tracked": views cut to the tokens written say its max_seq in the KV log) is priced as
those buffers are, in its rows and max_seq, the sentences naming that tensor.

A transformers StaticCache is preallocated the same way along its positions (max_cache_len, allocated at
its first update and written in place), but its rows are the batch it was first given: a shorter context
frees nothing, and its context and sliding-window remedies are priced here in max_cache_len
(`static_cache_context`); a smaller batch frees as for any cache, and a sliding window is the model's
config (transformers keeps a static sliding layer of that many positions), not a code change.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from analyzers.kv_capacity import buffers_live_at
from analyzers.planning.diagnosis import Remedy, fits
from analyzers.summary import Report
from analyzers.units import human_bytes

__all__ = [
    "PreallocatedBuffers",
    "buffer_remedies",
    "held_dtype",
    "other_buffers_note",
    "preallocated_buffers",
    "static_cache_context",
]


@dataclass(frozen=True)
class PreallocatedBuffers:
    """The room of a cache made of preallocated module buffers, and what the run used of it."""

    rows: int  # max_batch_size: the buffers' first dimension
    positions: int  # max_seq_len: their second
    rows_used: int | None  # the most rows a forward of the run wrote (None: unknown)
    tokens_written: int | None  # the most tokens per row the run wrote (None: its forwards did not say)
    # "buffers" (a model's module buffers) | "static_cache" (transformers' StaticCache) | "tracked" (views
    # given to kvtrace.track() of one preallocated tensor, or tracked tensors written in place)
    kind: str = "buffers"
    held_bytes: int | None = None
    """Bytes of the buffers of this shape live at the moment, the KV these remedies divide (None: the
    moment's buffers are unknown, and the moment's KV is taken to be all of the run's last shape)."""
    dtype: str = ""  # those buffers' dtype ("": unknown, the run's KV dtype applies)
    # bytes of those buffers by dtype, where a copy to another dtype (Meta's `self.cache_k.to(xq)` at the
    # first forward) leaves both the buffers it copied and its copies in the scan's span of the moment
    dtype_bytes: tuple[tuple[str, int], ...] = ()
    other_shapes: tuple[tuple[int, int], ...] = ()  # (rows, positions) of other buffers live then


def _buffers_at(kv_log: Any, cache: int, at_us: float) -> PreallocatedBuffers | None:
    """The buffers of `cache` live at `at_us` with the shape holding the most bytes of them, and what
    forwards wrote into those; None where the log places none of its buffers at that moment."""
    live = buffers_live_at(kv_log, cache, at_us)
    by_shape: dict[tuple[int, int], int] = defaultdict(int)
    by_dtype: dict[str, int] = defaultdict(int)
    for index, facts in live.items():
        by_shape[(facts.rows, facts.positions)] += kv_log.storages[index][1]
    if not by_shape:
        return None
    shape = max(by_shape, key=lambda s: (by_shape[s], s))
    own = [(index, facts) for index, facts in live.items() if (facts.rows, facts.positions) == shape]
    for index, facts in own:
        by_dtype[facts.dtype] += kv_log.storages[index][1]
    return PreallocatedBuffers(
        shape[0],
        shape[1],
        max(facts.rows_written for _, facts in own) or None,
        max(facts.tokens_written for _, facts in own) or None,
        held_bytes=by_shape[shape],
        dtype=max(by_dtype, key=lambda d: (by_dtype[d], d)),
        dtype_bytes=tuple(sorted(by_dtype.items())),
        other_shapes=tuple(sorted(s for s in by_shape if s != shape)),
    )


def preallocated_buffers(
    report: Report, kv_log: Any, at_us: float | None = None
) -> PreallocatedBuffers | None:
    """The main cache's buffers where it is preallocated (the report's `capacity_rows`, the run's last
    buffers): module buffers as live at the moment `at_us` (a timeline time) where the log places them, else
    the last ones, with the most rows and tokens per row the run's forwards wrote (the KV log's steps); None
    for any other cache."""
    kv = report.kv
    if not kv.capacity_rows or not kv.capacity_tokens:
        return None
    if kv_log is not None and at_us is not None and kv.capacity_of == "buffers" and kv.main_cache is not None:
        at_moment = _buffers_at(kv_log, kv.main_cache, at_us)
        if at_moment is not None:
            return at_moment
    rows_used = tokens_written = 0
    tracked = kv.capacity_of == "tracked"
    if kv_log is not None:
        # Tracked views are logged where the caller tracks them, inside a forward or not (a loop without
        # the model given to record() has no forwards)
        forwards = [s for s, phase in kv_log.step_phase.items() if tracked or phase in ("prefill", "decode")]
        rows_used = max((kv_log.step_rows.get(s, {}).get(kv.main_cache, 0) for s in forwards), default=0)
        written = (kv_log.step_tokens.get(s, {}).get(kv.main_cache, 0) for s in forwards)
        tokens_written = max(written, default=0)
    if tracked and tokens_written >= kv.capacity_tokens:  # whole views: their length is the room, not a count
        tokens_written = 0
    return PreallocatedBuffers(
        kv.capacity_rows,
        kv.capacity_tokens,
        rows_used or None,
        tokens_written or None,
        kv.capacity_of or "buffers",
    )


def held_dtype(buffers: PreallocatedBuffers, held: int) -> str:
    """The dtype of the buffers a moment holding `held` bytes of them holds: of the buffers live in the scan's
    span of the moment in several dtypes (a copy to another dtype in the forward, before the scan that finds
    it), the one whose bytes are exactly what the moment held, else the most bytes' (`buffers.dtype`).
    Before, the most bytes': Meta's reference model in bfloat16, whose float32 buffers its first forward
    copies, was priced at 32 bits at a prefill peak holding its bfloat16 copies alone (fp8 "saves 24 of
    32 KiB", not 16)."""
    exact = [dtype for dtype, size in buffers.dtype_bytes if size == held]
    return exact[0] if len(exact) == 1 else buffers.dtype


def other_buffers_note(buffers: PreallocatedBuffers, kv: int) -> str:
    """Why the buffer remedies of a moment are not exact: KV held then beyond the buffers they price (a
    re-made buffer's predecessor not yet freed, at the same instant or in another shape); "" when none."""
    other = kv - buffers.held_bytes if buffers.held_bytes else 0
    if other <= 0 and not buffers.other_shapes:
        return ""
    shapes = ", ".join(f"{rows} x {positions}" for rows, positions in buffers.other_shapes)
    where = f"buffers of other shapes (max_batch_size x max_seq_len {shapes})" if shapes else "other storages"
    extra = f"another {human_bytes(other)} of KV in" if other > 0 else "KV in"
    return (
        f"this moment holds {human_bytes(buffers.held_bytes or 0)} of KV in buffers of max_batch_size="
        f"{buffers.rows} x max_seq_len={buffers.positions:,} and {extra} {where} (a cache re-made while "
        "its old buffers were held): the buffer remedies price the first only, so they are not exact"
    )


def _smaller(room: int, kv: int, need: int | None, used: int | None) -> tuple[int, int]:
    """(the setting to propose, KV bytes it frees) for a buffer dimension of `room` that the KV is linear in:
    with a shortfall, the largest that leaves room for it (0: even 1 is too many), freeing what going down
    to it, or to 1, saves; without one, what the run used (`used`), else one fewer; nothing to free when the
    run fits."""
    if need is None:
        target = used if used is not None and 1 <= used < room else room - 1
        return target, round(kv * (room - target) / room) if target >= 1 else 0
    target = max(room * (kv - need) // kv, 0)
    return target, 0 if need <= 0 else round(kv * (room - max(target, 1)) / room)


def _holder(b: PreallocatedBuffers) -> tuple[str, str]:
    """What holds the KV, as the sentences name it, and its verb's ending ("" or "s"): a model's buffers, or
    the one tensor tracked views are cut from (the caller's own max_batch_size and max_seq_len)."""
    if b.kind == "tracked":
        return "the preallocated tensor behind the tracked views", "s"
    return "the buffers", ""


def _below_use(target: int, used: int | None, what: str) -> str:
    """The condition a setting below what the run used puts on it: `what` names one unit, as "row"."""
    if used is None or target >= used:
        return ""
    return f", with at most {target:,} {what}{'' if target == 1 else 's'} (this run writes up to {used:,})"


def _max_batch(kv: int, b: PreallocatedBuffers, need: int | None) -> Remedy:
    per_row = human_bytes(kv / b.rows)
    in_use = f" (this run writes up to {b.rows_used})" if b.rows_used else ""
    holder, ending = _holder(b)
    idle = (
        f"Fewer rows in use{in_use} free no KV: {holder} {'is' if ending else 'are'} allocated for "
        f"max_batch_size={b.rows} "
        f"({per_row} of KV a row of it), whatever rows a forward writes"
    )
    target, saved = _smaller(b.rows, kv, need, b.rows_used)
    if b.rows == 1:
        return Remedy("batch", None, 0, fits(0, need), f"{idle}; max_batch_size is 1 already.")
    if need is not None and need <= 0:
        text = (
            f"max_batch_size={b.rows} already fits; the KV alone would leave room up to max_batch_size="
            f"{target}. {idle}."
        )
        return Remedy("batch", target, 0, fits(0, need), text)
    if target >= 1:
        enough = ", enough to fit" if need is not None else ""
        condition = _below_use(target, b.rows_used, "row")
        text = (
            f"{idle}. max_batch_size={target} instead of {b.rows} frees {human_bytes(saved)}{enough}"
            f"{condition}."
        )
        return Remedy("batch", target, saved, fits(saved, need), text)
    assert need is not None
    text = (
        f"{idle}. Even max_batch_size=1 frees only {human_bytes(saved)}, less than the "
        f"{human_bytes(need)} shortfall."
    )
    return Remedy("batch", None, saved, fits(saved, need), text)


def _max_seq_len(kv: int, b: PreallocatedBuffers, need: int | None) -> tuple[Remedy, Remedy]:
    """A smaller max_seq_len, and a sliding window kept as a ring (the model's code changed); for a
    StaticCache, a smaller max_cache_len and the model's sliding window."""
    per_position = human_bytes(kv / b.positions)
    written = f" ({b.tokens_written:,} at most in this run)" if b.tokens_written else ""
    static = b.kind == "static_cache"
    knob = "max_cache_len" if static else "max_seq_len"
    if static:
        idle = (
            f"A shorter context frees no KV: the StaticCache holds max_cache_len={b.positions:,} positions "
            f"({per_position} of KV each, over its {b.rows} rows), however many tokens are written{written}"
        )
        ring = (
            "A sliding window (config.sliding_window, on a model trained with one) makes transformers keep "
            "that many positions a layer"
        )
    else:
        holder, ending = _holder(b)
        idle = (
            f"A shorter context frees no KV: {holder} hold{ending} max_seq_len={b.positions:,} positions "
            f"({per_position} of KV each, over the {b.rows} rows of max_batch_size), however many tokens "
            f"are written{written}"
        )
        ring = (
            f"A sliding window needs the model's code changed: its attention writes each token at its "
            f"position in {'a tensor' if ending else 'buffers'} max_seq_len={b.positions:,} long"
        )
    target, saved = _smaller(b.positions, kv, need, b.tokens_written)
    if need is not None and need <= 0:
        context = (
            f"{knob}={b.positions:,} already fits; the KV alone would leave room up to {knob}="
            f"{target:,}. {idle}."
        )
        return (
            Remedy("context", target, 0, fits(0, need), context),
            Remedy("sliding_window", None, 0, fits(0, need), f"{ring}; the run already fits."),
        )
    if target >= 1:
        enough = ", enough to fit" if need is not None else ""
        condition = _below_use(target, b.tokens_written, "token")
        context = (
            f"{idle}. {knob}={target:,} instead of {b.positions:,} frees {human_bytes(saved)}{enough}"
            f"{condition}."
        )
        they = "it" if static or b.kind == "tracked" else "they"
        kept = f"of {target:,} positions, it" if static else f"kept as a ring of {target:,} positions, {they}"
        window = (
            f"{ring}; {kept} would cap KV at {human_bytes(kv - saved)} "
            f"however long generation runs, freeing {human_bytes(saved)}{enough}, at the cost of forgetting "
            f"older tokens ({knob}={target:,} frees as much for contexts that fit in it)."
        )
        return (
            Remedy("context", target, saved, fits(saved, need), context),
            Remedy("sliding_window", target, saved, fits(saved, need), window),
        )
    assert need is not None
    short = f"less than the {human_bytes(need)} shortfall"
    return (
        Remedy(
            "context",
            None,
            saved,
            fits(saved, need),
            f"{idle}. Even {knob}=1 frees only {human_bytes(saved)}, {short}.",
        ),
        Remedy(
            "sliding_window",
            None,
            saved,
            fits(saved, need),
            f"{ring}; even {'1 position' if static else 'a ring of 1 position'} would free only "
            f"{human_bytes(saved)}, {short}.",
        ),
    )


def static_cache_context(kv: int, cache: PreallocatedBuffers, need: int | None) -> list[Remedy]:
    """The context and sliding-window remedies of a StaticCache (`kind` "static_cache"), in max_cache_len."""
    return list(_max_seq_len(kv, cache, need))


def _quantized(kv: int, kv_bits: int | None, need: int | None) -> list[Remedy]:
    """fp8 buffers (the model's code changed); transformers' int4 QuantizedCache does not apply."""
    int4 = Remedy(
        "quantized_kv",
        4,
        None,
        None,
        "int4 quantized cache: transformers' QuantizedCache quantizes its own caches, not a model's "
        "preallocated K and V buffers (Meta's cache_k/cache_v, gpt-fast's k_cache/v_cache): it needs the "
        "model's code changed to pack and unpack them.",
    )
    if kv_bits is None:
        why = "cannot be computed: the KV dtype is not recorded"
        return [Remedy("quantized_kv", None, None, None, f"Quantized KV: {why}."), int4]
    if kv_bits <= 8:  # 8-bit buffers already are what this remedy proposes
        return [int4]
    saved = round(kv * (1 - 8 / kv_bits))
    text = (
        f"fp8 buffers save {human_bytes(saved)} of the {human_bytes(kv)} held at {kv_bits} bits, but need "
        "the model's code changed: it allocates its K and V buffers in its own dtype and attends over them "
        "as they are, so it would have to convert on every write and read."
    )
    return [Remedy("quantized_kv", 8, saved, fits(saved, need), text), int4]


def buffer_remedies(
    kv: int,
    buffers: PreallocatedBuffers,
    need: int | None,
    kv_bits: int | None,
    on_cuda: bool,
) -> list[Remedy]:
    """The batch, context, sliding window, quantization and offloading remedies for a moment holding `kv`
    bytes of preallocated buffers; `need`: the shortfall."""
    out = [_max_batch(kv, buffers, need), *_max_seq_len(kv, buffers, need)]
    out += _quantized(kv, kv_bits, need)
    if on_cuda:
        text = (
            "Offloading: transformers' OffloadedCache moves its own caches, not a model's preallocated "
            "buffers, which the model's code keeps on the device: it needs that code changed."
        )
        out.append(Remedy("offloading", None, None, None, text))
    return out
