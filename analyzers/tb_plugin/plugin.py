"""The "KV Cache" TensorBoard tab: kvtrace runs under `--logdir` (or `--logdir_spec`), next to the PyTorch
Profiler's tab.

TensorBoard finds `KvCachePluginLoader` through the `tensorboard_plugins` entry point of the kvtrace
distribution, so the tab exists as soon as kvtrace is installed. The tab is an iframe: TensorBoard imports
`kvcache.js` and calls its `render()`, which navigates the frame to this plugin's own `index.html` (as
torch-tb-profiler does), a page this plugin serves with everything it needs, plotly's JavaScript
included, so nothing is fetched from outside the machine.

Every endpoint answers JSON. A run that cannot be read answers `{"error": ...}` with status 200 (the
request was fine, the run is not; a 4xx would also print a console error in the browser); only a missing
or unknown `run` parameter is a 400/404. No exception escapes to TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tensorboard.plugins import base_plugin
from werkzeug import Request, Response

from analyzers.tb_plugin.run_store import DEFAULT_MAX_POINTS, DEFAULT_MAX_STEPS, RunStore, UnknownRun

__all__ = ["PLUGIN_NAME", "KvCachePlugin", "KvCachePluginLoader"]

PLUGIN_NAME = "kvcache"
_STATIC = Path(__file__).resolve().parent / "static"
_STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "kvcache.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",  # imported by kvcache.js: units, axes, heatmap
}
_HEADERS = [("X-Content-Type-Options", "nosniff")]
# A spec entry starting so is a URI (gs://bucket/logs), not a `name:` entry: TensorBoard's own test.
_URI = re.compile("[a-zA-Z][0-9a-zA-Z.]*://.*")


def parse_logdir_spec(spec: str) -> dict[str, str | None]:
    """`--logdir_spec` as TensorBoard reads it: directory -> entry name (None for an entry without one).

    TensorBoard's own parser is private (`data_ingester._parse_event_files_spec`), so its rule is kept
    here and a test holds the two equal: `name:dir` entries split by commas; an entry starting with `/`, a
    Windows drive or a URI scheme has no name; the name ends at the first colon."""
    entries: dict[str, str | None] = {}
    for entry in spec.split(","):
        name: str | None = None
        folder = entry
        if (
            _URI.match(entry) is None
            and ":" in entry
            and entry[0] != "/"
            and not os.path.splitdrive(entry)[0]
        ):
            name, _, folder = entry.partition(":")
        if _URI.match(folder) is None:
            folder = os.path.realpath(os.path.expanduser(folder))
        entries[folder] = name
    return entries


def _store_for(context: base_plugin.TBContext) -> RunStore:
    """The runs of `--logdir`, or of every directory of `--logdir_spec` (TensorBoard leaves
    `context.logdir` empty then; the spec is only in its flags)."""
    logdir = getattr(context, "logdir", None)
    spec = getattr(getattr(context, "flags", None), "logdir_spec", None)
    if logdir or not spec:
        return RunStore(logdir or None)
    return RunStore(None, logdir_spec=parse_logdir_spec(spec))


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity (the browser's JSON.parse rejects them): they travel as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json(payload: Any, status: int = 200) -> Response:
    body = json.dumps(_finite(payload), separators=(",", ":"))
    return Response(body, status=status, content_type="application/json", headers=_HEADERS)


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _wsgi(handler: Callable[[Request], Response]) -> WsgiApp:
    """A request handler as the WSGI app TensorBoard mounts (werkzeug's decorator, minus its typing
    that does not fit bound methods)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return handler(Request(environ))(environ, start_response)

    return app


def _int_arg(request: Request, name: str, default: int, low: int, high: int) -> int:
    try:
        return min(max(int(request.args.get(name, default)), low), high)
    except ValueError:
        return default


class KvCachePlugin(base_plugin.TBPlugin):
    """Serves the KV Cache dashboard and its data for the runs under the log directory (directories)."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        super().__init__(context)
        self._store = _store_for(context)
        self._plotly_js: bytes | None = None
        self._plotly_lock = threading.Lock()

    # -- TensorBoard's plugin contract -------------------------------------------------------------
    def get_plugin_apps(self) -> dict[str, WsgiApp]:
        return {
            "/index.html": _wsgi(self._serve_static),
            "/kvcache.js": _wsgi(self._serve_static),
            "/charts.js": _wsgi(self._serve_static),
            "/plotly.min.js": _wsgi(self._serve_plotly),
            "/runs": _wsgi(self._serve_runs),
            "/summary": _wsgi(self._serve_run_data),
            "/timeline": _wsgi(self._serve_run_data),
            "/layers": _wsgi(self._serve_run_data),
            "/diagnosis": _wsgi(self._serve_run_data),
            "/pool": _wsgi(self._serve_run_data),
        }

    def is_active(self) -> bool:
        """Shown when the log directory holds at least one kvtrace run (checked on each listing, so a
        run recorded after TensorBoard started turns the tab on)."""
        try:
            return self._store.has_runs()
        except Exception:
            return False

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/kvcache.js", tab_name="KV Cache")

    # -- routes ------------------------------------------------------------------------------------
    def _serve_static(self, request: Request) -> Response:
        name = request.path.rsplit("/", 1)[-1]
        content_type = _STATIC_FILES.get(name)
        if content_type is None:
            return Response("not found", status=404, headers=_HEADERS)
        return Response((_STATIC / name).read_bytes(), content_type=content_type, headers=_HEADERS)

    def _serve_plotly(self, request: Request) -> Response:
        """plotly.js from the installed plotly package: the same version the HTML reports inline, and no
        CDN. Read once (about 4 MB) and kept."""
        with self._plotly_lock:
            if self._plotly_js is None:
                from plotly.offline import get_plotlyjs

                self._plotly_js = get_plotlyjs().encode("utf-8")
        headers = [*_HEADERS, ("Cache-Control", "private, max-age=86400")]
        return Response(self._plotly_js, content_type="text/javascript; charset=utf-8", headers=headers)

    def _serve_runs(self, request: Request) -> Response:
        try:
            runs = self._store.list_runs()
        except Exception as exc:
            traceback.print_exc()
            return _json({"logdir": self._store.shown_logdir, "runs": [], "error": f"{exc}"})
        return _json({"logdir": self._store.shown_logdir, "runs": runs})

    def _serve_run_data(self, request: Request) -> Response:
        name = request.args.get("run")
        if not name:
            return _json({"error": "missing ?run="}, status=400)
        endpoint = request.path.rsplit("/", 1)[-1]
        try:
            if endpoint == "summary":
                payload = self._store.summary(name)
            elif endpoint == "timeline":
                points = _int_arg(request, "points", DEFAULT_MAX_POINTS, 100, 200_000)
                payload = self._store.timeline(name, max_points=points)
            elif endpoint == "layers":
                steps = _int_arg(request, "steps", DEFAULT_MAX_STEPS, 10, 100_000)
                payload = self._store.layers(name, max_steps=steps)
            elif endpoint == "pool":
                payload = self._store.pool(name)
            else:
                payload = self._store.diagnosis(name)
        except UnknownRun:
            return _json({"error": f"no kvtrace run named {name!r} under the log directory"}, status=404)
        except Exception as exc:  # a bug in a figure must not take the server down
            traceback.print_exc()
            payload = {"error": f"{exc.__class__.__name__}: {exc}"}
        return _json(payload)


class KvCachePluginLoader(base_plugin.TBLoader):
    """The entry point TensorBoard loads; the plugin needs no flags of its own."""

    def load(self, context: base_plugin.TBContext) -> KvCachePlugin:
        return KvCachePlugin(context)
