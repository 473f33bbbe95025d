"""A loop of one's own over `model(...)` with grad enabled: autograd keeps every step's activations and the
KV cache's replaced copies for a backward that never comes, so memory grows far beyond the KV's own.
The report says why its KV measures more than the arithmetic, and `diagnose` prices running the forwards
without grad, checked against the same loop recorded under `torch.no_grad()`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import ModelSize, build_model
from tests.tiny import HEAD_DIM, HEADS, HIDDEN

LAYERS, KV_HEADS, PROMPT, DECODES, BATCH = 2, 2, 16, 24, 4
SIZE = ModelSize(
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_layers=LAYERS,
    num_heads=HEADS,
    num_kv_heads=KV_HEADS,
    vocab_size=1000,
)
TOKEN_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # float32: 512 B of KV a token and row


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """The same loop, a prefill and DECODES greedy steps over a DynamicCache, with grad enabled and not."""
    import torch
    from transformers import DynamicCache

    import kvtrace

    model = build_model(SIZE, dtype=torch.float32).eval()
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("grad")
    runs = {}
    for grad in (True, False):
        runs[grad] = folder / str(grad)
        with kvtrace.record(runs[grad], model=model), torch.set_grad_enabled(grad):
            cache = DynamicCache(config=model.config)
            out = model(ids, cache=cache, use_cache=True)
            for _ in range(DECODES):
                out = model(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
        del out, cache  # held to the block's end (its final figures), freed before the next run begins
    return runs


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def _grad_samples(run: Path) -> list[int]:
    lines = [json.loads(line) for line in (run / "memory_samples.jsonl").read_text().splitlines()]
    return [s["step"] for s in lines if s.get("grad") is True]


def test_the_steps_run_with_grad_are_marked_and_the_report_says_why_the_kv_measures_more(
    runs: dict[bool, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the loop with grad enabled: each step's sample says so; under no_grad none does
    assert _grad_samples(runs[True]) == list(range(1, DECODES + 2))
    assert _grad_samples(runs[False]) == []
    # THEN the report's KV measures more than the arithmetic (the graph keeps replaced copies), and a note
    # says why; the run under no_grad measures the arithmetic and has no such note
    report = _json(capsys, "report", str(runs[True]), "--json", "--no-export", "-q")
    kv = report["kv"]
    assert kv["bytes_per_token_expected"] == TOKEN_BYTES and kv["bytes_per_token_measured"] > TOKEN_BYTES
    assert (
        f"{DECODES + 1} step(s) ran their forward with grad enabled (no torch.no_grad() or "
        "torch.inference_mode()): autograd keeps what each made, the KV cache's replaced copies included, "
        f"for a backward, so the KV measured is {kv['bytes_per_token_measured'] / TOKEN_BYTES:.1f}x the "
        f"arithmetic a token ({kv['bytes_per_token_measured']:,.1f} B against {TOKEN_BYTES:,} B): `kvtrace "
        "diagnose` prices running them without grad"
    ) in report["notes"]
    plain = _json(capsys, "report", str(runs[False]), "--json", "--no-export", "-q")
    assert plain["kv"]["bytes_per_token_measured"] == TOKEN_BYTES
    assert not [n for n in plain["notes"] if "grad enabled" in n]


def test_diagnose_prices_running_without_grad_as_the_no_grad_recording_holds(
    runs: dict[bool, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    diagnosis = _json(capsys, "diagnose", str(runs[True]), "--json")
    (remedy,) = [r for r in diagnosis["remedies"] if r["kind"] == "no_grad"]
    # THEN it counts the KV live beyond the cache's own tokens x rows x 512 B, and the activations the graph
    # keeps of the steps before the last, and ranks first: it frees the most
    step, tokens, rows = diagnosis["step"], diagnosis["tokens_held"], diagnosis["batch"]
    assert (step, tokens, rows) == (DECODES + 1, PROMPT + DECODES, BATCH)
    copies = diagnosis["kv_bytes"] - tokens * rows * TOKEN_BYTES
    assert copies > 0
    assert f"{human_bytes(copies)} of KV beyond what the cache stores (replaced copies)" in remedy["sentence"]
    assert (
        f"{DECODES + 1} of the {DECODES + 1} steps up to this moment ran with grad enabled"
        in (remedy["sentence"])
    )
    assert diagnosis["remedies"][0]["kind"] == "no_grad"
    # AND the loop under no_grad ends holding less by at least that, and by no more than it leaves out: the
    # last step's and the moment's own (a decode step's share each), and the first forward's, the prefill,
    # whose activations are its PROMPT tokens' (PROMPT decode steps' at most)
    ends = [
        _json(capsys, "report", str(runs[grad]), "--json", "--no-export", "-q")["final_allocated_bytes"]
        for grad in (True, False)
    ]
    saved, dropped = remedy["saved_bytes"], ends[0] - ends[1]
    assert saved <= dropped < saved + (PROMPT + 2) * saved // (step - 3)
    # AND the run under no_grad gets no such remedy
    plain = _json(capsys, "diagnose", str(runs[False]), "--json")
    assert not [r for r in plain["remedies"] if r["kind"] == "no_grad"]


@pytest.mark.parametrize("how", ["inference_mode_forward", "frozen_parameters"])
def test_a_forward_autograd_does_not_record_is_not_marked_grad_enabled(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the loop with grad enabled around it, but a forward autograd records nothing of: one that runs
    # under its own `@torch.inference_mode()` (as Meta's reference `Transformer.forward` is decorated), or a
    # model whose parameters require no grad
    import torch
    from transformers import DynamicCache

    import kvtrace

    model = build_model(SIZE, dtype=torch.float32).eval()
    if how == "inference_mode_forward":
        model.forward = torch.inference_mode()(model.forward)  # type: ignore[method-assign]
    else:
        model.requires_grad_(False)
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    run = tmp_path / how
    with kvtrace.record(run, model=model), torch.enable_grad():
        assert torch.is_grad_enabled()
        cache = DynamicCache(config=model.config)
        out = model(ids, cache=cache, use_cache=True)
        for _ in range(DECODES):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
        assert not out.logits.requires_grad
    del out, cache
    # THEN no step is marked as run with grad, and the report says nothing of it: its KV is the arithmetic
    assert _grad_samples(run) == []
    report = _json(capsys, "report", str(run), "--json", "--no-export", "-q")
    assert not any("grad enabled" in note for note in report["notes"])
    assert report["kv"]["bytes_per_token_measured"] == TOKEN_BYTES
