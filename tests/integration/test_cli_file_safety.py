"""What the CLI's writes do to files already there when things go wrong: a full disk, a read-only run, a
downloaded run whose files are links to elsewhere, a named pipe among the inputs.

Each case was found by a tester and used to destroy a file (an old report cut off, a victim file
overwritten through a link) or to hang. A full disk is a real file-size limit (RLIMIT_FSIZE) on a real
`kvtrace` process: no root, no mount, no mock.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvtrace.cli import build_parser, main
from tests.unit.test_plan import LLAMA_3_8B_CONFIG

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
REPO = SAMPLES.parent


def _kvtrace_on_a_full_disk(
    argv: list[str], max_file_bytes: int | None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`kvtrace.cli.main(argv)` in a process of its own (killed after `timeout` s, as a hang would be) that
    cannot grow any file past `max_file_bytes` (None: no limit): writes past it fail with EFBIG, as they
    fail with ENOSPC on a full disk (stdout and stderr are pipes, not limited)."""
    limit = "resource.RLIM_INFINITY" if max_file_bytes is None else str(max_file_bytes)
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
        "from kvtrace.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=timeout
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_full_disk_leaves_the_old_report_whole_and_no_new_file(tmp_path: Path) -> None:
    # GIVEN an HTML report already written, and a disk with room for 64 KiB more per file
    old = tmp_path / "old.html"
    old.write_text("OLD REPORT\n", encoding="utf-8")
    new = tmp_path / "new.html"
    for target in (old, new):
        # WHEN the report (several hundred KiB) is written over it, or to a new path
        argv = ["report", str(SAMPLES / "static_b2"), "--no-export", "-q", "-o", str(target)]
        done = _kvtrace_on_a_full_disk(argv, 64 << 10)
        # THEN one line and exit status 1, as before
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1 and f"{target}: cannot write" in done.stderr
    # AND the old report is as it was (it used to be cut off at 64 KiB), no 0-byte new file, no temp file
    assert old.read_text(encoding="utf-8") == "OLD REPORT\n"
    assert not new.exists()
    assert _leftovers(tmp_path) == []


def test_a_full_disk_leaves_the_runs_previous_exports_whole(tmp_path: Path) -> None:
    # GIVEN a run whose exports a first report wrote
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    first = _kvtrace_on_a_full_disk(["report", str(run), "-q"], None)
    assert first.returncode == 0, first.stderr
    # that differ from what a report of it writes now (a report of an unchanged run writes nothing)
    with gzip.open(run / "kv_counters.trace.json.gz", "at") as fh:
        fh.write(" ")
    (events,) = (run / "tb_scalars").iterdir()
    events.write_bytes(events.read_bytes()[:-1] + b"\0")
    counters = (run / "kv_counters.trace.json.gz").read_bytes()
    scalars = {p.name: p.read_bytes() for p in (run / "tb_scalars").iterdir()}
    assert len(counters) > 1024 and scalars
    # WHEN a second report runs on a disk with room for 1 KiB per file
    done = _kvtrace_on_a_full_disk(["report", str(run), "-q"], 1024)
    # THEN the exports are not written, and those of the first report are left whole (the counters used to
    # be cut at 1 KiB, a gzip stream no viewer opens), with no temporary file or folder left in the run
    assert "kv_counters.trace.json.gz" in done.stderr
    assert (run / "kv_counters.trace.json.gz").read_bytes() == counters
    assert {p.name: p.read_bytes() for p in (run / "tb_scalars").iterdir()} == scalars
    assert _leftovers(run) == [] and _leftovers(run / "tb_scalars") == []


