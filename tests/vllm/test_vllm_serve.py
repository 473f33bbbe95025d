"""`KVTRACE_DIR=runs/serve vllm serve MODEL`, then `kvtrace report runs/serve`, as the README says: vLLM's
OpenAI-compatible server (the engine core in its own process, where the plugin records), the workload's 8
requests sent over HTTP at once, the server stopped as a user stops it (Ctrl-C: SIGINT to its process group,
as a terminal sends it) or as Kubernetes does (SIGTERM to the server alone). The figures are vLLM's own, from
the server's /metrics, and the pool's arithmetic.

With `--shutdown-timeout 0` (vLLM's default) the server SIGKILLed its engine core milliseconds after its
SIGTERM, often before `EngineCore.shutdown` closed the run, and always when the engine core was busy for a
moment (a GPU step in flight: `KVTRACE_TEST_STOP_DELAY_S`, tests/vllm/vllm_cli.py); after Ctrl-C the
server's SIGTERM also killed it in `shutdown`, where vLLM has put SIGTERM's default action back. The run
stayed `running` and read as "the process died" (Ctrl-C 5 of 7 stops, busy SIGTERM 3 of 3). A fixed 5 s
grace then failed on a loaded machine, where a Ctrl-C under a step left the engine core in that step for
9-11 s (its worker's exit): the server now waits as long as the engine core holds its run open.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvtrace import format as fmt
from kvtrace.integrations.vllm_shutdown import SHUTDOWN_GRACE_S
from tests.vllm.vllm_cli import HELD_SUFFIX, HOLD_STEP_ENV, STOP_DELAY_ENV, STOPPED_WORKER_DELAY_ENV
from tests.vllm.workload import (
    BLOCK_BYTES,
    BLOCK_SIZE,
    DTYPE_BYTES,
    HEAD_DIM,
    NEW_TOKENS,
    PROMPT_TOKENS,
    REQUESTS,
    ROOT,
    SIZE,
    llm_kwargs,
    prompt_token_ids,
)

START_S = 300  # a cold start on a shared 2-core machine takes 25-40 s
STOP_S = 180  # ~5 s here; more than a held step's HOLD_STEP_MAX_S, so that a hold a signal missed ends too


@dataclass(frozen=True)
class Served:
    run_dir: Path
    metrics: str  # the server's /metrics after the workload, Prometheus text
    completions: list[dict[str, Any]]
    log: str  # the server's stdout and stderr, every process of it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve_argv(model: Path, port: int) -> list[str]:
    """`vllm serve MODEL --port N` with the engine arguments the other vLLM tests give `LLM(...)`."""
    argv = [sys.executable, "-m", "tests.vllm.vllm_cli", "serve", str(model), "--port", str(port)]
    for name, value in llm_kwargs(model).items():
        if name == "model" or value is False:  # disable_log_stats=False: the server's default
            continue
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def _get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read().decode()


def _wait_healthy(server: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"vllm serve exited {server.returncode}:\n{log.read_text()[-5000:]}"
        try:
            if _get(port, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"vllm serve not healthy after {START_S} s:\n{log.read_text()[-5000:]}")


def _wait_stopped(server: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for the server to exit after its stop signal; if it does not, fail with what it printed and which
    of its processes still run (a CI log is all there is to read afterwards)."""
    try:
        server.wait(STOP_S)
    except subprocess.TimeoutExpired:
        alive = subprocess.run(
            ["ps", "-o", "pid,stat,etime,args", "-g", str(server.pid)], capture_output=True, text=True
        ).stdout
        raise AssertionError(
            f"vllm serve still running {STOP_S} s after its stop signal; its processes:\n{alive}\n"
            f"its log:\n{log.read_text(errors='replace')[-8000:]}"
        ) from None


def _complete(port: int, model: Path, token_ids: list[int]) -> dict[str, Any]:
    """One completion whose prompt is token ids (the server has no tokenizer: `--skip-tokenizer-init`)."""
    body = {"model": str(model), "prompt": token_ids, "max_tokens": NEW_TOKENS, "ignore_eos": True}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({**body, "temperature": 0.0}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.load(response))


