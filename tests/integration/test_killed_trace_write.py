"""A recording killed while the profiler writes its trace, at the block's end: the slowest part of a long
run's end (1.6 s for 256 new tokens, 8 s gzipped: docs/recording.md), where a `timeout`, a scheduler's
SIGTERM or a SIGKILL lands. Every step has run by then; a kill there must cost the trace, not the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main
from kvtrace.format import MANIFEST

REPO_ROOT = Path(__file__).resolve().parents[2]
LAYERS, KV_HEADS, HEAD_DIM, BATCH, PROMPT, NEW_TOKENS = 2, 2, 16, 2, 8, 4

# A real recording of the real model that SIGKILLs itself where the source put in at `# the kill` says.
CHILD = textwrap.dedent(
    f"""
    import gzip, os, signal, sys
    import torch
    import kvtrace
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    out_dir, gzip_trace = sys.argv[1], sys.argv[2] == "gzip"
    model = build_model(tiny_size({LAYERS}, kv_heads={KV_HEADS}))
    ids = torch.randint(3, 1000, ({BATCH}, {PROMPT}), generator=torch.Generator().manual_seed(0))

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    # the kill
    with torch.no_grad(), kvtrace.record(out_dir, model=model, gzip_trace=gzip_trace):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens={NEW_TOKENS},
                       min_new_tokens={NEW_TOKENS}, do_sample=False, pad_token_id=0)
    print("not killed")
    """
)

# As torch.profiler's export begins, before a byte of the trace is written.
KILL_AS_THE_EXPORT_BEGINS = """
torch.profiler.profile.export_chrome_trace = lambda prof, path, *args, **kwargs: die()
"""

# Once torch's gzip writer (torch.profiler compresses the trace into the file gzip.open gives it) has put
# part of the trace on disk, as a long compression has when the kill lands.
KILL_WHILE_GZIPPING = """
write = gzip.GzipFile.write
def write_then_die(self, data):
    done = write(self, data)
    if self.fileobj.tell() > 1024:
        self.fileobj.flush()
        die()
    return done
gzip.GzipFile.write = write_then_die
"""


def _killed_run(tmp_path: Path, kill: str, trace: str) -> Path:
    """The run folder of a child recording killed by `kill`; `trace` "gzip" or "json"."""
    script, run = tmp_path / "child.py", tmp_path / "run"
    script.write_text(CHILD.replace("# the kill", kill.strip()), encoding="utf-8")
    child = subprocess.run(
        [sys.executable, str(script), str(run), trace],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert json.loads((run / MANIFEST).read_text())["ended"] == {"status": "running"}
    return run


@pytest.mark.parametrize(
    ("kill", "trace"),
    [(KILL_AS_THE_EXPORT_BEGINS, "json"), (KILL_WHILE_GZIPPING, "gzip")],
    ids=["export-begins", "while-gzipping"],
)
def test_a_run_killed_while_its_trace_is_written_reads_every_step_without_the_trace(
    tmp_path: Path, capsys: Any, kill: str, trace: str
) -> None:
    # GIVEN a recording SIGKILLed while torch.profiler writes its trace, every step of its generate() run
    run = _killed_run(tmp_path, kill, trace)

    # THEN no cut trace is left under a name the readers take for a trace ...
    left = sorted(p.name for p in (run / "profiler").iterdir()) if (run / "profiler").is_dir() else []
    assert not [name for name in left if name.endswith((".pt.trace.json", ".pt.trace.json.gz"))], left

    # ... and WHEN it is reported, it reads (status 0), says the process died, and holds the last step's
    # KV: layers x K,V x kv_heads x head_dim x tokens x batch x 4 B (fp32), the cache holding the prompt and
    # every new token but the last (never fed back); 2 x 2 x 2 x 16 x 11 x 2 x 4 = 11,264 B
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    tokens = PROMPT + NEW_TOKENS - 1
    assert report["kv"]["final_bytes"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * BATCH * 4 == 11264
    assert any("the process died" in note for note in report["notes"]), report["notes"]