def test_a_run_that_cannot_be_written_still_gets_its_report(tmp_path: Path) -> None:
    # GIVEN a run on a disk where nothing more can be written (as a read-only mount)
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    # WHEN it is reported, with the exports into the run on (the default)
    done = _kvtrace_on_a_full_disk(["report", str(run), "--json", "-q"], 0)
    # THEN the report is printed and the exit status is 0 (it used to print nothing and exit 1)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kv"]["peak_bytes"] > 0
    # AND each export not written gets one line naming it and the flag that skips it
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    for line, name in zip(lines, ("kv_counters.trace.json.gz", "tb_scalars"), strict=True):
        assert f"{run / name}: cannot write" in line and "warning" in line and "--no-export" in line
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (SAMPLES / "dynamic_b2").iterdir())


def test_a_downloaded_run_with_links_cannot_aim_report_at_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run from elsewhere whose export paths and timeline.html are links to the user's own files
    victims = tmp_path / "home"
    victims.mkdir()
    (victims / "notes.txt").write_text("precious data 1\n", encoding="utf-8")
    (victims / "page.txt").write_text("precious data 2\n", encoding="utf-8")
    logs = victims / "logs"
    logs.mkdir()
    (logs / "events.out.tfevents.1.host.1.0").write_bytes(b"someone's training curves")
    run = tmp_path / "hostile"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    (run / "kv_counters.trace.json.gz").symlink_to(victims / "notes.txt")
    (run / "timeline.html").symlink_to(victims / "page.txt")
    (run / "tb_scalars").symlink_to(logs, target_is_directory=True)
    # WHEN it is reported with the README's own command
    assert main(["report", str(run), "-q", "-o", str(run / "timeline.html")]) == 0
    # THEN no file outside the run is touched (all three used to be overwritten or deleted)
    assert (victims / "notes.txt").read_text(encoding="utf-8") == "precious data 1\n"
    assert (victims / "page.txt").read_text(encoding="utf-8") == "precious data 2\n"
    assert [p.name for p in logs.iterdir()] == ["events.out.tfevents.1.host.1.0"]
    # AND the page asked for replaces the link at -o; the run's own exports are refused, one line each
    page = run / "timeline.html"
    assert not page.is_symlink() and page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert (run / "kv_counters.trace.json.gz").is_symlink() and (run / "tb_scalars").is_symlink()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, ("kv_counters.trace.json.gz", "tb_scalars"), strict=True):
        assert f"{run / name}: a symbolic link" in line and "--no-export" in line


