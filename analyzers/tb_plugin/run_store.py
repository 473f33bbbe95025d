"""The KV Cache plugin's data: which kvtrace runs are under the log directories, and their figures as JSON.

Kept apart from TensorBoard (no werkzeug, no tensorboard import) so the figures can be tested without a
server, and so that everything here is the analyzers' own model: the summary is `report_to_json`, the
timeline is `Report.timelines` cut down by `downsample_indices`, the heatmap is the KV log's `step_live`,
an engine's pool is the HTML report's own figure (`analyzers.render.engine`).
Nothing is computed twice and nothing imports torch.

Runs are found as `kvtrace export` finds them (kvtrace.run_layout.searched_for_runs: at any depth, the runs
inside a run included, never in a run's own profiler/, snapshots/, tb_scalars/). Under `--logdir_spec
name:dir,...` a run's name starts with its entry's name (its directory, for an entry without one), as
TensorBoard names runs there, so two entries' runs never share a name.

A run is parsed once and kept while its files are unchanged: the cache key is (path, manifest mtime,
kv_events.jsonl size), so a run still being recorded (the log grows every step, the manifest is rewritten
at the end) is read again, and a finished one never is. A run that cannot be read becomes an error entry
for that run alone; the store never raises for a run's content.
"""

from __future__ import annotations

import json
import os
import threading
import traceback
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtrace.errors import KvtraceError
from kvtrace.format import KV_EVENTS, MANIFEST, SCHEMA_VERSION, is_run_dir, searched_for_runs

__all__ = ["DEFAULT_MAX_POINTS", "DEFAULT_MAX_STEPS", "RunStore", "UnknownRun"]

DEFAULT_MAX_POINTS = 5_000
DEFAULT_MAX_STEPS = 1_000
# Tools' folders that no run lives in, never walked (a log directory may be a checkout), on top of the
# shared rule's skips (hidden folders, a run's own).
_TOOL_DIRS = frozenset({"__pycache__", "node_modules"})


class UnknownRun(LookupError):
    """The requested run name is not a run directory under the log directory (a bad request, not a
    broken run)."""


@dataclass(frozen=True)
class _Loaded:
    """One parsed run, or why it could not be parsed."""

    source: Any = None  # analyzers.model.MemorySource
    report: Any = None  # analyzers.summary.Report
    error: str | None = None


def _cache_key(path: Path) -> tuple[str, int, int]:
    manifest = path / MANIFEST
    events = path / KV_EVENTS
    mtime = manifest.stat().st_mtime_ns if manifest.exists() else -1
    size = events.stat().st_size if events.exists() else -1
    return (str(path), mtime, size)


def _error_text(exc: BaseException) -> str:
    """A KvtraceError already reads as one line for the user; anything else is a bug worth its type."""
    if isinstance(exc, KvtraceError):
        return str(exc)
    return f"{exc.__class__.__name__}: {exc}"


