"""What the KV log's replay gives (`analyzers.kv_log`): per layer and per cache at the final state, and
the run's series, steps, storages and evictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from analyzers.kv_capacity import BufferStorage
from analyzers.kv_cut_step import CutStep
from kvtrace.format import KvEvent


@dataclass
class LayerFigures:
    """One layer of one cache object: several caches can hold the same layer index (an assistant model's
    draft next to the model's own, or two generate() outputs still referenced)."""

    layer: int
    k_bytes: int = 0
    v_bytes: int = 0
    evicted_tokens: int = 0
    tokens: int = 0
    evicted_by_reason: dict[str, int] = field(default_factory=dict)
    cache: int = 0
    k_tokens: int = 0
    v_tokens: int = 0
    """Tokens per row K and V each hold, as last written: `tokens` for both, but in a run cut between the
    two updates of a layer (an OOM in V's torch.cat after K's), where K holds one more. 0: unknown."""


@dataclass
class CacheFigures:
    """One cache object of the log (the events' `cache` field), so that its bytes are divided by its own
    tokens and rows, never by another cache's."""

    cache: int
    layers: int  # layer indices that held KV data
    final_bytes: int  # its storages at the final state (0: released before the run's last step ended)
    tokens: int  # tokens per row of its fullest layer, as last seen
    rows: int  # batch rows of its last shaped KV tensor (0: none had a shape)
    last_seq: int  # `seq` of its last KV data event: the cache written last has the highest
    last_step: int = 0  # `step` of that event
    generated_tokens: int = 0
    """Tokens its forwards yielded per row: 1 per prefill, then per decode step the tokens appended per row
    (net of crops of rejected drafts; a window's or a press's evictions, and a caller's crop between two
    generate() calls, added back, as those tokens were generated). The last token a run yields is never
    written back: the prefill's 1 stands for it."""
    generated_row_tokens: int = 0  # the same over every batch row: each step's yield x its rows
    call_step: int = 0
    """The step of its last prefill: where the generate() call that wrote it last began (a cache passed
    to a second call, or kept by transformers for it, has several); 0 when no prefill wrote it."""
    call_generated_tokens: int = 0
    """`generated_tokens` since that prefill: what that call yielded per row, its prompt not counted."""
    reordered: bool = False
    """Rows reordered or selected (beam search, contrastive search): rows are beams. Not a caller's
    `reorder_cache` outside beam search (`reason` `no_beams`), whose rows stay the batch's sequences."""
    beams: int = 0
    """Rows per prompt under beam search (num_beams), from its first reorder's `reason` `beams:N`; 0 when
    the log does not say (no beam search, or a log from before kvtrace recorded it)."""
    capacity_rows: int = 0
    capacity_tokens: int = 0
    """A preallocated cache's room: a module cache's buffers' rows and positions, Meta's max_batch_size and
    max_seq_len (`preallocated_capacity`), or a transformers StaticCache's rows and max_cache_len
    (`static_capacity`), or tracked views' rows and the positions of the tensor they are cut from
    (`kv_views.tracked_capacity`); 0 for a cache whose storages follow the rows and tokens it holds."""
    capacity_of: str = ""  # "buffers" | "static_cache" | "tracked" (kvtrace.track()'s tensors) | ""
    static_positions: int = 0
    """Positions of its longest layer where each K/V data storage was allocated once and written in place
    (or had room beyond the tokens it held): a transformers StaticCache, a hybrid model's too (its sliding
    layers shorter, which `static_capacity` leaves out), its max_cache_len; 0 for a cache whose storages
    are replaced as it grows (torch.cat)."""
    bytes_by_tokens: dict[int, int] = field(default_factory=dict)
    """Its storages at the final state by the tokens per row their layer's K or V holds: one entry where
    every layer holds as many, several where a sliding window's layers hold fewer, or where a run stopped
    between a layer's K and V updates. What `bytes_per_token_row` divides."""


def bytes_per_token_row(bytes_by_tokens: dict[int, int], rows: int) -> float | None:
    """KV bytes one token of one row costs across the layers: each layer's K and V storages over their own
    tokens, summed. Never every layer's bytes over one layer's tokens: a sliding window's layers hold fewer
    tokens, and so does a layer whose update a cut step did not reach, or its V when the cut fell between
    its K and V updates. Storages of unknown tokens (0) are left out; None when none is known."""
    known = {tokens: nbytes for tokens, nbytes in bytes_by_tokens.items() if tokens > 0}
    if not known or rows <= 0:
        return None
    return sum(nbytes / (tokens * rows) for tokens, nbytes in known.items())


@dataclass
class KvLogAnalysis:
    """What the KV log says: final state (last step, before teardown), peak, churn, evictions, series."""

    final_bytes: int
    peak_bytes: int
    peak_t_ns: int
    allocated_bytes_total: int
    evicted_tokens: int
    per_layer: list[LayerFigures]
    evicted_by_reason: dict[str, int] = field(default_factory=dict)
    """Evicted tokens (all rows, all layers) by kind: window, press, crop (see EVICTION_REASONS)."""
    # One point per event: (t_ns, live KV bytes); and per step: {layer: live bytes} at the step's end. A
    # step ends at its end sample (memory_samples.jsonl): the lines after it that carry its number (a crop or
    # reorder between two generate() calls) came between two steps, and count in the next step's figures.
    series_t_ns: list[int] = field(default_factory=list)
    series_bytes: list[int] = field(default_factory=list)
    series_frees: dict[int, int] = field(default_factory=dict)
    """The series' points of `freed` lines: point -> the index in `storages` of the storage it frees. Their
    `t_ns` is when the recorder noticed the free (for a cache generate() dropped, as late as the block's
    end); `analyzers.kv_line` moves them to the allocator's free where a trace has it."""
    final_point: int = -1
    """The series' point whose level is `final_bytes` (the last before the block's `end` lines, or before a
    cut step's first line); -1: none."""
    layer_series: dict[int, list[int]] = field(default_factory=dict)
    step_live: dict[int, dict[int, int]] = field(default_factory=dict)
    step_phase: dict[int, str] = field(default_factory=dict)
    step_start_ns: dict[int, int] = field(default_factory=dict)
    evictions: list[KvEvent] = field(default_factory=list)
    """Each K line that lost tokens (a press's `evicted`, a crop's `cropped`, a sliding window's on the data
    line its step writes, reason `window`), followed by the V data line of its slot and step: the memory
    chart's eviction markers (analyzers.eviction_markers.step_marks), with K's and V's bytes."""
    evicted_by_step: dict[int, dict[int, dict[str, int]]] = field(default_factory=dict)
    """Per step: {layer: {kind: evicted tokens, all rows}}, every kind (window, press, crop) and cache: the
    per-layer figure of the report, step by step. What was evicted between two steps is the next one's."""
    storages: list[tuple[int, int, int, int, int, str, int]] = field(default_factory=list)
    """Every KV storage: (addr, bytes, first_t_ns, last_t_ns, layer, kv, cache); last_t_ns = free time or
    -1."""
    storage_devices: list[str] = field(default_factory=list)
    """The device of each of `storages`, as its first line names it ("": not named)."""
    scanned_after_ns: dict[int, int] = field(default_factory=dict)
    """The storages a scan found rather than an update (module caches, `source` "module": the recorder
    compares them at the end of each forward, so a storage's first `t_ns` may come a whole forward after
    its allocation): index in `storages` -> the `t_ns` of the log's last line before the step that found
    it, after which that step's forward made it (0: no line before)."""
    buffer_storages: dict[int, BufferStorage] = field(default_factory=dict)
    """The storages of module buffers of [batch, seq, ...] shape (`BUFFER_PARTS`): index in `storages` ->
    their shape, dtype and what was written into them (`buffers_live_at` picks a moment's)."""
    storage_shares: dict[int, dict[tuple[int, int], int]] = field(default_factory=dict)
    """The storages several layers' views share (one preallocated tensor for every layer): index in
    `storages` -> {(cache, layer): its views' bytes}, as last split (`kv_views`)."""
    found_storages: set[int] = field(default_factory=set)
    """The storages first logged as found (`created`, reason "found": a cache kvtrace first saw holding KV,
    filled before `record()`): indices in `storages`. Held since before the log's first sight of them,
    where a trace that began earlier has no allocation of theirs."""
    tracked_storages: set[int] = field(default_factory=set)
    """The storages first logged by `kvtrace.track()` (`source` "track"): indices in `storages`. The user
    hands over a tensor made whenever they chose, often before `record()` (one preallocated KV tensor, its
    layers' views tracked after each forward): like a found cache's, held since before the log's first
    sight of them where a trace that began earlier has no allocation of theirs."""
    caches: list[CacheFigures] = field(default_factory=list)
    """Every cache object with KV data, by id. `per_layer` holds the rows of the caches live at the final
    state (or with evicted tokens); `step_live` and `layer_series` sum a layer index over the caches."""
    step_cache_live: dict[int, dict[tuple[int, int], int]] = field(default_factory=dict)
    """Per step: {(cache, layer): live bytes} at the step's end."""
    step_tokens: dict[int, dict[int, int]] = field(default_factory=dict)
    """Per step: {cache: tokens per row of its fullest layer} at the step's end, for the caches holding KV
    then: what a moment of that step held, where the run's final count may be many tokens later."""
    step_rows: dict[int, dict[int, int]] = field(default_factory=dict)
    """Per step: {cache: batch rows of its last shaped KV tensor} at the step's end (beam search and batch
    selection change them)."""
    cut: CutStep | None = None
    """A run that never ended whose last step the log holds only part of (`analyze_kv_log(unfinished=...)`):
    the final state, tokens, rows, evictions and generated tokens are the last whole step's, and the cut
    step has no end (no `step_live`, `step_tokens`, `step_rows` entry); the series, the peak and the
    storages keep every logged event. A `raised` one (a block that raised in the model's forward) yields no
    generated token; the rest is as logged, its end the moment it raised."""
