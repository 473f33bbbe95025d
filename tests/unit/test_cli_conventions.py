"""Conventions a user of git, pip or ruff expects of every subcommand alike: the same flag names for the same
thing, a help that shows how to call it, and commands printed for copying that a shell runs as printed."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kvtrace.cli import build_parser

_OUTPUT_NAMES = {"-o", "--out", "--output"}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


def _examples(help_text: str) -> list[str]:
    """The command lines under the help's "examples:" heading (indented lines, up to a blank one)."""
    lines = help_text.splitlines()
    start = lines.index("examples:") + 1
    found: list[str] = []
    for line in lines[start:]:
        if not line.strip():
            break
        found.append(line.strip())
    return found


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_output_path_option_is_dash_o_and_output(command: str) -> None:
    # GIVEN a command that writes a file or folder the user names (demo and sweep took only --out, run only
    # -o/--out: `kvtrace demo -o runs/x` was "unrecognized arguments", while report/compare/export take -o)
    parser = _subparsers()[command]
    outputs = [a for a in parser._actions if _OUTPUT_NAMES & set(a.option_strings)]
    # THEN its output option answers to -o and to --output, as every other command's does
    for action in outputs:
        assert {"-o", "--output"} <= set(action.option_strings), (command, action.option_strings)


@pytest.mark.parametrize(
    ("argv", "dest"),
    [
        (["demo", "-o", "/tmp/r"], "out"),
        (["demo", "--output", "/tmp/r"], "out"),
        (["sweep", "-o", "/tmp/r"], "out"),
        (["run", "--output", "/tmp/r", "script.py"], "out"),
    ],
)
def test_output_spellings_reach_the_same_option(argv: list[str], dest: str) -> None:
    args = build_parser(argv).parse_args(argv)
    assert getattr(args, dest) == "/tmp/r"


def test_diagnose_takes_gpu_memory_as_plan_demo_run_and_sweep_do() -> None:
    # GIVEN `--gpu-memory`, as plan, demo, run and sweep name a device's memory (diagnose took --budget only)
    argv = ["diagnose", "run_dir", "--gpu-memory", "24GiB"]
    # WHEN parsed
    args = build_parser(argv).parse_args(argv)
    # THEN it is diagnose's budget, and --budget still is
    assert args.budget == "24GiB"
    assert build_parser().parse_args(["diagnose", "run_dir", "--budget", "L4"]).budget == "L4"