def _terminal_sigint() -> None:
    """The server's Ctrl-C as a terminal's foreground job gets it: CI starts this suite in the background of a
    shell without job control (`.ci/run`'s side stream, `&`), which starts it with SIGINT ignored; every child
    inherits that, and vLLM's worker, which sets no handler of its own, then ignored the Ctrl-C and held its
    step to the hold's end (the requests finished, and stop 51's server ran 60 s past its Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_server(
    model: Path, run_dir: Path, log: Path, env_extra: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    """(`KVTRACE_DIR=RUN vllm serve MODEL` started on a free port, that port), its stdout and stderr in `log`,
    `env_extra` (the test CLI's hooks) in its environment. In its own process group, as a terminal's
    foreground job, with SIGINT as a terminal gives it (`_terminal_sigint`): Ctrl-C reaches every process."""
    port = _free_port()
    env = dict(os.environ, KVTRACE_DIR=str(run_dir), PYTHONPATH=str(ROOT), **env_extra)  # this checkout's
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # conftest's in-process setting: the server's own default
    with log.open("wb") as out:
        server = subprocess.Popen(
            _serve_argv(model, port),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_terminal_sigint,
        )
    return server, port


def _serve(model: Path, run_dir: Path, log: Path, stop: signal.Signals, stop_delay_s: float) -> Served:
    delay = {STOP_DELAY_ENV: str(stop_delay_s) if stop_delay_s else ""}
    server, port = _start_server(model, run_dir, log, delay)
    try:
        _wait_healthy(server, port, log)
        with ThreadPoolExecutor(REQUESTS) as pool:
            completions = list(pool.map(lambda ids: _complete(port, model, ids), prompt_token_ids()))
        metrics = _get(port, "/metrics")[1]
        if stop == signal.SIGINT:
            os.killpg(server.pid, signal.SIGINT)  # Ctrl-C
        else:
            server.send_signal(signal.SIGTERM)  # Kubernetes: the container's main process
        _wait_stopped(server, log)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return Served(run_dir, metrics, completions, log.read_text(errors="replace"))


def _metric(text: str, name: str, **labels: str) -> float:
    """A Prometheus sample's value: the line of `name` whose labels include `labels`."""
    for line in text.splitlines():
        match = re.fullmatch(r"([^{\s]+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match[3])
    raise KeyError(f"{name} {labels}")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _kvtrace(*argv: str) -> subprocess.CompletedProcess[str]:
    """The `kvtrace` command in a fresh interpreter, as a user runs it after the server stopped."""
    return subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "stop_delay_s"), [(signal.SIGINT, 0.0), (signal.SIGTERM, 1.0)], ids=["ctrl-c", "sigterm-busy"]
)
def test_vllm_serve_under_kvtrace_dir(
    tiny_model_dir: Path, tmp_path: Path, stop: signal.Signals, stop_delay_s: float
) -> None:
    # GIVEN `KVTRACE_DIR=RUN vllm serve MODEL`, the workload's 8 requests over HTTP, the server stopped by
    # Ctrl-C, or by SIGTERM while its engine core is busy for a second
    served = _serve(tiny_model_dir, tmp_path / "serve", tmp_path / "server.log", stop, stop_delay_s)
    assert {c["choices"][0]["finish_reason"] for c in served.completions} == {"length"}
    assert [c["usage"]["completion_tokens"] for c in served.completions] == [NEW_TOKENS] * REQUESTS
    run_dir = served.run_dir

    # THEN the engine core's run was closed at the engine's shutdown, not left as a process that died
    manifest = json.loads((run_dir / fmt.MANIFEST).read_text())
    assert manifest["ended"]["status"] == "ok"
    assert manifest["engine"]["process"] == "engine_core"
    # ... its pool is the arithmetic: 4 layers x 2 (K, V) x 2 KV heads x 64 x 2 B = 2 KiB a token, 16 blocks
    # of 32 tokens = 1 MiB
    token_bytes = SIZE.num_layers * 2 * SIZE.num_kv_heads * HEAD_DIM * DTYPE_BYTES
    assert token_bytes == 2048 and token_bytes * BLOCK_SIZE == BLOCK_BYTES
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    assert (engine["num_blocks"], engine["block_size"], engine["kv_cache_bytes"]) == (16, 32, 2**20)
    # ... its requests and preemptions are the server's own
    requests = _jsonl(run_dir / fmt.ENGINE_REQUESTS)
    preemptions = _metric(served.metrics, "vllm:num_preemptions_total")
    assert preemptions > 0  # 8 x 3 blocks wanted, 15 usable
    assert len([e for e in requests if e["event"] == "preempted"]) == preemptions
    assert _metric(served.metrics, "vllm:request_num_preemptions_sum") == preemptions
    finished = [e for e in requests if e["event"] == "finished"]
    assert len(finished) == _metric(served.metrics, "vllm:request_success_total", finished_reason="length")
    assert len(finished) == REQUESTS and {e["finish_reason"] for e in finished} == {"length"}
    waiting = [e for e in requests if e["event"] == "waiting"]
    assert sorted((e["prompt_tokens"], e["max_tokens"]) for e in waiting) == [(PROMPT_TOKENS, NEW_TOKENS)] * 8
    assert _metric(served.metrics, "vllm:prompt_tokens_total") == REQUESTS * PROMPT_TOKENS

    # WHEN the run is reported, diagnosed and planned from
    report = _kvtrace("report", str(run_dir), "--json", "--no-export")
    diagnosis = _kvtrace("diagnose", str(run_dir))
    plan = _kvtrace("plan", "--engine", "vllm", "--from-run", str(run_dir))

    # THEN each reads it whole, with the same figures, and nothing of kvtrace's raised anywhere
    for done in (report, diagnosis, plan):
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    figures = json.loads(report.stdout)
    kv = figures["kv"]
    assert kv["peak_bytes"] == 2**20
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == token_bytes
    assert not [note for note in figures["notes"] if "never finished" in note]
    assert f"vLLM preempted {preemptions:.0f} time(s)" in diagnosis.stdout
    assert "never finished" not in diagnosis.stdout
    assert re.search(r"KV blocks\s+16\n", plan.stdout), plan.stdout
    assert "kvtrace: not recording" not in served.log
    assert not re.search(r"kvtrace[/\\]", served.log), "a traceback through kvtrace in the server's log"


