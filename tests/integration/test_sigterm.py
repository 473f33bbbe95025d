"""A SIGTERM during a recording (a SLURM or Kubernetes time limit, `docker stop`, `timeout`): the block ends
as a Ctrl-C would, the run's end and trace are written, and the process still dies of SIGTERM. Python's
default died at once: manifest "running", no trace, and `diagnose` guessed the kernel's OOM killer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.format import MANIFEST
from kvtrace.llama import build_model
from tests.tiny import tiny_size

REPO_ROOT = Path(__file__).resolve().parents[2]
LAYERS, KV_HEADS, HEAD_DIM, BATCH, PROMPT, NEW_TOKENS = 2, 2, 16, 2, 8, 6
STOP_AT = 3  # the forward whose end the SIGTERM comes after: the prefill and 2 decode steps ran
# The cache after that forward: the prompt and 2 tokens fed back, fp32:
# layers x K,V x kv_heads x head_dim x tokens x batch x 4 B = 2 x 2 x 2 x 16 x 10 x 2 x 4
KV_AT_STOP = LAYERS * 2 * KV_HEADS * HEAD_DIM * (PROMPT + STOP_AT - 1) * BATCH * 4
# ... and after the whole run: the prompt and every new token but the last (never fed back)
KV_AT_END = LAYERS * 2 * KV_HEADS * HEAD_DIM * (PROMPT + NEW_TOKENS - 1) * BATCH * 4

# A real recording of the real model; at `# the setup` each test puts what sends the SIGTERM, through
# `at_stop()`, run after forward STOP_AT returns.
CHILD = textwrap.dedent(
    f"""
    import os, signal, sys, time
    import torch
    import kvtrace
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    out_dir = sys.argv[1]
    model = build_model(tiny_size({LAYERS}, kv_heads={KV_HEADS}))
    ids = torch.randint(3, 1000, ({BATCH}, {PROMPT}), generator=torch.Generator().manual_seed(0))
    forwards = []

    def sigterm_self():
        os.kill(os.getpid(), signal.SIGTERM)

    def wait_for_parent():
        print("ready", flush=True)
        for _ in range(600):
            time.sleep(0.1)

    # the setup

    def hook(module, args, output):
        forwards.append(1)
        if len(forwards) == {STOP_AT}:
            at_stop()

    model.register_forward_hook(hook)
    try:
        with torch.no_grad(), kvtrace.record(out_dir, model=model):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens={NEW_TOKENS},
                           min_new_tokens={NEW_TOKENS}, do_sample=False, pad_token_id=0)
    finally:
        print("finally", flush=True)
    print("handler after", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
    """
)


def _child(tmp_path: Path, setup: str, from_parent: bool = False) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the child recording with `setup`; `from_parent`: this process sends the SIGTERM once the child
    says it reached forward STOP_AT (as a scheduler would, from outside)."""
    script, run = tmp_path / "child.py", tmp_path / "run"
    script.write_text(CHILD.replace("# the setup", textwrap.dedent(setup).strip()), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [sys.executable, str(script), str(run)]
    if not from_parent:
        return run, subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=300)
    return run, subprocess.CompletedProcess(args, child.returncode, "ready\n" + out, err)


def _report(run: Path, capsys: Any) -> dict[str, Any]:
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _diagnosis(run: Path, capsys: Any) -> dict[str, Any]:
    assert main(["diagnose", str(run), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _traces(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "profiler").glob("*.pt.trace.json*"))


def test_a_sigterm_from_outside_ends_the_block_writes_the_run_and_the_process_still_dies_of_it(
    tmp_path: Path, capsys: Any
) -> None:
    # GIVEN a recording that a scheduler SIGTERMs from outside while generate() runs (in its step 3)
    run, child = _child(tmp_path, "at_stop = wait_for_parent", from_parent=True)

    # THEN the process dies of SIGTERM as it would have without kvtrace: no `finally` of its own ran
    assert child.returncode == -signal.SIGTERM, child.stderr[-3000:]
    assert "finally" not in child.stdout

    # ... and its run is whole: the manifest says how it ended, the profiler's trace is written
    ended = json.loads((run / MANIFEST).read_text())["ended"]
    assert (ended["status"], ended["type"], ended["signal"]) == ("interrupted", "Terminated", "SIGTERM")
    assert ended["signal_t_ns"] <= ended["t_ns"]
    assert len(_traces(run)) == 1

    # WHEN it is reported THEN the KV held after step 3 is the arithmetic's, and the note names the SIGTERM
    report = _report(run, capsys)
    assert report["kv"]["final_bytes"] == KV_AT_STOP == 10240
    assert report["partial"] is False  # the trace's allocator events are read
    assert any("stopped by SIGTERM" in note for note in report["notes"]), report["notes"]
    assert not any("Ctrl-C" in note for note in report["notes"])


def test_a_process_killed_while_writing_its_end_after_a_sigterm_is_not_read_as_dying_unexplained(
    tmp_path: Path, capsys: Any
) -> None:
    # GIVEN a recording SIGTERMed in step 3, then SIGKILLed as the profiler begins to write its trace (a
    # grace period shorter than the write: 10 s in `docker stop`)
    setup = """
    at_stop = sigterm_self
    torch.profiler.profile.export_chrome_trace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    """
    run, child = _child(tmp_path, setup)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]

    # THEN its manifest says it got SIGTERM, its logs whole by then
    ended = json.loads((run / MANIFEST).read_text())["ended"]
    assert (ended["status"], ended["signal"]) == ("running", "SIGTERM")
    assert _report(run, capsys)["kv"]["final_bytes"] == KV_AT_STOP

    # ... and `diagnose` says so, where it guessed the kernel's OOM killer
    diagnosis = _diagnosis(run, capsys)
    assert diagnosis["unfinished"] == "terminated"
    assert main(["diagnose", str(run)]) == 0
    headline = capsys.readouterr().out.splitlines()[1]
    assert "got SIGTERM" in headline and "OOM killer" not in headline, headline


def test_a_sigterm_while_the_block_ends_waits_for_the_trace(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a SIGTERM that comes as the profiler begins to write the trace, after every step ran
    setup = """
    at_stop = lambda: None
    export = torch.profiler.profile.export_chrome_trace
    def sigterm_then_export(*args, **kwargs):
        sigterm_self()
        return export(*args, **kwargs)
    torch.profiler.profile.export_chrome_trace = sigterm_then_export
    """
    run, child = _child(tmp_path, setup)

    # THEN the trace is written whole, the block is "ok" (it ran to its end), and the process dies of it
    assert child.returncode == -signal.SIGTERM, child.stderr[-3000:]
    ended = json.loads((run / MANIFEST).read_text())["ended"]
    assert (ended["status"], ended["signal"]) == ("ok", "SIGTERM")
    assert len(_traces(run)) == 1
    report = _report(run, capsys)
    assert report["kv"]["final_bytes"] == KV_AT_END == 13312  # every step ran


def test_the_users_own_sigterm_handler_is_left_alone(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a program with its own SIGTERM handler (a server's graceful stop), SIGTERMed in step 3
    setup = """
    at_stop = sigterm_self
    def mine(signum, frame):
        print("my handler", flush=True)
    signal.signal(signal.SIGTERM, mine)
    """
    run, child = _child(tmp_path, setup)

    # THEN its handler runs, the block goes on to its end, and the handler is its own after the block
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.splitlines() == ["my handler", "finally", "handler after False"]
    ended = json.loads((run / MANIFEST).read_text())["ended"]
    assert ended["status"] == "ok" and "signal" not in ended
    report = _report(run, capsys)
    assert report["kv"]["final_bytes"] == KV_AT_END


def test_sigterm_is_taken_over_only_during_a_main_thread_block(tmp_path: Path) -> None:
    model = build_model(tiny_size(LAYERS, kv_heads=KV_HEADS))
    ids = torch.randint(3, 1000, (1, 4), generator=torch.Generator().manual_seed(0))
    seen: dict[str, Any] = {}

    def generate(key: str, out: Path) -> None:
        with torch.no_grad(), kvtrace.record(out, model=model, profiler=False):
            seen[key] = signal.getsignal(signal.SIGTERM)
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)

    # In the main thread: kvtrace's handler while the block runs, Python's default again after it
    generate("main", tmp_path / "main")
    assert callable(seen["main"]) and seen["main"] is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    # On another thread (a server's worker), where Python runs no handler: left as it is
    worker = threading.Thread(target=generate, args=("thread", tmp_path / "thread"))
    worker.start()
    worker.join()
    assert seen["thread"] is signal.SIG_DFL


def test_the_export_says_which_runs_a_sigterm_stopped(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a run stopped by SIGTERM in step 3, and one killed while writing its end after a SIGTERM
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    stopped, _ = _child(tmp_path / "a", "at_stop = sigterm_self")
    setup = """
    at_stop = sigterm_self
    torch.profiler.profile.export_chrome_trace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    """
    killed, _ = _child(tmp_path / "b", setup)
    # WHEN both are exported and queried
    tables = tmp_path / "tables"
    assert main(["export", str(stopped), str(killed), "-o", str(tables), "-q"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    sql = "SELECT ended_status, ended_type, ended_signal FROM runs ORDER BY ended_status"
    assert main(["query", str(tables), "--json", sql]) == 0
    # THEN each row says the SIGTERM, the killed one's status still `running`
    assert json.loads(capsys.readouterr().out) == [
        {"ended_status": "interrupted", "ended_type": "Terminated", "ended_signal": "SIGTERM"},
        {"ended_status": "running", "ended_type": None, "ended_signal": "SIGTERM"},
    ]