def test_a_named_pipe_among_the_inputs_is_skipped_or_refused_never_waited_on(tmp_path: Path) -> None:
    # GIVEN a folder with a trace and a named pipe called *.pickle (nothing will ever write into it)
    folder = tmp_path / "traces"
    folder.mkdir()
    shutil.copy(next((SAMPLES / "static_b2" / "profiler").iterdir()), folder / "x.pt.trace.json")
    os.mkfifo(folder / "stray.pickle")
    # WHEN the folder is exported (a scan) THEN the pipe is skipped and the trace exported (it used to hang)
    done = _kvtrace_on_a_full_disk(
        ["export", str(folder), "-o", str(tmp_path / "tables"), "--json"], None, 60
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["inputs"], summary["exported"]) == (1, 1)
    # WHEN the pipe is named explicitly, to export, report or compare THEN one line says what it is
    pipe = str(folder / "stray.pickle")
    for argv in (
        ["export", pipe, "-o", str(tmp_path / "more")],
        ["report", pipe],
        ["compare", pipe, str(folder / "x.pt.trace.json")],
    ):
        done = _kvtrace_on_a_full_disk(argv, None, 60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.endswith(f"{pipe}: a named pipe, not a regular file; kvtrace reads files\n")
        assert done.stderr.count("\n") == 1


def test_a_model_config_that_is_a_named_pipe_is_refused_not_waited_on(tmp_path: Path) -> None:
    # GIVEN a model folder whose config.json is a named pipe
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text(json.dumps(LLAMA_3_8B_CONFIG))
    piped = tmp_path / "piped"
    piped.mkdir()
    os.mkfifo(piped / "config.json")
    # WHEN plan reads the model's config from that folder
    done = _kvtrace_on_a_full_disk(["plan", "--config", str(piped)], None, 60)
    # THEN one line names the pipe (opening it used to wait for a writer that never comes)
    assert done.returncode == 2, done.stderr
    pipe = piped / "config.json"
    assert done.stderr.endswith(f"{pipe}: a named pipe, not a regular file; kvtrace reads files\n")
    assert done.stderr.count("\n") == 1
    # (and the same folder with plain files plans)
    assert _kvtrace_on_a_full_disk(["plan", "--config", str(real)], None, 60).returncode == 0


def test_a_named_pipe_given_as_an_output_is_refused_never_replaced(tmp_path: Path) -> None:
    # GIVEN named pipes where the outputs go, and a link to one (as /dev/stdout is a link to a pipe or a
    # device); nothing will ever read them. (A device would be the same case: /dev/null, when run as root.)
    pipe = tmp_path / "page.html"
    os.mkfifo(pipe)
    link = tmp_path / "link.html"
    link.symlink_to(pipe)
    # (a sweep, and a demo run to be recorded again with --overwrite)
    sweep_out, demo_out = tmp_path / "sweep", tmp_path / "demo"
    sweep_out.mkdir()
    os.mkfifo(sweep_out / "sweep.json")
    shutil.copytree(SAMPLES / "dynamic_b2", demo_out)
    os.mkfifo(demo_out / "timeline.html")
    run, other = str(SAMPLES / "static_b2"), str(SAMPLES / "dynamic_b2")
    refused = [
        (
            ["report", run, "--no-export", "-q", "-o", str(pipe)],
            2,
            f"{pipe}: a named pipe, not a regular file",
        ),
        (
            ["report", run, "--no-export", "-q", "-o", str(link)],
            2,
            f"{link}: a symbolic link to a named pipe",
        ),
        (["compare", run, other, "-o", str(pipe)], 2, f"{pipe}: a named pipe, not a regular file"),
        (
            [
                *("demo", "--size", "tiny", "--batch", "1", "--new-tokens", "2", "--overwrite", "--out"),
                str(demo_out),
            ],
            2,
            f"{demo_out / 'timeline.html'}: a named pipe, not a regular file",
        ),
        (
            [
                *("sweep", "--batch", "1", "--context", "8", "--new-tokens", "2", "--cache", "dynamic"),
                *("--device", "cpu", "--overwrite", "--out", str(sweep_out)),
            ],
            2,
            f"{sweep_out / 'sweep.json'}: cannot write (a named pipe, not a regular file)",
        ),
    ]
    # (and a pipe, or /dev/null, where each command's own output file or folder goes: one rule for all, status
    # 2 as for any wrong argument; export, sweep, demo and run said 1 where report and compare said 2)
    script = tmp_path / "gen.py"
    script.write_text("print('ran')\n")
    folder_pipe = tmp_path / "folder"
    os.mkfifo(folder_pipe)
    for given, kind in ((folder_pipe, "a named pipe"), (Path("/dev/null"), "a character device")):
        sweep = ["sweep", "--batch", "1", "--context", "8", "--new-tokens", "2", "--device", "cpu"]
        demo = ["demo", "--size", "tiny", "--batch", "1", "--new-tokens", "2", "--device", "cpu"]
        refused += [
            (
                ["report", run, "--no-export", "-q", "-o", str(given)],
                2,
                f"{given}: {kind}, not a regular file",
            ),
            (["compare", run, other, "-o", str(given)], 2, f"{given}: {kind}, not a regular file"),
            (["export", run, "-q", "-o", str(given)], 2, f"{given}: cannot write ({kind}, not a folder)"),
            (
                [*sweep, "--out", str(given)],
                2,
                f"{given}: cannot create the sweep's folder ({kind} of that name is there, not a folder)",
            ),
            (
                [*demo, "--out", str(given)],
                2,
                f"{given}: cannot create the run folder ({kind} of that name is there, not a folder)",
            ),
            (
                ["run", "-o", str(given), str(script)],
                2,
                f"{given}: cannot create the run folder ({kind} of that name is there, not a folder)",
            ),
        ]
    for argv, status, said in refused:
        # WHEN a command is to write its page or summary there
        done = _kvtrace_on_a_full_disk(argv, None, 300)
        # THEN one line says what is there, and the pipe is left a pipe (a rename used to put a regular file
        # in its place, exit status 0), before anything is recorded
        assert done.returncode == status, done.stderr
        assert said in done.stderr and done.stderr.count("\n") == 1, done.stderr
    for fifo in (pipe, sweep_out / "sweep.json", demo_out / "timeline.html"):
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert link.is_symlink() and os.readlink(link) == str(pipe)
    demo_files = sorted(p.name for p in (SAMPLES / "dynamic_b2").iterdir())
    assert sorted(p.name for p in demo_out.iterdir()) == sorted([*demo_files, "timeline.html"])
    assert (demo_out / "manifest.json").read_bytes() == (
        SAMPLES / "dynamic_b2" / "manifest.json"
    ).read_bytes()
    assert sorted(p.name for p in sweep_out.iterdir()) == ["sweep.json"]
    assert stat.S_ISFIFO(os.lstat(folder_pipe).st_mode) and stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    # AND each command's --help says so where it gives its exit status
    for command in ("report", "compare", "export", "sweep", "demo", "run"):
        said = " ".join(_kvtrace_on_a_full_disk([command, "--help"], None, 60).stdout.split())
        assert "named pipe or a device (/dev/null included)" in said.split("Exit status:")[1], command


def _env(unbuffered: bool) -> dict[str, str]:
    """The environment of a `kvtrace` process, its standard output buffered (Python's default) or not
    (PYTHONUNBUFFERED, common in containers): each loses a failed write in its own way."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"} | (
        {"PYTHONUNBUFFERED": "1"} if unbuffered else {}
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_standard_output_on_a_full_disk_is_named_in_one_line(as_json: bool, unbuffered: bool) -> None:
    # GIVEN a real snapshot, and standard output on a full disk (`> file` there; /dev/full says ENOSPC)
    snapshot = REPO.parent / "shared" / "real_traces" / "snapshots" / "mem_snapshot.pickle"
    if not snapshot.exists():
        snapshot = SAMPLES / "static_b2"
    argv = [sys.executable, "-m", "kvtrace.cli", "report", str(snapshot), "--no-export", "-q"]
    # (buffered, the interpreter wrote the rest again at exit: exit status 120, "Exception ignored" after
    # the line)
    env = _env(unbuffered)
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            argv + (["--json"] if as_json else []), stdout=full, stderr=subprocess.PIPE, text=True, env=env
        )
    # THEN one line naming standard output (the OS's bare "No space left on device" named nothing), status 1
    assert done.returncode == 1, done.stderr
    assert done.stderr == "kvtrace report: error: standard output: cannot write (No space left on device)\n"


def _file_size_limit(max_file_bytes: int) -> Callable[[], None]:
    """A child's limit on the size of any file it writes (a disk with that much room): a write past it
    is cut short, the next fails with EFBIG (Python ignores SIGXFSZ)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.RLIM_INFINITY))

    return limit


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize(
    "argv",
    [
        ["report", str(SAMPLES / "vllm_preempt"), "--no-export", "-q", "--json"],
        ["report", str(SAMPLES / "vllm_preempt"), "--no-export", "-q"],
        ["diagnose", str(SAMPLES / "vllm_preempt"), "--json"],
        ["compare", str(SAMPLES / "static_b2"), str(SAMPLES / "dynamic_b2"), "--json"],
        ["plan", "--preset", "llama-3-8b", "--json"],
        ["query", str(SAMPLES / "static_b2"), "--json", "SELECT * FROM kv_events"],
    ],
    ids=["report-json", "report-text", "diagnose-json", "compare-json", "plan-json", "query-json"],
)
def test_standard_output_cut_short_by_a_full_disk_is_named_in_one_line(
    argv: list[str], unbuffered: bool, tmp_path: Path
) -> None:
    # GIVEN standard output into a file on a disk with room for 1 KiB, less than the command prints
    limit = 1024
    whole = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", *argv], capture_output=True, env=_env(unbuffered), timeout=120
    )
    assert whole.returncode == 0 and len(whole.stdout) > limit, whole.stderr
    # WHEN the command prints its result there
    out = tmp_path / "out"
    with out.open("wb") as stdout:
        done = subprocess.run(
            [sys.executable, "-m", "kvtrace.cli", *argv],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(unbuffered),
            preexec_fn=_file_size_limit(limit),
            timeout=120,
        )
    # THEN the output cut at 1 KiB is said in one line, exit status 1: unbuffered, the OS took the first
    # 1,024 bytes of the one write of the JSON, Python dropped the rest without a word, and it exited 0
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"kvtrace {argv[0]}: error: standard output: cannot write (File too large)\n"
    assert out.read_bytes() == whole.stdout[:limit]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["plan", "--help"], []], ids=["help", "version", "plan-help", "none"]
)
def test_help_and_version_on_a_full_disk_are_named_in_one_line(argv: list[str], unbuffered: bool) -> None:
    # WHEN the help or the version is printed onto a full disk
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "kvtrace.cli", *argv],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(unbuffered),
            timeout=120,
        )
    # THEN one line and exit status 1, as every command gives (argparse swallowed the error: exit status 0,
    # nothing said; buffered, 120 and "Exception ignored")
    prog = "kvtrace plan" if argv[:1] == ["plan"] else "kvtrace"
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"{prog}: error: standard output: cannot write (No space left on device)\n"


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("argv", [["--version"], ["plan", "--preset", "llama-3-8b"]], ids=["version", "plan"])
def test_a_reader_gone_before_the_output_ends_it_quietly(argv: list[str], unbuffered: bool) -> None:
    # GIVEN standard output into a pipe whose reader has gone before kvtrace writes (`| true`; `| head -1`
    # when head has its line): the read end is closed while the interpreter is still starting
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtrace.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(unbuffered),
    )
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    # THEN it ends quietly, exit status 0 (buffered, the interpreter wrote the rest again at exit: an
    # "Exception ignored ... BrokenPipeError" and exit status 120; `--version` a traceback)
    assert (proc.returncode, err.decode()) == (0, "")


