"""Models whose last layers reuse an earlier layer's K and V (Gemma 3n's and Gemma 4's
`num_kv_shared_layers`): transformers' cache gives those layers a `DummyLayer` that holds nothing, so a
token costs only the layers that cache their own. The figures are that arithmetic:
caching layers x 2 (K, V) x KV heads x head_dim x 4 bytes (fp32) x tokens x rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import kvtrace
from kvtrace.cli import main

LAYERS, SHARED, WINDOW = 6, 2, 8  # layers 4 and 5 reuse layers 2 (sliding) and 3 (full)
KV_HEADS, HEAD_DIM, ROWS, PROMPT, NEW = 2, 16, 2, 11, 6
U = ROWS * KV_HEADS * HEAD_DIM * 4  # one layer's K (or V) of one token of both rows, fp32: 256 B
_TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=256, vocab_size_per_layer_input=256,
    hidden_size_per_layer_input=8, sliding_window=WINDOW, num_kv_shared_layers=SHARED,
    max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
)  # fmt: skip


def _config(family: str) -> Any:
    if family == "gemma3n":  # its text model alone: the multimodal wrapper's towers are not needed
        return transformers.Gemma3nTextConfig(**_TINY, laurel_rank=4)
    return transformers.Gemma4TextConfig(**_TINY, global_head_dim=HEAD_DIM)  # full layers as wide


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 0, capsys.readouterr().err
    return dict(json.loads(capsys.readouterr().out))


@pytest.mark.parametrize("profiler", [False, True], ids=["kv-log", "profiled"])
@pytest.mark.parametrize("family", ["gemma3n", "gemma4"])
def test_shared_kv_layers_hold_no_kv_in_the_recording_report_and_plan(
    family: str, profiler: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tiny model of 6 layers alternating sliding (window 8) and full, whose last 2 reuse the K and
    # V of layers 2 and 3, generating 6 tokens after an 11-token prompt on 2 rows
    config = _config(family)
    config.save_pretrained(tmp_path / "config")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 200, (ROWS, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=profiler):
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
            do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        )  # fmt: skip
    # THEN the cache holds 4 layers' K and V: the full layers 1 and 3 all 16 tokens written, the sliding
    # layers 0 and 2 their last 7 in storages of 8 positions; the shared layers 4 and 5 hold nothing
    written = PROMPT + NEW - 1
    final = 2 * (2 * written * U) + 2 * (2 * WINDOW * U)  # 24,576 B
    layers = out.past_key_values.layers
    assert [layer.keys is None for layer in layers] == [False] * (LAYERS - SHARED) + [True] * SHARED
    own = layers[: LAYERS - SHARED]
    held = sum(t.untyped_storage().nbytes() for layer in own for t in (layer.keys, layer.values))
    assert held == final
    # AND the manifest counts the 4 layers that cache KV, 2 of them sliding
    model_geometry = json.loads((tmp_path / "run" / "manifest.json").read_text())["model"]
    assert (model_geometry["kv_layers"], model_geometry["sliding_layers"]) == (4, 2)
    # AND the report: a token of a row costs 4 layers x K and V x 2 heads x 16 x 4 B
    kv = _json(["report", str(tmp_path / "run"), "--json", "--no-export", "-q"], capsys)["kv"]
    assert kv["final_bytes"] == final
    assert kv["bytes_per_token_expected"] == (LAYERS - SHARED) * 2 * KV_HEADS * HEAD_DIM * 4  # 1,024 B
    assert [(row["layer"], row["tokens"]) for row in kv["per_layer"]] == [(0, 7), (1, 16), (2, 7), (3, 16)]
    # its peak: the last step's layer 3 makes its 16-token K and V while its 15-token V is still live
    assert kv["peak_bytes"] == final + (written - 1) * U  # 28,416 B
    # AND diagnose prices a shorter context by the 2 full layers alone (not 6, not 4)
    diagnosis = _json(["diagnose", str(tmp_path / "run"), "--json"], capsys)
    context = next(r for r in diagnosis["remedies"] if r["kind"] == "context")
    held_tokens = diagnosis["tokens_held"]
    caching = 4 if held_tokens == PROMPT else 2  # at prefill every caching layer holds the whole prompt
    assert context["saved_bytes"] == (held_tokens - context["setting"]) * caching * 2 * U
    # AND the plan of that run is the recording: per token, final and peak
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--batch", str(ROWS)]
    planned = _json([*argv, "--prompt", str(PROMPT), "--context", str(PROMPT + NEW), "--json"], capsys)
    assert planned["kv_bytes_per_token"] == kv["bytes_per_token_expected"]
    assert (planned["kv_bytes"], planned["kv_peak_bytes"]) == (kv["final_bytes"], kv["peak_bytes"])


def test_plan_takes_gemma3ns_default_of_15_shared_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Gemma 3n config.json of 20 layers that leaves out `num_kv_shared_layers` and `layer_types`:
    # Gemma3nTextConfig then shares the last 15 and makes every 5th layer full
    config = transformers.Gemma3nTextConfig(**{**_TINY, "num_hidden_layers": 20, "layer_types": None})
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("num_kv_shared_layers", "layer_types"):
        del raw[key]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cache = transformers.DynamicCache(config=transformers.Gemma3nTextConfig(**raw))
    caching = sum(not isinstance(layer, transformers.cache_utils.DummyLayer) for layer in cache.layers)
    assert caching == 20 - 15
    # WHEN it is planned
    argv = ["plan", "--config", str(tmp_path), "--dtype", "fp32", "--context", "100", "--json"]
    planned = _json(argv, capsys)
    # THEN a token costs the 5 layers that cache their own K and V
    assert planned["kv_bytes_per_token"] == caching * 2 * KV_HEADS * HEAD_DIM * 4
