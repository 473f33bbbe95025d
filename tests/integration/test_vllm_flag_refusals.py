"""Flags typed with vLLM's commands that would do nothing, or that name no flag in their error, as a new user
walking README's vLLM section types them. Both refusals come before vLLM would start, so these run without
vLLM installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.cli import main


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--batch", "4"], "--batch does"),
        (["--gpu-memory", "8GiB"], "--gpu-memory does"),
        (["--cache", "static", "--new-tokens", "16"], "--new-tokens, --cache do"),
        (["--size", "tiny"], "--size does"),
        (["--with-stack"], "--with-stack does"),
    ],
    ids=["batch", "gpu-memory", "two", "size", "with-stack"],
)
def test_the_vllm_demo_refuses_a_transformers_demo_flag(
    tmp_path: Path, flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the vLLM demo, whose workload is fixed (8 requests x 100 new tokens in a 32-block pool)
    out = tmp_path / "demo-vllm"
    # WHEN a flag of the transformers demo is typed with it (it used to be ignored: the run recorded and
    # reported was the fixed one, not the batch or budget asked for)
    status = main(["demo", "--engine", "vllm", "--no-report", "--out", str(out), *flags])
    # THEN it is refused in one line naming the flag, exit status 2, before vLLM is even looked for
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(f"kvtrace demo: error: {named} not apply with --engine vllm: its workload is fixed")
    assert err.endswith("only --out, --overwrite, --no-profiler, --no-report and -q apply\n")
    assert err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "flag",
    ["--max-model-len", "--context", "--block-size", "--tensor-parallel-size", "--max-num-batched-tokens"],
)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_vllm_plan_size_below_one_names_its_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # WHEN a vLLM setting typed is 0 or negative (it was refused as "max model length must be at least 1":
    # --context, which gives max_model_len under --engine vllm, was not named at all)
    status = main(["plan", "--engine", "vllm", "--preset", "llama-3-8b", f"{flag}={value}"])
    # THEN the one-line error names the flag as typed
    assert status == 2
    assert capsys.readouterr().err == f"kvtrace plan: error: {flag} must be at least 1, got {value}\n"
