"""`kvtrace diagnose`'s remedies for DeepSeek-V4 (analyzers.planning.diagnose_compressed_remedies) on its
published shape: a shorter context found against `kvtrace plan`'s peaks, offloading of the window alone,
each figure from the layer arithmetic or the plan's JSON. A tiny recorded run goes through the whole
diagnosis in tests/integration/test_aux_cache_state.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from analyzers.planning.diagnose_compressed_remedies import compressed_remedies, compressed_run
from kvtrace.cli import main
from kvtrace.format import MODEL_CONFIG
from tests.unit.test_plan_dsv4 import BF16, HEAD, V4_CONFIG, WINDOW

LAYERS, PROMPT = 43, 1000


def _plan_peak(tmp_path: Path, capsys: pytest.CaptureFixture[str], context: int) -> int:
    """`kvtrace plan`'s KV peak of V4 at batch 1 and `context`, the prompt PROMPT."""
    args = ["--batch", "1", "--context", str(context), "--prompt", str(PROMPT), "--dtype", "bf16"]
    args += ["--gpu-memory", "4TiB"]  # the weights fit: plan answers 0
    assert main(["plan", "--config", str(tmp_path / MODEL_CONFIG), "--json", *args]) == 0
    return int(json.loads(capsys.readouterr().out)["kv_peak_bytes"])


def test_dsv4_context_is_the_longest_the_plan_fits_and_offloading_moves_the_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a V4 run's model_config.json, a moment 100,000 tokens into a 1,000-token prompt's decode (its
    # compressed entries now outgrow the prompt the first decode step held), holding the plan's peak there,
    # and a 1 MiB shortfall
    config: dict[str, Any] = dict(V4_CONFIG)
    (tmp_path / MODEL_CONFIG).write_text(json.dumps(config))
    run = compressed_run(tmp_path, "bfloat16")
    assert run is not None
    written = PROMPT + 100_000
    kv, need = _plan_peak(tmp_path, capsys, written + 1), 1 << 20
    # WHEN its remedies are priced on a GPU
    context, offloading = compressed_remedies(run, kv, 1, PROMPT, written, need, LAYERS, True)
    # THEN the context is the longest whose planned peak leaves room for the shortfall, as plan says
    shorter = context.setting
    assert shorter is not None and PROMPT < shorter < written + 1
    assert kv - _plan_peak(tmp_path, capsys, shorter) >= need > kv - _plan_peak(tmp_path, capsys, shorter + 1)
    assert context.saved_bytes == kv - _plan_peak(tmp_path, capsys, shorter) and context.fits
    # AND offloading moves each layer's window (one K = V head of 512, 128 tokens, bf16) but two layers':
    # the compressed entries, indexer keys and compressor state stay
    window = LAYERS * WINDOW * HEAD * BF16  # 5,636,096 B
    assert offloading.kind == "offloading"
    assert offloading.saved_bytes == window * (LAYERS - 2) // LAYERS == 5_373_952


def test_a_config_of_another_model_is_not_dsv4(tmp_path: Path) -> None:
    # GIVEN a run's model_config.json of a Llama WHEN read THEN the usual remedies stand (None)
    llama = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    (tmp_path / MODEL_CONFIG).write_text(json.dumps(llama))
    assert compressed_run(tmp_path, "bfloat16") is None
    assert compressed_run(tmp_path / "missing", "bfloat16") is None
