"""What each command's --help promises: every option that has a default says it, and a positional says what
the command really accepts."""

from __future__ import annotations

import argparse
import re

import pytest

from kvtrace.cli import build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_with_a_default_names_it(command: str) -> None:
    # GIVEN a command's options that take a value and have one when not given (flags are off by default)
    parser = _subparsers()[command]
    with_default = [
        action
        for action in parser._actions
        if action.option_strings
        and action.default not in (None, False, argparse.SUPPRESS)
        and not isinstance(action, argparse._HelpAction)
    ]
    # THEN each help says "default" (demo's --dtype, --cache, --device and sweep's --cache, --dtype, --device
    # did not: demo runs on cpu, sweep on cuda when there is one, and neither said so)
    unsaid = [action.option_strings[0] for action in with_default if "default" not in (action.help or "")]
    assert unsaid == []


@pytest.mark.parametrize(
    ("command", "option", "default"),
    [
        ("demo", "--dtype", "float32"),
        ("demo", "--cache", "dynamic"),
        ("demo", "--device", "cpu"),
        ("sweep", "--dtype", "float32"),
        ("sweep", "--device", "auto"),
        ("sweep", "--cache", "dynamic,static"),
    ],
)
def test_the_default_said_is_the_default_used(command: str, option: str, default: str) -> None:
    parser = _subparsers()[command]
    action = next(a for a in parser._actions if option in a.option_strings)
    assert action.default == default
    assert re.search(rf"\(default:? {re.escape(default)}[,)]", action.help or ""), action.help


def test_compare_says_it_takes_any_input_report_reads() -> None:
    # compare reads traces and snapshots too (its description says so); its RUN said "run directories"
    parser = _subparsers()["compare"]
    runs = next(a for a in parser._actions if a.dest == "runs")
    assert runs.help is not None and "traces" in runs.help and "snapshots" in runs.help


def test_run_without_a_script_names_only_the_script_as_missing(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN `kvtrace run` with no script: argparse made the script's own arguments (a REMAINDER) required
    # too, and said "the following arguments are required: TARGET, args", though a script takes none
    from kvtrace.cli import main

    # WHEN it is run
    with pytest.raises(SystemExit) as exited:
        main(["run"])

    # THEN the one line names the script alone, status 2
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "kvtrace run: error: the following arguments are required: TARGET (see kvtrace run --help)\n"
    )


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["compare", "one_run"], "give at least two runs to compare"),
        (["plan"], "give a model: --preset NAME, --config PATH or --from-run RUN"),
        (["plan", "--engine", "vllm"], "give a model: --preset NAME, --config PATH or --from-run RUN"),
    ],
    ids=["compare-one-run", "plan-no-model", "plan-vllm-no-model"],
)
def test_a_command_line_short_of_an_argument_points_to_help_as_argparse_does(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    # GIVEN a command line short of what the command needs, found after argparse (compare with one run):
    # argparse's own "the following arguments are required" ends "(see kvtrace CMD --help)"; these lacked it
    from kvtrace.cli import main

    # WHEN it is run, THEN it is one line in argparse's form, status 2
    assert main(argv) == 2
    assert capsys.readouterr().err == f"kvtrace {argv[0]}: error: {said} (see kvtrace {argv[0]} --help)\n"