def test_diagnose_names_the_budget_flag_typed(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtrace.cli import main

    # GIVEN a bad size under the alias; WHEN run (sample run, nothing written: diagnose only reads)
    run = Path(__file__).parents[2] / "sample_traces" / "dynamic_b2"
    status = main(["diagnose", str(run), "--gpu-memory", "lots"])
    # THEN the one line names the flag the user wrote
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("kvtrace diagnose: error: --gpu-memory") and err.count("\n") == 1


def test_top_level_help_has_examples_and_exit_statuses() -> None:
    help_text = build_parser().format_help()
    examples = _examples(help_text)
    assert len(examples) >= 3 and all(e.startswith("kvtrace ") for e in examples)
    assert "exit status:" in help_text and "130" in help_text


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_help_shows_examples_that_parse(command: str) -> None:
    # GIVEN a command's --help (only query's showed how to call it)
    help_text = _subparsers()[command].format_help()
    examples = _examples(help_text)
    assert examples, f"kvtrace {command} --help has no examples"
    for example in examples:
        # THEN each example is this command, and its flags are the command's own (a renamed flag fails here)
        words = shlex.split(example.split(" | ")[0].split(" && ")[0])
        assert words[:2] == ["kvtrace", command], example
        args, unknown = build_parser(words[1:]).parse_known_args(words[1:])
        assert unknown == [] and args.command == command, example


def test_run_says_next_commands_a_shell_can_paste(tmp_path: Path) -> None:
    # GIVEN a run folder whose name holds a space
    script = tmp_path / "hello.py"
    script.write_text("print('hi')\n")
    out = tmp_path / "my runs" / "r 1"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    # WHEN it is recorded
    done = subprocess.run(
        [sys.executable, "-m", "kvtrace", "run", "--no-profiler", "-o", str(out), str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    # THEN the next commands it names quote the path, so they run as pasted
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hi\n"
    said = done.stderr.strip().splitlines()[-1]
    assert said.endswith(
        f"next: kvtrace report {shlex.quote(str(out))}, kvtrace diagnose {shlex.quote(str(out))}"
    )
    pasted = shlex.split(said.rsplit("next: ", 1)[1].split(", ")[0])
    assert pasted == ["kvtrace", "report", str(out)]


def _shown(action: argparse.Action) -> str:
    """How a flag's value is written in the usage line: its choices, else its metavar."""
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return str(action.metavar or action.dest.upper())


@pytest.mark.parametrize("flag", ["--gpu-memory", "-o"])
def test_a_flag_shared_by_commands_names_its_value_alike(flag: str) -> None:
    # GIVEN a flag several commands take (plan and run wrote --gpu-memory GPU_MEMORY, demo, diagnose and
    # sweep --gpu-memory SIZE; -o was OUT, OUTPUT or DIR for the same kind of path)
    shown: dict[str, str] = {}
    for command, parser in _subparsers().items():
        for action in parser._actions:
            if flag in action.option_strings:
                shown[command] = _shown(action)
    # THEN a size is SIZE everywhere, and -o says whether it is a folder (DIR) or a page (FILE)
    if flag == "--gpu-memory":
        assert set(shown.values()) == {"SIZE"}, shown
    else:
        assert shown == {
            "demo": "DIR",
            "run": "DIR",
            "sweep": "DIR",
            "export": "DIR",
            "report": "FILE",
            "compare": "FILE",
        }


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_positionals_are_named_in_capitals(command: str) -> None:
    # report and diagnose wrote `path` where their help, and every other command, says PATH, RUN, DIR
    usage = _subparsers()[command].format_usage()
    positionals = [a for a in _subparsers()[command]._actions if not a.option_strings and a.nargs != "..."]
    for action in positionals:
        shown = str(action.metavar or action.dest)  # argparse writes a positional's dest as it is
        assert shown.isupper() and shown in usage, (command, shown, usage)


@pytest.mark.parametrize(
    ("argv", "dtype"),
    [
        (["demo", "--dtype", "bf16"], "bfloat16"),
        (["sweep", "-o", "s", "--dtype", "fp16"], "float16"),
        (["demo", "--dtype", "float32"], "float32"),
        (["plan", "--dtype", "bfloat16"], "bf16"),
        (["plan", "--dtype", "fp8"], "fp8"),
    ],
)
def test_dtype_takes_both_spellings_on_every_command(argv: list[str], dtype: str) -> None:
    # GIVEN plan's words (bf16) on demo and sweep, torch's (bfloat16) on plan: each refused the other's
    args = build_parser(argv).parse_args(argv)
    assert args.dtype == dtype


def test_plan_kv_dtype_takes_torch_words(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtrace.cli import main

    # WHEN a plan is asked in torch's dtype words, THEN it is the plan of plan's own words, figure for figure
    assert (
        main(["plan", "--preset", "llama-3-8b", "--dtype", "bfloat16", "--kv-dtype", "float16", "--json"])
        == 0
    )
    torch_words = capsys.readouterr().out
    assert main(["plan", "--preset", "llama-3-8b", "--dtype", "bf16", "--kv-dtype", "fp16", "--json"]) == 0
    assert capsys.readouterr().out == torch_words


@pytest.mark.parametrize("command", ["report", "diagnose", "compare", "export", "sweep", "demo"])
def test_every_command_that_draws_a_progress_bar_takes_quiet(command: str) -> None:
    # demo ends with the report of its run, which draws a bar on a terminal: it had no -q to turn it off
    parser = _subparsers()[command]
    quiet = [a for a in parser._actions if {"-q", "--quiet"} <= set(a.option_strings)]
    assert len(quiet) == 1 and quiet[0].nargs == 0


@pytest.mark.parametrize("command", ["report", "compare", "export"])
def test_dash_output_is_refused_not_a_file_named_dash(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.cli import main

    # GIVEN `-o -`, standard output to users of other tools (report wrote its page to a file named "-")
    run = Path(__file__).parents[2] / "sample_traces" / "dynamic_b2"
    monkeypatch.chdir(tmp_path)
    inputs = [str(run), str(run)] if command == "compare" else [str(run)]
    extra = ["--no-export"] if command == "report" else []
    # WHEN run
    status = main([command, *inputs, *extra, "-o", "-"])
    # THEN one line, status 2, nothing on stdout and nothing written
    said = capsys.readouterr()
    assert status == 2
    assert said.out == ""
    assert said.err == (
        f"kvtrace {command}: error: -o -: kvtrace writes this output to a path, not to standard output; "
        "name a file or folder (./- for one named '-')\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["demo", "--size", "tiny"], ["sweep", "--size", "tiny"], ["run", "x.py"]])
def test_dash_output_folder_is_refused_before_any_work(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.cli import main

    monkeypatch.chdir(tmp_path)
    status = main([argv[0], "-o", "-", *argv[1:]])
    assert status == 2
    assert capsys.readouterr().err.startswith(f"kvtrace {argv[0]}: error: -o -: ")
    assert list(tmp_path.iterdir()) == []


def _closed_stderr(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI with standard error closed (`2>&-`, as cron jobs and daemons run), stdout captured."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    line = " ".join(shlex.quote(word) for word in [sys.executable, "-m", "kvtrace", *argv])
    return subprocess.run(
        ["sh", "-c", f"{line} 2>&-"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_a_closed_stderr_keeps_json_on_stdout_whole(tmp_path: Path) -> None:
    import json

    run = Path(__file__).parents[2] / "sample_traces" / "dynamic_b2"
    # WHEN report runs with no standard error (it asked it isatty() for the progress bar: status 70, and the
    # "internal error" line went to stdout, as print(file=None) writes there)
    done = _closed_stderr("report", str(run), "--no-export", "--json", cwd=tmp_path)
    # THEN the JSON alone, status 0
    assert done.returncode == 0
    assert json.loads(done.stdout)["source"]["kind"] == "run"


def test_a_closed_stderr_keeps_errors_off_stdout(tmp_path: Path) -> None:
    # WHEN an input is missing and standard error is closed
    done = _closed_stderr("report", "missing_run", "--json", cwd=tmp_path)
    # THEN status 2 and nothing on stdout (the one line went there: a --json reader read an error as output)
    assert done.returncode == 2
    assert done.stdout == ""


def _stderr_to_full_disk(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI with standard error on a full disk (/dev/full: every write fails with ENOSPC)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    with open("/dev/full", "w") as full:
        return subprocess.run(
            [sys.executable, "-m", "kvtrace", *argv],
            stdout=subprocess.PIPE,
            stderr=full,
            text=True,
            env=env,
            cwd=cwd,
            timeout=300,
        )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_warning_that_cannot_be_written_costs_not_the_json(tmp_path: Path) -> None:
    import json
    import shutil

    # GIVEN a run whose tb_scalars/ is a link (report warns it leaves it alone), and stderr on a full disk
    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parents[2] / "sample_traces" / "dynamic_b2", run)
    shutil.rmtree(run / "tb_scalars", ignore_errors=True)
    (run / "tb_scalars").symlink_to(tmp_path / "elsewhere")
    # WHEN reported as JSON (the failed warning raised: status 1 and no JSON at all)
    done = _stderr_to_full_disk("report", str(run), "--json", cwd=tmp_path)
    # THEN the JSON whole, status 0
    assert done.returncode == 0
    assert json.loads(done.stdout)["source"]["kind"] == "run"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_error_that_cannot_be_written_keeps_its_status(tmp_path: Path) -> None:
    # a missing input is status 2; its line failing to be written made it 1, as if an output had failed
    done = _stderr_to_full_disk("report", "missing_run", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""


# A real SIGINT, raised as the parser imports the report command's module (its first import that the CLI's
# own module did not make): where a Ctrl-C typed as the command starts falls, before any command runs
_INTERRUPTED_WHILE_PARSING = """
import signal, sys
def on_import(event, args):
    if event == "import" and args[0] == "kvtrace.commands.progress":
        signal.raise_signal(signal.SIGINT)
sys.addaudithook(on_import)
from kvtrace.cli import main
sys.exit(main(["report", "missing_run"]))
"""


def test_ctrl_c_while_the_parser_is_built_is_one_line_and_130(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_WHILE_PARSING],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    # It printed a KeyboardInterrupt traceback through the imports, and the process died of SIGINT
    assert (done.returncode, done.stderr, done.stdout) == (130, "kvtrace report: interrupted\n", "")


# A Ctrl-C as numpy's C extension imports `datetime` (0.1 s into a report of a run): numpy turns what that
# import raised into an ImportError of 20 lines of advice ("Importing the numpy C-extensions failed")
_INTERRUPTED_WHILE_NUMPY_LOADS = """
import signal, sys
def on_import(event, args):
    if event == "import" and args[0] == "datetime" and "numpy" in sys.modules:
        signal.raise_signal(signal.SIGINT)
sys.addaudithook(on_import)
from kvtrace.cli import main
sys.exit(main(["report", sys.argv[1], "--no-export", "-q"]))
"""


def test_ctrl_c_that_a_library_turns_into_its_own_error_is_one_line_and_130(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    run = Path(__file__).parents[2] / "sample_traces" / "dynamic_b2"
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_WHILE_NUMPY_LOADS, str(run)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    # It was "internal error on ...: ImportError: ..." (a bug to report), exit 70
    assert (done.returncode, done.stderr, done.stdout) == (130, "kvtrace report: interrupted\n", "")


def test_a_command_named_in_an_error_quotes_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from kvtrace.cli import main

    # GIVEN a folder whose name holds a space, with a run one level below (a sweep's layout)
    folder = tmp_path / "my sweep"
    shutil.copytree(Path(__file__).parents[2] / "sample_traces" / "dynamic_b2", folder / "runs" / "b1")
    monkeypatch.chdir(tmp_path)
    # WHEN it is reported
    assert main(["report", "my sweep", "--no-export"]) == 2
    # THEN the export command the error suggests names the folder as a shell reads it
    err = capsys.readouterr().err
    assert "(`kvtrace export 'my sweep' -o DIR` reads every input in it)" in err, err


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_answers_to_dash_v_as_pip_and_ruff_do(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    from kvtrace import __version__
    from kvtrace.cli import main

    with pytest.raises(SystemExit) as exited:
        main([flag])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"kvtrace {__version__}\n"


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_help_says_its_exit_status(command: str) -> None:
    # demo's alone did not: a script that runs it could not tell a bad flag from a failed write
    assert "Exit status:" in _subparsers()[command].format_help()


def test_main_called_off_the_main_thread_runs_and_leaves_sigint_alone(tmp_path: Path) -> None:
    import signal
    import threading

    from kvtrace.cli import main

    # GIVEN a program that calls kvtrace's main() from a worker thread (Python runs signal handlers, and
    # lets them be set, on the main thread only)
    said: list[object] = []

    def call() -> None:
        try:
            said.append(main(["report", str(tmp_path / "no-such-run"), "--no-export"]))
        except BaseException as exc:  # the test reports whatever escaped
            said.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    worker.join(timeout=120)
    # THEN the command gives its own answer (a missing input: 2), not "signal only works in main thread"
    assert said == [2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


_GPU_MEMORY_COMMANDS = [
    (["demo"], "gpu_memory"),
    (["run", "script.py"], "gpu_memory"),
    (["plan", "--preset", "llama-3-8b"], "gpu_memory"),
    (["diagnose", "run_dir"], "budget"),
    (["sweep", "-o", "/tmp/s"], "budget"),
]


@pytest.mark.parametrize(("argv", "dest"), _GPU_MEMORY_COMMANDS, ids=[a[0] for a, _ in _GPU_MEMORY_COMMANDS])
def test_budget_is_gpu_memory_on_every_command_that_takes_a_device_memory(argv: list[str], dest: str) -> None:
    # GIVEN `--budget`, diagnose's and sweep's name for a device's memory: `kvtrace plan --budget 24GiB` and
    # demo's and run's were "unrecognized arguments", though each command's --gpu-memory means the same
    for flag in ("--gpu-memory", "--budget"):
        # WHEN either name is typed, in a flag's place (before a script's name, which takes the rest)
        words = [*argv[:1], flag, "L4", *argv[1:]]
        args, unknown = build_parser(words).parse_known_args(words)
        # THEN both reach the one option
        assert unknown == [] and getattr(args, dest) == "L4", (words, unknown)
    # AND the help names it once, as --gpu-memory
    help_text = _subparsers()[argv[0]].format_help()
    assert "--gpu-memory SIZE" in help_text and "--budget SIZE" not in help_text


def test_plan_by_either_name_is_the_same_plan_and_a_bad_size_names_the_flag_typed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from kvtrace.cli import main

    plans = []
    for flag in ("--gpu-memory", "--budget"):
        assert main(["plan", "--preset", "llama-3-8b", flag, "24GiB", "--json"]) in (0, 1)
        plans.append(json.loads(capsys.readouterr().out))
    assert plans[0] == plans[1] and plans[0]["request"]["gpu_memory_bytes"] == 24 * 2**30
    assert main(["plan", "--preset", "llama-3-8b", "--budget", "24"]) == 2
    assert capsys.readouterr().err.startswith("kvtrace plan: error: --budget 24")


@pytest.mark.parametrize("command", ["compare", "demo", "export", "report", "run", "sweep"])
def test_every_output_option_says_it_makes_missing_folders(command: str) -> None:
    # GIVEN a command that writes a file or folder the user names: `kvtrace report RUN -o new/dir/x.html`
    # made new/dir unsaid, where compilers and curl refuse a path whose folder is missing
    parser = _subparsers()[command]
    (output,) = [a for a in parser._actions if _OUTPUT_NAMES & set(a.option_strings)]
    # THEN its help says so, in the same words on every command
    assert "missing folders on the path are made, as mkdir -p makes them" in (output.help or ""), output.help