def _section(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    """A manifest object field, or {} where a hand-edited manifest holds something else there."""
    value = manifest.get(key)
    return value if isinstance(value, dict) else {}


def _manifest_info(path: Path) -> dict[str, Any]:
    """What the run selector shows, from the manifest alone (cheap: no log is read), with the manifest's
    own problems reported the way `read_run` would refuse it."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"error": f"{manifest_path}: corrupt manifest ({exc.__class__.__name__})"}
    if not isinstance(manifest, dict) or manifest.get("format") != "kvtrace-run":
        return {"error": f"{manifest_path}: not a kvtrace manifest"}
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version < 1:
        return {"error": f"{manifest_path}: missing or invalid schema_version"}
    if version > SCHEMA_VERSION:
        return {"error": f"{manifest_path}: schema version {version} is newer than this kvtrace reads"}
    device, model, ended = (_section(manifest, key) for key in ("device", "model", "ended"))
    return {
        "status": ended.get("status", "running"),
        "device": device.get("type"),
        "model": model.get("class"),
        "num_layers": model.get("num_layers"),
        "started_ns": manifest.get("started_ns"),
        "error": None,
    }


def _run_dirs(root: Path) -> Iterator[Path]:
    """The run directories below `root` (itself included), in walk order, by the rule `kvtrace export`
    searches with. Links are not followed (a scan runs on every request); an unreadable folder is passed
    over."""
    if not root.is_dir():
        return
    for folder, dirs, _files in os.walk(root, followlinks=False):
        path = Path(folder)
        in_run = is_run_dir(path)
        if in_run:
            yield path
        dirs[:] = sorted(d for d in dirs if d not in _TOOL_DIRS and searched_for_runs(path / d, in_run))


class RunStore:
    """The kvtrace runs under one log directory (or the directories of a `--logdir_spec`), scanned on
    demand and parsed lazily, at most `max_cached` at a time (a parsed run holds its event columns: tens of
    MB for a long one).

    `logdir_spec` is TensorBoard's parsed `--logdir_spec`: directory -> its entry's name (None for an entry
    given without one); given, it replaces `logdir`."""

    def __init__(
        self,
        logdir: str | os.PathLike[str] | None,
        max_cached: int = 8,
        *,
        logdir_spec: Mapping[str, str | None] | None = None,
    ) -> None:
        self.logdir = Path(logdir).expanduser().resolve() if logdir and not logdir_spec else None
        # (prefix of its runs' names, directory): no prefix for a plain log directory
        self._roots: list[tuple[str | None, Path]] = []
        if logdir_spec:
            for folder, name in logdir_spec.items():
                path = Path(folder).expanduser().resolve()
                self._roots.append((name or str(path), path))
        elif self.logdir is not None:
            self._roots.append((None, self.logdir))
        self._max_cached = max_cached
        self._cache: OrderedDict[tuple[str, int, int], _Loaded] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._path_locks: dict[str, threading.Lock] = {}

    # -- discovery ---------------------------------------------------------------------------------
    @property
    def shown_logdir(self) -> str:
        """What the tab shows as its log directory: the directory, or the spec's entries as name:dir."""
        if self.logdir is not None:
            return str(self.logdir)
        return ",".join(f"{prefix}:{path}" for prefix, path in self._roots)

    def scan(self) -> dict[str, Path]:
        """Run name (path relative to the log directory, "." for the log directory itself; under a spec, the
        entry's name and that path, "name" for its directory itself) -> path. Walked afresh on every call so
        that runs written after TensorBoard started appear."""
        runs: dict[str, Path] = {}
        for prefix, root in self._roots:
            for path in _run_dirs(root):
                rel = path.relative_to(root).as_posix()
                name = rel if prefix is None else prefix if rel == "." else f"{prefix}/{rel}"
                taken, n = name, 1
                while taken in runs:  # two entries of one name (a:/x,a:/y) holding runs of one path
                    n += 1
                    taken = f"{name}#{n}"
                runs[taken] = path
        return dict(sorted(runs.items()))

    def has_runs(self) -> bool:
        return any(next(_run_dirs(root), None) is not None for _prefix, root in self._roots)

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run with what the selector shows; a run whose manifest is unreadable, or whose last
        parse failed, carries its error."""
        rows = []
        for name, path in self.scan().items():
            row: dict[str, Any] = {"name": name, "path": str(path)}
            try:
                row.update(_manifest_info(path))
                if row["error"] is None:
                    with self._cache_lock:
                        cached = self._cache.get(_cache_key(path))
                    if cached is not None and cached.error is not None:
                        row["error"] = cached.error
            except Exception as exc:  # a run vanishing mid-scan is that run's problem only
                row["error"] = _error_text(exc)
            rows.append(row)
        return rows

    # -- parsing -----------------------------------------------------------------------------------
    def _path_of(self, name: str) -> Path:
        runs = self.scan()
        if name not in runs:
            raise UnknownRun(name)
        return runs[name]

    def load(self, name: str) -> _Loaded:
        """The parsed run, from the cache while its files are unchanged. Never raises for a run's
        content: a KvtraceError or any other failure becomes `_Loaded.error`."""
        path = self._path_of(name)
        with self._cache_lock:
            lock = self._path_locks.setdefault(str(path), threading.Lock())
        with lock:  # two panels asking for the same run at once parse it once
            try:
                key = _cache_key(path)
            except OSError as exc:
                return _Loaded(error=_error_text(exc))
            with self._cache_lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
            try:
                from analyzers.report import build_report

                source, report = build_report(path)
                loaded = _Loaded(source=source, report=report)
            except Exception as exc:
                if not isinstance(exc, KvtraceError):
                    traceback.print_exc()
                loaded = _Loaded(error=_error_text(exc))
            with self._cache_lock:
                for old in [k for k in self._cache if k[0] == key[0]]:
                    del self._cache[old]  # an older version of this run
                self._cache[key] = loaded
                while len(self._cache) > self._max_cached:
                    self._cache.popitem(last=False)
            return loaded

    # -- the endpoints' payloads -------------------------------------------------------------------
    def summary(self, name: str) -> dict[str, Any]:
        """Exactly `kvtrace report RUN --json`."""
        loaded = self.load(name)
        if loaded.error is not None:
            return {"error": loaded.error}
        from analyzers.render.json import report_to_json

        return report_to_json(loaded.report)

    def timeline(self, name: str, max_points: int = DEFAULT_MAX_POINTS) -> dict[str, Any]:
        """Per device: live bytes by category (kv/weights/other), allocated and reserved, at most about
        `max_points` points per series. The kept indices are the union of each series' own
        peak-keeping downsample, so every series reaches exactly its full-resolution max and min."""
        loaded = self.load(name)
        if loaded.error is not None:
            return {"error": loaded.error}
        from analyzers.tb_plugin.timeline_payload import timeline_payload

        return timeline_payload(name, loaded.source, loaded.report, max_points)

    def pool(self, name: str) -> dict[str, Any]:
        """An engine run's KV pool (vLLM, transformers' continuous batching): the HTML report's pool table
        and its very figure (blocks used against the total over engine steps, preemptions, blocks per
        request) as plotly JSON. A pool made by a run that ended before its first engine step has its rows
        and `figure: null`, as the page shows its table alone; a refused start (no pool) has neither, and a
        run without an engine `title: null` too."""
        loaded = self.load(name)
        if loaded.error is not None:
            return {"error": loaded.error}
        run, figures = loaded.source.meta.get("engine"), loaded.report.engine
        if run is None or figures is None:
            return {"run": name, "title": None, "rows": [], "figure": None}
        from analyzers.render.engine import engine_pool_figure, engine_pool_rows, engine_pool_title

        figure = engine_pool_figure(run)
        # The page's rule (engine_html_section): the table wherever there is a pool, chart or not
        pool_made = figure is not None or (figures.status != "refused_start" and bool(figures.num_blocks))
        return {
            "run": name,
            "title": engine_pool_title(figures),
            "rows": [list(row) for row in engine_pool_rows(figures)] if pool_made else [],
            "figure": json.loads(figure.to_json()) if figure is not None else None,
        }

    def layers(self, name: str, max_steps: int = DEFAULT_MAX_STEPS) -> dict[str, Any]:
        """KV bytes live per layer at the end of each step (the KV log's `step_live`), and the evictions.
        Over `max_steps` steps, the steps kept are those `downsample_indices` picks on the steps' total KV,
        so the heaviest step is always a column.

        `evictions` holds one marker per column and layer that lost tokens: the tokens evicted over every
        batch row (the report's per-layer figure: they add up to its `kv.evicted_tokens`), of every kind
        (`by_kind`: window, press, crop) and cache, in the steps since the previous column (`first_step`
        to `step`: a column stands for the steps left out before it). A sliding window evicts at every
        step once full: one marker per step and layer, not one per tensor."""
        loaded = self.load(name)
        if loaded.error is not None:
            return {"error": loaded.error}
        kv = loaded.source.meta.get("kv")
        if kv is None or not kv.step_live:
            return {"run": name, "steps": [], "phases": [], "layers": [], "kv_bytes": [], "evictions": []}
        import numpy as np

        from analyzers.eviction_markers import eviction_markers
        from analyzers.timeline import downsample_indices

        all_steps = sorted(kv.step_live)
        layer_ids = sorted({layer for live in kv.step_live.values() for layer in live})
        totals = np.array([sum(kv.step_live[s].values()) for s in all_steps], dtype=np.int64)
        steps = [all_steps[i] for i in downsample_indices(totals, max_steps)]
        return {
            "run": name,
            "steps_total": len(all_steps),
            "steps": steps,
            "phases": [kv.step_phase.get(s, "") for s in steps],
            "layers": layer_ids,
            "kv_bytes": [[int(kv.step_live[s].get(layer, 0)) for s in steps] for layer in layer_ids],
            "evictions": eviction_markers(kv.evicted_by_step, steps),
        }

    def diagnosis(self, name: str) -> dict[str, Any]:
        """`kvtrace diagnose RUN --json` and the HTML sections `kvtrace report -o` adds, when the page adds
        any: for an engine run (vLLM), its engine diagnosis (its budget, crossed or not; its refusal or
        preemptions), chosen as the page chooses it; for another run, when it ended in an OOM or crossed
        the memory budget it was recorded with. `diagnosis: null` otherwise (a peak diagnosis without a
        budget prices nothing to headline)."""
        loaded = self.load(name)
        if loaded.error is not None:
            return {"error": loaded.error}
        engine = self._engine_diagnosis(name, loaded)
        if engine is not None:
            return engine
        budget = loaded.report.budget
        if loaded.report.oom is None and not (budget is not None and budget["crossed"]):
            return {"run": name, "oom": None, "diagnosis": None}
        from analyzers.planning.diagnose import diagnose
        from analyzers.render.diagnosis import diagnosis_to_html, diagnosis_to_json

        try:
            result = diagnose(loaded.source, loaded.report)
        except Exception as exc:  # the summary still stands without the remedies
            return {"run": name, "oom": loaded.report.oom, "error": _error_text(exc)}
        # The page shows the analyzers' own HTML section (escaped there), so the wording is the report's.
        return {
            "run": name,
            "oom": loaded.report.oom,
            "diagnosis": diagnosis_to_json(result),
            "html": diagnosis_to_html(result),
        }

    @staticmethod
    def _engine_diagnosis(name: str, loaded: _Loaded) -> dict[str, Any] | None:
        """An engine run's payload, the report page's sections (analyzers.planning.engine_run_diagnosis
        chooses them for both); None for a run the page explains as the Hugging Face diagnosis does."""
        from analyzers.planning.engine_run_diagnosis import engine_run_diagnosis
        from analyzers.render.engine_run_diagnosis import (
            engine_run_diagnosis_to_html,
            engine_run_diagnosis_to_json,
        )

        try:
            explained = engine_run_diagnosis(loaded.source, loaded.report)
            if explained is None:
                return None
            sections = engine_run_diagnosis_to_html(explained)
            result = engine_run_diagnosis_to_json(explained)
        except Exception as exc:  # the summary still stands without the diagnosis
            return {"run": name, "oom": None, "error": _error_text(exc)}
        if not sections:  # nothing to explain: no budget, the pool held every request
            return {"run": name, "oom": None, "diagnosis": None}
        payload = {"run": name, "oom": None, "diagnosis": result, "html": "".join(sections)}
        if explained.unpriced is not None:  # the budget's section, and why the refusal is not priced
            payload["error"] = explained.unpriced
        return payload
