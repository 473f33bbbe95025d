"""transformers' continuous batching (`generate_batch`, `init_continuous_batching`): its paged KV pool,
written as the engine files kvtrace writes for vLLM (docs/format.md, "vLLM runs"), under the engine name
`transformers-cb`.

Continuous batching bypasses transformers' `Cache` classes: a `PagedAttentionCache` allocates one flat uint8
`cache_tensor` at start (two trash sectors, then the data sectors), cut into blocks of `page_size` tokens of
every layer's K and V, and a scheduler admits requests while blocks are free. Older transformers (5.17) have
the layer pool instead: a `key_cache` and a `value_cache` tensor per layer, `num_blocks + 2` blocks of
`block_size` rows each, and one `BlockManager` handing out block ids (hf_paged_pool.py writes both).
`PagedAttentionHooks` holds the recording's state and the pool's life (its engine.json, its KV events, its
block counts); its other parts are mixins, one module per role:

- hf_paged_wrappers.py: what `install` wraps on transformers' classes, and `uninstall` puts back;
- hf_paged_steps.py: one engine step = one kvtrace step (engine_steps.jsonl), and the run's `failure`;
- hf_paged_requests.py: requests offloaded (vLLM's "preempted") or failed, and engine_requests.jsonl;
- hf_paged_pool.py: engine.json's figures, from the pool.

Figures vLLM has and this engine lacks are null or absent, never borrowed.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import deque
from typing import Any

from kvtrace import format as fmt
from kvtrace.errors import short_error
from kvtrace.integrations.hf_paged_pool import ENGINE_NAME, layer_pool_document, pool_document
from kvtrace.integrations.hf_paged_requests import PagedRequests
from kvtrace.integrations.hf_paged_steps import PagedSteps
from kvtrace.integrations.hf_paged_wrappers import PagedWrappers
from kvtrace.integrations.vllm_engine import _Patches
from kvtrace.json_writes import JsonlAppender, write_json_atomic

CB_CACHE_ID = fmt.CB_CACHE_ID  # the `cache` id of the pool's KV events (vLLM's is fmt.VLLM_CACHE_ID)


# What `pool_document` and the per-step figures read on a PagedAttentionCache: one flat pool cut into sectors,
# with an allocator per attention type. Instance attributes, so tested on the pool once it is made.
_POOL_FIELDS = ("cache_tensor", "cache_allocators", "pool", "num_sectors", "bytes_per_sector")
# The same for the layer pool (transformers 5.17): a tensor per layer and kind, one BlockManager for the ids
_LAYER_POOL_FIELDS = (
    "key_cache",
    "value_cache",
    "group_cache_managers",
    "_block_manager",
    "num_groups",
    "get_num_free_blocks",
)


class PagedAttentionHooks(PagedWrappers, PagedSteps, PagedRequests):
    """Records the first `PagedAttentionCache` made while installed into the active `Recording`."""

    def __init__(self, recording: Any) -> None:
        self.recording = recording
        self._patches = _Patches()
        self._finder: Any = None
        self._closed = False
        # The recorded pool, weakly: the user's program frees it when generate_batch returns (a strong
        # reference kept its tensor alive until the block ended).
        self._cache_ref: weakref.ref[Any] | None = None
        self.document: dict[str, Any] = {}
        self._bytes_per_block = 0
        self._reserved = 0
        self._steps: JsonlAppender | None = None
        self._request_log: JsonlAppender | None = None
        # Steps scheduled and not updated yet, oldest first: (step, phase, tokens scheduled, preempted ids,
        # free blocks once the step's were allocated, when its scheduling began). One at a time in sync mode;
        # async batching schedules batch N+1 before it updates batch N.
        self._open: deque[tuple[int, str, int, list[str], int, int]] = deque()
        self._step_preempted: list[str] = []  # taken out while the next step is being scheduled
        # The fewest free blocks the scheduler left when it offloaded a request for the step being scheduled
        self._offload_free: int | None = None
        self._prefix_evicted = 0
        # request id -> (hit tokens, prompt tokens) of its last prefix lookup: a waiting request is looked up
        # at every scheduling attempt, so a lookup counts once, in the step that schedules the request
        self._prefix_lookup: dict[str, tuple[int, int]] = {}
        self._prefix = [0, 0, 0, 0]  # this step's hits, queries, then those of resumed requests
        self._held: dict[str, int] = {}  # request id -> blocks last logged (not finished)
        self._states: dict[str, Any] = {}  # request id -> its RequestState (a soft reset makes a new one)
        self._dropped: dict[str, tuple[int, bool]] = {}  # offloaded, not back yet: (tokens, to the CPU)
        self.engine_steps = 0
        self.preemptions = 0
        self.prefix_evicted_blocks = 0
        self.overhead_ns = 0
        self._flushed_ns = 0
        self.ignored_pools = 0
        self._layout_said = False  # the warning for a pool whose layout kvtrace does not read, given once
        # The recorded pool is the layer pool (transformers 5.17), not the sector pool
        self._layer_pool = False
        # Why transformers stopped the run, when it did: engine.json's and the manifest's `failure`
        self.failure: dict[str, Any] | None = None
        self._warnings: list[str] = []  # what leaves the engine files incomplete: the manifest's `warnings`
        # Requests transformers failed: those its loop's stop failed (the run's `failure`), and those it
        # refused on its own while the loop went on, with their errors (said in `warnings`)
        self.failed_requests = 0
        self._failed_ids: set[str] = set()
        self._waited: set[str] = set()  # requests whose `waiting` line is written
        self._stop_failed: list[str] = []
        self._failed_alone: list[tuple[str, str]] = []
        self._failing_all = False  # inside fail_all_requests: its requests fail with the run
        # Requests the scheduler dropped for `cancel_request`, and whether this transformers lets kvtrace see
        # them (its `Scheduler.clear_cancelled_requests`): engine.json's `aborted_requests_logged`
        self.aborted_requests = 0
        self.cancels_followed = False

    @property
    def cache(self) -> Any:
        """The recorded pool while it lives; None before it is made and once it is freed."""
        return self._cache_ref() if self._cache_ref is not None else None

    @property
    def warnings(self) -> list[str]:
        """The manifest's `warnings` from this pool: what leaves the engine files incomplete, and the requests
        transformers failed on their own while the run went on (the block ends `ok` all the same)."""
        said = list(self._warnings)
        if self._failed_alone:
            count = len(self._failed_alone)
            named = "; ".join(f"{rid} ({short_error(error)})" for rid, error in self._failed_alone[:5])
            more = f"; and {count - 5} more" if count > 5 else ""
            said.append(
                f"continuous batching: {count} request(s) failed on their own and the run went on "
                f"(transformers returned them with their error; engine_requests.jsonl lists each): "
                f"{named}{more}"[:700]
            )
        return said

    @property
    def unread_pool(self) -> bool:
        """Whether a pool of a layout kvtrace does not read was made in the block (said in `warnings`)."""
        return self._layout_said

    @property
    def owns_steps(self) -> bool:
        """Whether a pool is recorded: its engine steps are then the run's steps."""
        return self._cache_ref is not None

    @property
    def in_step(self) -> bool:
        """Between a batch's scheduling and its update: the model's forward there is this engine step. (A
        planned decode step reads these two fields inline, `kvtrace.planned_steps`: keep them alike.)"""
        return bool(self._open) and not self._closed

    def summary(self) -> dict[str, Any] | None:
        """The manifest's `engine` entry; None when no pool was made in the block."""
        if self._cache_ref is None:
            return None
        return {
            "name": ENGINE_NAME,
            "version": self.document.get("version"),
            "process": "inproc",
            "status": self.document.get("status", "ok"),
            **({"failure": self.failure} if self.failure is not None else {}),
            "failed_requests": self.failed_requests,
            **({"aborted_requests": self.aborted_requests} if self.cancels_followed else {}),
            "num_blocks": self.document.get("num_blocks"),
            "kv_cache_bytes": self.document.get("kv_cache_bytes"),
            "engine_steps": self.engine_steps,
            # the lines that reached engine_requests.jsonl whole, as vLLM's (vllm_engine.EngineHooks.summary)
            "engine_requests": self._request_log.lines if self._request_log is not None else 0,
            "preemptions": self.preemptions,
            "prefix_evicted_blocks": self.prefix_evicted_blocks,
            "overhead_ns": self.overhead_ns,
        }

    def _timed(self, work: Any, *args: Any) -> None:
        """Bookkeeping on the generation thread, timed. A failure here must not fail the user's requests
        (transformers fails every request on an exception in its loop): it stops the recording of the pool
        and says so in the manifest's notes."""
        started = time.thread_time_ns()
        try:
            work(*args)
        except Exception as exc:
            self._closed = True
            self._warnings.append(
                f"continuous batching: recording stopped at step {self.recording.tracker.step} "
                f"({type(exc).__name__}: {exc}); the engine files end there"[:500]
            )
        finally:
            self.overhead_ns += time.thread_time_ns() - started

    # -- the pool ------------------------------------------------------------------------------------------
    def _on_pool(self, cache: Any) -> None:
        sectors = all(hasattr(cache, name) for name in _POOL_FIELDS)
        per_layer = not sectors and all(hasattr(cache, name) for name in _LAYER_POOL_FIELDS)
        if not sectors and not per_layer:
            # A pool layout neither of these: said plainly, and the pool left unclaimed so that no hook reads
            # it, rather than an AttributeError from `pool_document` and an engine entry of null figures
            if not self._layout_said:
                self._layout_said = True
                self._warnings.append(
                    "continuous batching: this transformers' PagedAttentionCache is neither one flat "
                    "`cache_tensor` pool with `cache_allocators` nor per-layer key_cache/value_cache tensors "
                    "with a BlockManager, a layout kvtrace does not read: the pool's KV, engine steps and "
                    "requests are not recorded"
                )
            return
        if self._cache_ref is not None:  # a second pool (another generate_batch): the run keeps the first
            self.ignored_pools += 1
            if self.ignored_pools == 1:
                self._warnings.append(
                    "a second continuous-batching pool (another generate_batch) is left out: the engine "
                    "files record the first only (one generate_batch per record())"
                )
            return
        self._cache_ref = weakref.ref(cache, self._pool_freed)
        self._layer_pool = per_layer
        rec = self.recording
        self.document = (layer_pool_document if per_layer else pool_document)(cache, rec.model)
        if self.cancels_followed:
            self.document["aborted_requests_logged"] = True
        self._bytes_per_block = self.document["bytes_per_block"]
        self._reserved = self.document["blocks_reserved"]
        write_json_atomic(rec.path / fmt.ENGINE, self.document)
        self._steps = JsonlAppender(rec.path / fmt.ENGINE_STEPS)
        self._request_log = JsonlAppender(rec.path / fmt.ENGINE_REQUESTS)
        # Written with the recording's logs, by its writer thread every 0.1 s: not only at a step's end, or a
        # step that hangs before the process is killed would take the lines of the steps before it along
        rec._add_engine_logs(self._steps, self._request_log)
        tracker = rec.tracker
        with tracker.lock:  # the recorder's writer thread takes the tracker's lines meanwhile
            tracker.drain()
            self._log_pool_locked(tracker)
        rec._flush()

    def _pool_freed(self, _ref: Any) -> None:
        """The manager is gone with its pool: the request states it left (failed, cancelled) go too."""
        self._states.clear()
        self._prefix_lookup.clear()

    def _log_pool_locked(self, tracker: Any) -> None:
        """A `created` event per layer and kind, each naming the one storage: a replay counts it once.
        A layer's K (V) is one page per block, so its view is strided: `shape` is the logical one."""
        doc = self.document
        capacity = doc["num_blocks"] * doc["block_size"]
        t_ns = self.recording._clock()
        if self._layer_pool:
            self._log_layer_pool_locked(tracker, t_ns, capacity)
            return
        for layer in doc["layers"]:
            if "bytes" not in layer:  # several attention types: no per-layer view to name
                continue
            half = layer["bytes"] // 2
            page = half // doc["num_blocks"]  # one K (or V) page; K first in the layer's part of a block
            for kv, offset in (("k", 0), ("v", page)):
                view = {
                    "storage_addr": layer["storage_addr"],
                    "storage_bytes": doc["kv_cache_bytes"],
                    "view_offset": layer["view_offset"] + offset,
                    "shape": [doc["num_blocks"], *layer["shape"][2:]],
                    "bytes": half,
                    "dtype": layer["dtype"],
                    "device": doc["storage"][0]["device"],
                }
                tracker.pool_view_created(t_ns, layer["layer"], kv, view, capacity, CB_CACHE_ID, ENGINE_NAME)
        tracker.watch_pool(self.cache.cache_tensor.untyped_storage(), 0, "k", CB_CACHE_ID)

    def _log_layer_pool_locked(self, tracker: Any, t_ns: int, capacity: int) -> None:
        """The layer pool's `created` events: a layer's K and V are tensors of their own, each its storage,
        logged and watched (freed when generate_batch lets the pool go) one by one."""
        doc = self.document
        cache = self.cache
        for layer in doc["layers"]:
            if "bytes" not in layer:  # several layer groups share each tensor: no per-layer view to name
                continue
            index = layer["layer"]
            for kv, tensor in (("k", cache.key_cache[index]), ("v", cache.value_cache[index])):
                storage = tensor.untyped_storage()
                view = {
                    "storage_addr": storage.data_ptr(),
                    "storage_bytes": int(storage.nbytes()),
                    "view_offset": tensor.data_ptr() - storage.data_ptr(),
                    "shape": [doc["num_blocks"], doc["block_size"], *tensor.shape[1:]],
                    "bytes": int(tensor.nbytes),
                    "dtype": layer["dtype"],
                    "device": str(tensor.device),
                }
                tracker.pool_view_created(t_ns, index, kv, view, capacity, CB_CACHE_ID, ENGINE_NAME)
                tracker.watch_pool(storage, index, kv, CB_CACHE_ID)

    def _cached_blocks(self, cache: Any) -> int:
        """Blocks no request holds but prefix sharing keeps for their content (given back under pressure)."""
        if self._layer_pool:  # complete blocks kept with their hash: free, and reused on a prefix match
            return len(cache._block_manager._init_block_ids)
        held = sum(len(a.ledger.cached_blocks) * a.bytes_per_block for a in cache.cache_allocators.values())
        return held // self._bytes_per_block if self._bytes_per_block else 0

    def _blocks_of(self, request_id: str) -> int:
        """Whole-model blocks a request's block tables hold (exact with one attention type)."""
        if self._layer_pool:  # a block id per layer group: whole-model blocks with one group
            return sum(len(a.block_table.get(request_id, ())) for a in self.cache.group_cache_managers)
        held = sum(
            len(a.block_table.get(request_id, ())) * a.bytes_per_block
            for a in self.cache.cache_allocators.values()
        )
        return math.ceil(held / self._bytes_per_block) if self._bytes_per_block else 0

    def _free_blocks(self) -> int:
        """Free blocks as the scheduler can use them: free sectors, free blocks in allocated sectors, and the
        blocks kept for prefix sharing (the scheduler evicts them before it offloads a request)."""
        cache = self.cache
        if self._layer_pool:  # the BlockManager's count holds the prefix-sharing blocks already
            return int(cache.get_num_free_blocks())
        pool = cache.pool
        free = pool.num_free_sectors * cache.bytes_per_sector
        for allocator in cache.cache_allocators.values():
            free += pool.count_free_blocks(allocator.index) * allocator.bytes_per_block
        return free // self._bytes_per_block + self._cached_blocks(cache)
