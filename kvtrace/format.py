"""The run directory's format: its layout, its schema version, its file names and the records of its logs.

Stdlib only, on purpose: the analyzers read runs on a laptop without torch, so this module must import
nothing heavy. The recorder writes through `RunWriter` (its files through `kvtrace.json_writes`); everything
else reads through `read_run` (`kvtrace.run_reader`, each line checked by `kvtrace.run_checks`).
See docs/format.md for every field.

Layout of a run directory::

    manifest.json         run metadata; rewritten atomically at start and at end
    kv_events.jsonl       one KV event per line, appended, flushed by the writer thread every 0.1 s
    weights.jsonl         one parameter/buffer storage per line; later, what the model took or let go
    memory_samples.jsonl  process/device memory, one sample per step; host figures every 100 ms
    profiler/             torch.profiler Chrome trace(s) (tensorboard_trace_handler)
    snapshots/            CUDA allocator snapshot pickles (exit.pickle, oom.pickle)

Clock: every `t_ns` in kvtrace's own files is Unix-epoch nanoseconds (`time.time_ns()`), the clock the
profiler's `baseTimeNanoseconds + ts` also lands on, so both line up without conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtrace.run_layout import DERIVED_DIRS as DERIVED_DIRS
from kvtrace.run_layout import EXPORT_RUNS_PARTS as EXPORT_RUNS_PARTS

# Which folders are runs and run groups is part of the format, in a module of its own so that a command can
# ask it of any input cheaply (kvtrace.run_layout): its names are the format's too.
from kvtrace.run_layout import GROUP_FORMAT as GROUP_FORMAT
from kvtrace.run_layout import GROUP_MARKER as GROUP_MARKER
from kvtrace.run_layout import MANIFEST as MANIFEST
from kvtrace.run_layout import PROFILER_DIR as PROFILER_DIR
from kvtrace.run_layout import RANK_DIR_PREFIX as RANK_DIR_PREFIX
from kvtrace.run_layout import RUN_DIR_FILES as RUN_DIR_FILES
from kvtrace.run_layout import RUN_DIR_LEFTOVERS as RUN_DIR_LEFTOVERS
from kvtrace.run_layout import RUN_DIRS as RUN_DIRS
from kvtrace.run_layout import SNAPSHOT_DIR as SNAPSHOT_DIR
from kvtrace.run_layout import holds_export as holds_export
from kvtrace.run_layout import is_run_dir as is_run_dir
from kvtrace.run_layout import is_run_group as is_run_group
from kvtrace.run_layout import rank_dirs as rank_dirs
from kvtrace.run_layout import searched_for_runs as searched_for_runs

if TYPE_CHECKING:
    from kvtrace.run_reader import read_run as read_run

SCHEMA_VERSION = 1
KV_EVENTS = "kv_events.jsonl"
WEIGHTS = "weights.jsonl"
MODEL_CONFIG = "model_config.json"  # the model's Hugging Face config, whole (`kvtrace plan --from-run`)
MEMORY_SAMPLES = "memory_samples.jsonl"
# vLLM runs (docs/format.md, "vLLM runs"): the engine's paged KV pool, its steps and its requests.
ENGINE = "engine.json"
ENGINE_STEPS = "engine_steps.jsonl"
ENGINE_REQUESTS = "engine_requests.jsonl"
ENGINE_FILES = (ENGINE, ENGINE_STEPS, ENGINE_REQUESTS)
# The manifest note of a `record(model="auto")` run whose vLLM LLM kept its engine in another process
# (VLLM_ENABLE_V1_MULTIPROCESSING=1): readers tell it from a run that found no generate() call
ENGINE_NOT_FOLLOWED_NOTE = "vLLM engine not followed: "
# The manifest note of a `record(dir)` run (no model=) inside which a vLLM LLM started fine: the block
# records a refused start only, so readers say the engine's pool is missing, not that the run held no KV
ENGINE_NOT_RECORDED_NOTE = "vLLM engine not recorded: "
# Written into a run by `kvtrace report` (and the demo), replaced when the run is recorded again.
# The manifest written at start is padded with spaces (valid JSON) to this size, so that on a full disk,
# where its atomic rewrite's new file cannot be written, the final one still fits over the same blocks.
MANIFEST_RESERVE_BYTES = 32 * 1024
# Held (flock) by the recording that writes the folder, removed at its end; not part of the run (run_lock.py)
LOCK_FILE = ".kvtrace.lock"

DERIVED_FILES = ("kv_counters.trace.json.gz", "timeline.html")  # DERIVED_DIRS: kvtrace.run_layout
# What a recording writes besides its manifest: the names, and the folders holding files of its own
# (RUN_DIR_FILES). The manifest's `files` lists those there at its end, never a file of the user's that
# shares the folder.
RECORDED_FILES = (KV_EVENTS, WEIGHTS, MEMORY_SAMPLES, MODEL_CONFIG, *ENGINE_FILES)
RECORDED_DIRS = (PROFILER_DIR, SNAPSHOT_DIR)
# What a run owns besides its manifest: replacing a run removes these names, and in RUN_DIRS the files of its
# own (kvtrace.run_removal), nothing else.
RUN_FILES = (*RECORDED_FILES, *DERIVED_FILES)
# The largest layer index: the analyzers keep layers in int16 columns; readers refuse a larger one, and
# `kvtrace.track()` refuses it before anything is logged.
MAX_LAYER = 2**15 - 1
# The most layers a model may say it has (a config's num_hidden_layers, a manifest's model.num_layers): one
# past the largest index a layer of the KV log can have. Real models have a few hundred at most; a count past
# this is damage, and the planners' per-layer loops would run for minutes on it or exhaust memory (10**9).
MAX_LAYERS = MAX_LAYER + 1

# The KV event vocabulary (docs/format.md explains each).
EVENT_KINDS = (
    "created",  # a storage appears for this layer/kind for the first time
    "grown",  # replaced by a larger storage (torch.cat growth, reallocation)
    "replaced",  # replaced by a storage of the same or smaller size inside the cache's own method
    "written",  # same storage, written in place (static caches, preallocated custom caches)
    "evicted",  # tokens removed: by a press/eviction library or any code rebinding keys/values
    "cropped",  # Cache.crop (assisted decoding rollback)
    "reset",  # Cache.reset
    "reordered",  # beam search reorder / batch select / repeat
    "offloaded",  # moved to CPU by an offloaded cache
    "prefetched",  # moved back to the accelerator
    "masked",  # tokens hidden in place (kvpress AdaKV): no storage change, nothing released
    "freed",  # the storage was released (no tensor refers to it any more)
)
# The `reason` of a `reorder_cache`'s `reordered` events outside beam search (a caller permuting its rows):
# the analyzers do not read its rows as beams.
NO_BEAMS_REASON = "no_beams"
# The `reason` of the events of a `crop` or `reset` made while no `generate()` call of the recorded model runs
# on that thread (a chat's "regenerate" between two calls): the caller's, never a draft rejection.
CALLER_REASON = "caller"


@dataclass(slots=True)
class KvEvent:
    """One change in one KV storage. `addr`/`storage_bytes` describe the storage (the memory held), while
    `shape`/`logical_bytes` describe the tensor the cache uses, which may be a view of a larger storage.
    Slotted: a long run's log is read into millions of these, kept for the whole command, and a `__dict__`
    each was a third of their memory. Events read back share their equal values (`kvtrace.kv_event_sharing`):
    a `shape` list is never changed in place."""

    seq: int
    t_ns: int
    step: int
    phase: str  # "prefill" | "decode" | "" (outside a forward)
    event: str
    layer: int
    kv: str  # "k" | "v"
    part: str  # "data" (full precision), "qdata"/"qscale"/... (quantized parts), "buffer" (custom)
    addr: int
    storage_bytes: int
    view_offset: int = 0
    shape: list[int] = field(default_factory=list)
    logical_bytes: int = 0
    dtype: str = ""
    device: str = ""
    tokens: int = 0
    evicted_tokens: int = 0
    prev_addr: int = 0
    cache: int = 0  # which cache object (several can live in one run)
    source: str = "hf"  # "hf" | "module" | "track"
    reason: str = ""
    # Batch rows in use when fewer than shape[0] (a preallocated module cache written for a smaller batch);
    # 0: every row of the tensor. `tokens` are per row of these.
    rows: int = 0
    masked_entries: int = 0  # on `masked`: the (row, head, token) entries the mask hides
    # A tracked tensor's positions a row that its storage has room for, where more than its length (a view
    # cut to the tokens written of one preallocated tensor: its max_seq); 0: its length.
    capacity_tokens: int = 0
    # A tracked tensor's batch rows that the tensor it is cut from has room for, where more than its rows (a
    # view cut to the rows in use of one preallocated tensor: its max_batch); 0: its rows.
    capacity_rows: int = 0

    def to_json(self) -> dict[str, Any]:
        # Field by field, in their order: `asdict` deep-copies and was most of the recorder's cost per event,
        # and a slotted event has no `__dict__` to copy (the export makes a million of these)
        return {
            "seq": self.seq,
            "t_ns": self.t_ns,
            "step": self.step,
            "phase": self.phase,
            "event": self.event,
            "layer": self.layer,
            "kv": self.kv,
            "part": self.part,
            "addr": self.addr,
            "storage_bytes": self.storage_bytes,
            "view_offset": self.view_offset,
            "shape": self.shape,
            "logical_bytes": self.logical_bytes,
            "dtype": self.dtype,
            "device": self.device,
            "tokens": self.tokens,
            "evicted_tokens": self.evicted_tokens,
            "prev_addr": self.prev_addr,
            "cache": self.cache,
            "source": self.source,
            "reason": self.reason,
            "rows": self.rows,
            "masked_entries": self.masked_entries,
            "capacity_tokens": self.capacity_tokens,
            "capacity_rows": self.capacity_rows,
        }


# A KV event's `cache`: which source's state it changes. Transformers caches count 1, 2, ... and step over
# the ids kept for the other sources, so that no two sources of one run share an id (the recorder's state
# per (cache, layer), or a report's figures per cache); runs recorded before this may have both on one id.
MODULE_CACHE_ID = 1000  # tensors on the model's modules (Meta's `cache_k`/`cache_v`)
# A layer with several cache-holding modules (`layers.N.self_attn` and `layers.N.cross_attn`) logs each one's
# under its own id, 1000 + its rank among its layer's: on one id the second's slots overwrote the first's
MODULE_CACHE_IDS = range(MODULE_CACHE_ID, MODULE_CACHE_ID + 100)
TRACK_CACHE_ID = 2000  # tensors handed to `kvtrace.track()`
VLLM_CACHE_ID = 3000  # vLLM's paged pool
CB_CACHE_ID = 3100  # transformers' continuous batching pool
RESERVED_CACHE_IDS = frozenset({*MODULE_CACHE_IDS, TRACK_CACHE_ID, VLLM_CACHE_ID, CB_CACHE_ID})


def next_cache_id(last: int) -> int:
    """The id of the transformers cache seen after the one numbered `last` (0 before the first)."""
    cid = last + 1
    while cid in RESERVED_CACHE_IDS:
        cid += 1
    return cid


# What a weights.jsonl line after the first ones says happened to its storage (docs/format.md):
WEIGHT_EVENTS = (
    "added",  # the model took it during the run (`model.to(torch.bfloat16)`, `.half()`, `.cuda()`)
    "freed",  # a weight storage listed earlier was released by the allocator
)


@dataclass
class WeightRecord:
    """A parameter or buffer storage, so analyzers can tell weights from the rest. `event` is empty for the
    storages held when the recording began; otherwise one of `WEIGHT_EVENTS`, at `t_ns` during `step`."""

    name: str
    addr: int
    storage_bytes: int
    dtype: str
    device: str
    shape: list[int]
    event: str = ""
    t_ns: int = 0
    step: int = 0

    def to_json(self) -> dict[str, Any]:
        """The line's fields: a storage held from the start has none of the change's (as before they
        existed)."""
        fields = dict(self.__dict__)
        if not self.event:
            for name in ("event", "t_ns", "step"):
                del fields[name]
        return fields


def profiler_traces(root: Path) -> list[Path]:
    """The torch.profiler traces in the run directory `root`, by name (the last is the one read)."""
    folder = root / PROFILER_DIR
    if not folder.is_dir():
        return []
    names = (".pt.trace.json", ".pt.trace.json.gz")
    return sorted(p for p in folder.iterdir() if p.name.endswith(names) and p.is_file())


@dataclass
class Run:
    """A run directory read back: the manifest and every complete line of every log."""

    path: Path
    manifest: dict[str, Any]
    kv_events: list[KvEvent]
    weights: list[WeightRecord]  # the storages held when the recording began
    memory_samples: list[dict[str, Any]]
    truncated: bool = False  # the last line of a log was cut (the process died mid-write)
    # kv_events.jsonl's lines set aside as read (`_KvEventLines`), for the readers' notes: per event name
    # that is not of `EVENT_KINDS` (cut to 40 characters), the lines skipped
    unknown_kv_events: dict[str, int] = field(default_factory=dict)
    # lines whose `storage_bytes` was smaller than their own tensor, read at the least it can hold
    short_kv_storages: int = 0
    # lines whose `dtype` names no torch dtype (cut to 40 characters), read as logged: their byte fields as
    # written, with no element size to check them by
    unknown_kv_dtypes: dict[str, int] = field(default_factory=dict)
    # lines whose `seq` an earlier line has (each line's is one more than the last's): read in file order
    repeated_kv_seqs: int = 0
    # Per KV event, in `kv_events`' order: the fields its line left out, which read as KvEvent's defaults
    # ("" or 0: a `freed` line has no dtype, shape or tokens). The export writes them null, not as a value
    # the line never held. Empty when not known (a Run built otherwise than by `read_run`).
    kv_fields_left_out: list[frozenset[str]] = field(default_factory=list)
    # What the model's weights did afterwards (`WEIGHT_EVENTS`), in the order it happened
    weight_changes: list[WeightRecord] = field(default_factory=list)
    # weights.jsonl or memory_samples.jsonl found cut or short after the run ended: read as missing (the
    # readers' note names the file and says this), empty above
    damaged_files: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.manifest.get("ended", {}).get("status") in ("ok", "exception")

    def profiler_traces(self) -> list[Path]:
        return profiler_traces(self.path)

    def snapshots(self) -> list[Path]:
        # Regular files only: a named pipe called *.pickle would hang the first read.
        folder = self.path / SNAPSHOT_DIR
        return sorted(p for p in folder.glob("*.pickle") if p.is_file()) if folder.is_dir() else []


def __getattr__(name: str) -> Any:
    """`read_run`, which docs/format.md names here, lives in `kvtrace.run_reader`: loaded when first asked
    for, as that module imports this one."""
    if name == "read_run":
        from kvtrace.run_reader import read_run

        return read_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
