"""A recorded run opens in a real TensorBoard: the PyTorch Profiler plugin (torch-tb-profiler) lists it.

The plugin scans the log directory for `*.pt.trace.json[.gz]` in a background thread, loads each run in
another, and serves `/data/plugin/pytorch_profiler/runs` -> {"runs": [...], "loading": bool}; a run is
named by its folder relative to the log directory (torch_tb_profiler/plugin.py, `_get_run_name`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.format import PROFILER_DIR

pytest.importorskip("tensorboard")
pytest.importorskip("torch_tb_profiler")

STARTUP_DEADLINE_S = 60.0
LOAD_DEADLINE_S = 60.0  # the plugin rescans every 10 s and parses the trace in a thread


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode("utf-8"))


def _poll(what: str, deadline_s: float, server: subprocess.Popen[bytes], log: Path, probe) -> Any:
    """Call `probe` until it returns something truthy; fail early, with the server's log, if it died."""
    deadline = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(
                f"tensorboard exited with {server.returncode} while waiting for {what}:\n"
                f"{log.read_text(errors='replace')[-4000:]}"
            )
        try:
            last = probe()
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    pytest.fail(
        f"no {what} within {deadline_s:.0f} s (last answer: {last!r}):\n"
        f"{log.read_text(errors='replace')[-4000:]}"
    )


@pytest.mark.slow
def test_profiler_plugin_lists_the_recorded_run(tiny_model, prompt_batch, tmp_path):
    # GIVEN a run recorded with the profiler on, in a log directory of runs
    logdir = tmp_path / "runs"
    run_dir = logdir / "dynamic_b2"
    with torch.no_grad(), kvtrace.record(run_dir, model=tiny_model, profiler=True):
        tiny_model.generate(
            input_ids=prompt_batch.input_ids,
            attention_mask=prompt_batch.attention_mask,
            max_new_tokens=3,
            do_sample=False,
        )
    assert list((run_dir / PROFILER_DIR).glob("*.pt.trace.json*"))
    expected_run = f"{run_dir.name}/{PROFILER_DIR}"

    # WHEN a real TensorBoard serves that log directory
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "tensorboard.log"
    with open(log, "wb") as log_fh:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(logdir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
    try:
        # THEN the profiler plugin is listed and active ...
        def plugin_active() -> bool:
            listing = _get_json(f"{base}/data/plugins_listing")
            return bool(listing.get("pytorch_profiler", {}).get("enabled"))

        _poll("active pytorch_profiler plugin", STARTUP_DEADLINE_S, server, log, plugin_active)

        # ... and, once it has finished loading, it lists our run.
        def runs_loaded() -> dict[str, Any] | None:
            runs = _get_json(f"{base}/data/plugin/pytorch_profiler/runs")
            return runs if not runs["loading"] and expected_run in runs["runs"] else None

        runs = _poll(f"run {expected_run!r} loaded", LOAD_DEADLINE_S, server, log, runs_loaded)
        assert runs["runs"] == [expected_run]
        views = _get_json(f"{base}/data/plugin/pytorch_profiler/views?run={expected_run}")
        assert "Memory" in views, views  # profile_memory=True gives the plugin its memory view
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