@pytest.mark.slow
def test_ctrl_c_under_a_step_ends_the_run_interrupted_not_raised(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN `KVTRACE_DIR=RUN vllm serve MODEL` serving the workload's requests, Ctrl-C while a step runs (its
    # worker holds the step, as a long GPU step would be in flight): the terminal's SIGINT reaches vLLM's
    # worker too, which dies under the step, and the step raises in the engine core as vLLM shuts down.
    # The worker takes longer to exit than the server's 5 s grace, as on a loaded machine (9-11 s, 2 cores
    # at a load of 7-9), and the engine core's step ends only then: the server SIGKILLed the engine core in
    # that step, and the run stayed `running` (in CI under load; with this delay, every time)
    run_dir, log, hold = tmp_path / "serve", tmp_path / "server.log", tmp_path / "hold-step"
    worker_exit_s = SHUTDOWN_GRACE_S + 3.0
    hooks = {HOLD_STEP_ENV: str(hold), STOPPED_WORKER_DELAY_ENV: str(worker_exit_s)}
    server, port = _start_server(tiny_model_dir, run_dir, log, hooks)
    pool = ThreadPoolExecutor(REQUESTS)
    try:
        _wait_healthy(server, port, log)
        # The worker runs 3 steps, then holds its 4th: a Ctrl-C sent on the worker's word that it holds one
        # comes under a step however loaded the machine (a hold begun on the test's sight of 3 steps in the
        # run's log came after the last step there, and the Ctrl-C with no request left to stop)
        hold.write_text("3")
        sent = [pool.submit(_complete, port, tiny_model_dir, ids) for ids in prompt_token_ids()]
        held = Path(str(hold) + HELD_SUFFIX)
        deadline = time.monotonic() + START_S
        while not held.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held.exists(), f"the worker never held a step:\n{log.read_text(errors='replace')[-5000:]}"
        os.killpg(server.pid, signal.SIGINT)
        _wait_stopped(server, log)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        pool.shutdown(wait=True, cancel_futures=True)
    assert any(future.exception() is not None for future in sent)  # requests were running when it stopped

    # THEN the run ends `interrupted` by the SIGINT, with what raised in the step (it ended `exception`,
    # RuntimeError: cancelled, as if the engine had failed), the server having waited for it to close
    ended = json.loads((run_dir / fmt.MANIFEST).read_text())["ended"]
    assert (ended["status"], ended.get("signal")) == ("interrupted", "SIGINT"), ended
    assert "has not closed its run" in log.read_text(errors="replace")
    # vLLM's own account of the step, kept
    assert (ended["type"], ended["message"]) == ("RuntimeError", "cancelled")
    assert "RuntimeError: cancelled" in log.read_text(errors="replace")
    last = _jsonl(run_dir / fmt.ENGINE_STEPS)[-1]
    assert last["raised"] is True
    # AND the report says so, and reads the run's steps up to the stop
    report = _kvtrace("report", str(run_dir), "--json", "--no-export")
    assert report.returncode == 0, report.stderr[-3000:]
    notes = json.loads(report.stdout)["notes"]
    assert any("interrupted (Ctrl-C)" in note for note in notes), notes
    assert not any("raised" in note for note in notes), notes
    diagnosis = _kvtrace("diagnose", str(run_dir))
    assert diagnosis.returncode == 0 and "Traceback" not in diagnosis.stderr, diagnosis.stderr[-3000:]