@pytest.mark.parametrize(
    "argv",
    [
        ["report", str(SAMPLES / "static_b2"), "--no-export", "-q"],
        ["compare", str(SAMPLES / "static_b2"), str(SAMPLES / "dynamic_b2")],
    ],
    ids=["report", "compare"],
)
def test_a_reader_gone_early_costs_no_page(argv: list[str], tmp_path: Path) -> None:
    # GIVEN a page asked for with -o, and standard output into a pipe whose reader has gone (`| true`)
    page = tmp_path / "page.html"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtrace.cli", *argv, "-o", str(page)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(True),
    )
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    # THEN the page is written all the same (it was not: the text came first, its broken pipe ended the
    # command quietly, exit status 0 and no page)
    assert (proc.returncode, err.decode()) == (0, "")
    assert page.read_bytes().startswith(b"<!DOCTYPE html>\n<html")


def test_an_export_folder_that_is_a_pipe_or_a_device_says_what_it_is(tmp_path: Path) -> None:
    # GIVEN a named pipe, a link to it, and a file below it, where the export folder goes
    pipe = tmp_path / "tables"
    os.mkfifo(pipe)
    link = tmp_path / "link"
    link.symlink_to(pipe)
    refused = [
        (pipe, "a named pipe, not a folder"),
        (link, "a symbolic link to a named pipe, not a folder"),
        (pipe / "below", f"a parent of the path is a named pipe: {pipe}"),
    ]
    if Path("/dev/full").exists():
        refused.append((Path("/dev/full"), "a character device, not a folder"))
    for out, said in refused:
        # WHEN a run is exported there
        done = _kvtrace_on_a_full_disk(["export", str(SAMPLES / "static_b2"), "-q", "-o", str(out)], None)
        # THEN one line says what stands there ("it is a file", as for a regular file, it used to say),
        # status 2 as for any wrong argument (it was 1, where report and compare said 2 for such an -o)
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"kvtrace export: error: {out}: cannot write ({said})\n"
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and link.is_symlink()


