"""`kineto_quiet` keeps kineto's known lines off file descriptor 2, and passes every other line on: the
user's program may write there while the profiler starts and stops (another thread, a C extension)."""

from __future__ import annotations

import os

import pytest

from kvtrace.profiler_trace import kineto_quiet

# The lines libkineto writes straight to fd 2 (torch 2.13, CPU), as a full disk left them on the terminal
USDT = b"USDT:2026-12-02 11:03:49 22191:22191 SyncActivityProfilerHandler.cpp:59] profiler_stop\n"
FAILED = b"ERROR:2026-12-02 11:01:18 19329:19329 output_json.cpp:977] Failed to write to log file!\n"
USERS = b"ERROR: my program's own line\n"


@pytest.mark.parametrize("trace_unwritten", [True, False])
def test_kinetos_write_failure_is_dropped_only_when_kvtrace_names_the_trace(capfd, trace_unwritten):
    # GIVEN kineto's lines and one of the user's, written to fd 2 while it is kept quiet
    with kineto_quiet(lambda: trace_unwritten):
        for line in (USDT, USERS, FAILED):
            os.write(2, line)

    # THEN the user's line is on stderr; kineto's failed write only when kvtrace's own error says it
    err = capfd.readouterr().err.encode()
    assert err == (USERS if trace_unwritten else USERS + FAILED)