def _kvtrace_with_stdout_closed(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`kvtrace argv` with its standard output closed (`>&-`: Python then has no sys.stdout at all)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    shell = ["sh", "-c", '"$0" "$@" >&-', sys.executable, "-m", "kvtrace.cli", *argv]
    return subprocess.run(
        shell, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["report", str(SAMPLES / "static_b2"), "--no-export", "-q"],
        ["report", str(SAMPLES / "static_b2"), "--no-export", "-q", "--json"],
        ["diagnose", str(SAMPLES / "static_b2")],
        ["compare", str(SAMPLES / "static_b2"), str(SAMPLES / "dynamic_b2")],
        ["plan", "--preset", "llama-3-8b"],
        ["query", str(SAMPLES / "static_b2"), "SELECT 1"],
    ],
    ids=["report", "report-json", "diagnose", "compare", "plan", "query"],
)
def test_a_closed_standard_output_is_named_in_one_line(argv: list[str]) -> None:
    # WHEN a command runs with its standard output closed
    done = _kvtrace_with_stdout_closed(argv)
    # THEN one line and exit status 1, as for a full disk (it was an "internal error", exit status 70)
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"kvtrace {argv[0]}: error: standard output: cannot write (it is closed)\n"


def test_an_export_whose_standard_output_fails_says_its_tables_are_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an export with its standard output closed, then one onto a full disk (/dev/full)
    tables = tmp_path / "tables"
    argv = ["export", str(SAMPLES / "static_b2"), "-q", "-o", str(tables)]
    closed = _kvtrace_with_stdout_closed(argv)
    # THEN the tables are written, and the one line (exit status 1) says so: "cannot write" alone (and the
    # exit status 70 before it) read as if nothing had been exported
    assert closed.returncode == 1, closed.stderr
    assert closed.stderr == (
        "kvtrace export: error: standard output: cannot write (it is closed); "
        f"the export is written all the same ({tables}, part 0)\n"
    )
    assert main(["query", str(tables), "--json", "SELECT count(*) AS runs FROM runs"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"runs": 1}]
    if Path("/dev/full").exists():
        # AND a second export of the same run adds nothing, and says that instead
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
        with open("/dev/full", "w") as full:
            again = subprocess.run(
                [sys.executable, "-m", "kvtrace.cli", *argv],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        assert again.returncode == 1, again.stderr
        assert again.stderr == (
            "kvtrace export: error: standard output: cannot write (No space left on device); "
            f"nothing new was exported to {tables}\n"
        )


def test_a_sweep_whose_standard_output_is_closed_says_it_is_written(tmp_path: Path) -> None:
    # GIVEN a one-point sweep run with its standard output closed
    out = tmp_path / "sweep"
    argv = ["sweep", "--batch", "1", "--context", "8", "--new-tokens", "2", "--cache", "dynamic"]
    done = _kvtrace_with_stdout_closed([*argv, "--device", "cpu", "--out", str(out)])
    # THEN its files are written, and the one line (exit status 1) says so
    assert done.returncode == 1, done.stderr
    files = f"{out / 'sweep.json'} and {out / 'sweep.html'}"
    said = f"standard output: cannot write (it is closed); the sweep is written all the same ({files})"
    assert done.stderr == f"kvtrace sweep: error: {said}\n"
    assert [row["batch"] for row in json.loads((out / "sweep.json").read_text())["rows"]] == [1]


def test_a_run_whose_folder_name_is_not_utf8_is_read_written_and_exported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run in a folder named with a byte that is not UTF-8 (legal on Linux; Python holds it as the
    # lone surrogate \udcff), as kvtrace's messages print it
    run = Path(os.fsdecode(os.fsencode(tmp_path) + b"/run\xff"))
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    shown = str(tmp_path / "run\\udcff")  # the name as text: what the page and the tables hold
    # WHEN its HTML page is written (it was an internal error, exit status 70, after the text report)
    page = Path(str(run) + ".html")
    assert main(["report", str(run), "--no-export", "-q", "--json", "-o", str(page)]) == 0
    # THEN the page is valid UTF-8 and names the run
    assert f"<title>kvtrace: {shown}</title>" in page.read_bytes().decode("utf-8")
    # WHEN it is queried, or exported (query was an internal error; export skipped it as "unreadable")
    capsys.readouterr()
    sql = "SELECT run_id, path, count(*) AS runs FROM runs GROUP BY ALL"
    assert main(["query", str(run), "--json", sql]) == 0
    assert json.loads(capsys.readouterr().out) == [{"run_id": shown, "path": shown, "runs": 1}]
    tables = tmp_path / "tables"
    assert main(["export", str(run), "-q", "--json", "-o", str(tables)]) == 0
    events = len((SAMPLES / "dynamic_b2" / "kv_events.jsonl").read_text().splitlines())
    assert json.loads(capsys.readouterr().out)["rows"]["kv_events"] == events
    # AND a second export knows it is already there
    assert main(["export", str(run), "-q", "--json", "-o", str(tables)]) == 0
    assert json.loads(capsys.readouterr().out)["already_exported"] == 1
    # AND the text report, on a standard output that refuses such text (a UTF-8 locale other than C.UTF-8),
    # prints the name's own bytes, as `ls` does (it was an internal error there)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8:strict"}
    argv = [sys.executable, "-m", "kvtrace.cli", "report", str(run), "--no-export", "-q"]
    done = subprocess.run(argv, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == b"kvtrace report: " + os.fsencode(run) + b" (run)"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
@pytest.mark.parametrize("appended", [False, True], ids=["new-file", "appended"])
def test_an_output_encoding_with_a_byte_order_mark_writes_it_once(
    encoding: str, appended: bool, tmp_path: Path
) -> None:
    # GIVEN an output encoding that begins with a byte order mark, and a text report of several prints,
    # written to a new file, or appended to one that holds a line already
    argv = [sys.executable, "-m", "kvtrace.cli", "report", str(SAMPLES / "dynamic_b2"), "--no-export", "-q"]
    outputs = {}
    for unbuffered in (False, True):
        out = tmp_path / f"{unbuffered}.txt"
        out.write_bytes(b"before\n" if appended else b"")
        env = _env(unbuffered) | {"PYTHONIOENCODING": encoding}
        # WHEN it is printed with standard output buffered (Python's text layer encodes) and unbuffered
        with open(out, "ab") as sink:
            done = subprocess.run(argv, stdout=sink, stderr=subprocess.PIPE, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        outputs[unbuffered] = out.read_bytes()
    # THEN both are the same bytes: the mark once at the start of a new file, none after a file's start
    # (it was written again before every print's newline, unbuffered)
    assert outputs[True] == outputs[False]
    mark = codecs.BOM_UTF8 if encoding == "utf-8-sig" else codecs.BOM_UTF16
    body = outputs[True].removeprefix(b"before\n")
    assert body.count(mark) == (0 if appended else 1)
    assert body.decode(encoding).count("\n") > 5


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
@pytest.mark.parametrize("appended", [False, True], ids=["new-file", "appended"])
def test_a_file_name_that_is_not_utf8_adds_no_byte_order_mark(
    encoding: str, appended: bool, tmp_path: Path
) -> None:
    # GIVEN a run in a folder named with a byte that is not UTF-8, and its page named after it: the text
    # report's first line names the run, its last the page it wrote, and neither is text the output
    # encoding takes as it stands (they are written as the name's bytes, or escaped where it has none)
    run = Path(os.fsdecode(os.fsencode(tmp_path) + b"/run\xff"))
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    page = Path(str(run) + ".html")
    argv = [sys.executable, "-m", "kvtrace.cli", "report", str(run), "--no-export", "-q", "-o", str(page)]
    outputs = {}
    for unbuffered in (False, True):
        out = tmp_path / f"{unbuffered}.txt"
        out.write_bytes(b"before\n" if appended else b"")
        env = _env(unbuffered) | {"PYTHONIOENCODING": encoding}
        # WHEN it is printed with standard output buffered (Python's text layer encodes) and unbuffered
        with open(out, "ab") as sink:
            done = subprocess.run(argv, stdout=sink, stderr=subprocess.PIPE, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        outputs[unbuffered] = out.read_bytes().removeprefix(b"before\n")
    # THEN both are the same bytes, with the byte order mark once at the start of a new file and none
    # after a file's start: buffered, each line naming the run wrote one more of its own (before the first
    # line, after the text layer's own; before the last, mid-output)
    assert outputs[False] == outputs[True]
    mark = codecs.BOM_UTF8 if encoding == "utf-8-sig" else codecs.BOM_UTF16
    body = outputs[False]
    assert body.count(mark) == (0 if appended else 1)
    assert body.startswith(mark) is not appended
    # AND the names read back: utf-8-sig holds the name's own bytes, utf-16 (no byte stands alone in it)
    # the name escaped, as kvtrace's messages print it
    if encoding == "utf-8-sig":
        text, name = body.decode("utf-8-sig", "surrogateescape"), str(run)
    else:
        native = "utf-16-le" if sys.byteorder == "little" else "utf-16-be"  # the mark's order, or none
        text = body.removeprefix(mark).decode(native)
        name = str(tmp_path / "run\\udcff")
    lines = text.splitlines()
    assert lines[0] == f"kvtrace report: {name} (run)"
    assert lines[-1].startswith(f"wrote {name}.html (") and len(lines) > 5


def test_every_output_path_gets_its_missing_folders_made_as_its_help_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN output paths two folders below a folder that does not exist yet, for each command that writes
    # one from a recorded run or a script (demo and sweep record a model first: their run folders are made
    # by the same record(), `kvtrace.run_folder`)
    run = SAMPLES / "dynamic_b2"
    script = tmp_path / "hello.py"
    script.write_text("print('hi')\n")
    outputs = {
        "report": (["report", str(run), "-q", "--no-export"], tmp_path / "r" / "new" / "x.html"),
        "compare": (
            ["compare", str(run), str(SAMPLES / "static_b2"), "-q"],
            tmp_path / "c" / "new" / "x.html",
        ),
        "export": (["export", str(run), "-q"], tmp_path / "e" / "new" / "tables"),
        "run": (["run", "--no-profiler", str(script)], tmp_path / "u" / "new" / "run"),
    }
    for command, (argv, out) in outputs.items():
        # WHEN each writes there
        words = [*argv[:-1], "-o", str(out), argv[-1]] if command == "run" else [*argv, "-o", str(out)]
        assert main(words) == 0, command
        capsys.readouterr()
        # THEN the folders were made and the output is in them, as its --help says
        assert out.is_file() if out.suffix == ".html" else out.is_dir(), command
        commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        help_text = " ".join(commands.choices[command].format_help().split())
        assert "missing folders on the path are made, as mkdir -p makes them" in help_text, command
