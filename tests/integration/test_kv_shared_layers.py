"""Models whose last layers reuse an earlier layer's K and V (Gemma 3n's and Gemma 4's
`num_kv_shared_layers`): transformers' cache gives those layers a `DummyLayer` that holds nothing, so a
token costs only the layers that cache their own. The figures are that arithmetic:
caching layers x 2 (K, V) x KV heads x head_dim x 4 bytes (fp32) x tokens x rows.

Gemma 4's full layers are wider than its sliding ones (`global_head_dim`, and `num_global_key_value_heads`
under `attention_k_eq_v`): each kind counts at its own width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import kvtrace
from analyzers.units import human_bytes
from kvtrace.cli import main
from tests.hf_versions import HAS_DUMMY_LAYER, needs_dummy_layer

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
    if HAS_DUMMY_LAYER:
        assert [layer.keys is None for layer in layers] == [False] * (LAYERS - SHARED) + [True] * SHARED
    else:  # transformers 5.17 has no DummyLayer: its cache lists the 4 layers that cache their own alone
        assert [layer.keys is None for layer in layers] == [False] * (LAYERS - SHARED)
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
    _priced_per_token(diagnosis, context, caching * 2 * U)
    # AND the plan of that run is the recording: per token, final and peak
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--batch", str(ROWS)]
    planned = _json([*argv, "--prompt", str(PROMPT), "--context", str(PROMPT + NEW), "--json"], capsys)
    assert planned["kv_bytes_per_token"] == kv["bytes_per_token_expected"]
    assert (planned["kv_bytes"], planned["kv_peak_bytes"]) == (kv["final_bytes"], kv["peak_bytes"])


@needs_dummy_layer
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


@pytest.mark.parametrize(
    ("k_eq_v", "global_heads"), [(False, KV_HEADS), (True, 1)], ids=["own-v", "k-eq-v-1-head"]
)
@pytest.mark.parametrize("published", [False, True], ids=["saved-config", "published-config"])
def test_gemma4_full_layers_count_at_their_own_width(
    k_eq_v: bool, global_heads: int, published: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tiny Gemma 4 of 6 layers alternating sliding (window 8, 2 KV heads x 16) and full layers
    # 32 wide (as Gemma 4's 256 and 512), with 2 KV heads, or 1 whose K is also the V (attention_k_eq_v),
    # generating 6 tokens after an 11-token prompt on 2 rows; its config.json as transformers saves it
    # (per_layer_config) or as Google publishes it (global_head_dim, num_global_key_value_heads)
    wide = 2 * HEAD_DIM
    tiny = {**_TINY, "num_kv_shared_layers": 0}
    config = transformers.Gemma4TextConfig(
        **tiny, global_head_dim=wide, attention_k_eq_v=k_eq_v, num_global_key_value_heads=global_heads
    )
    config.save_pretrained(tmp_path / "config")
    if published:
        raw = json.loads((tmp_path / "config" / "config.json").read_text())
        del raw["per_layer_config"]
        raw.update(global_head_dim=wide, num_global_key_value_heads=global_heads)
        (tmp_path / "config" / "config.json").write_text(json.dumps(raw))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 200, (ROWS, PROMPT), generator=torch.Generator().manual_seed(0))
    # WHEN it is recorded (its config's head_dim is per layer: reading it raises)
    with pytest.raises(transformers.integrations.heterogeneity.AmbiguousGlobalPerLayerAttributeError):
        _ = config.head_dim
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model):
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
            do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        )  # fmt: skip
    # THEN the cache's full layers hold K and V of global_heads x 32, its sliding ones of 2 x 16
    sliding_side = ROWS * KV_HEADS * HEAD_DIM * 4  # one sliding layer's K (or V) of a token, both rows: 256 B
    full_side = ROWS * global_heads * wide * 4  # a full layer's: 512 B, or 256 B with one KV head
    layers = out.past_key_values.layers
    assert [tuple(layer.keys.shape) for layer in layers[:2]] == [
        (ROWS, KV_HEADS, WINDOW - 1, HEAD_DIM), (ROWS, global_heads, PROMPT + NEW - 1, wide)
    ]  # fmt: skip
    assert all(layer.values.shape == layer.keys.shape for layer in layers)  # K = V still makes two tensors
    written = PROMPT + NEW - 1
    final = 3 * (2 * written * full_side) + 3 * (2 * WINDOW * sliding_side)  # 61,440 B or 36,864 B
    held = sum(t.untyped_storage().nbytes() for layer in layers for t in (layer.keys, layer.values))
    assert held == final
    # AND the manifest gives both widths
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    geometry = manifest["model"]
    assert (geometry["num_kv_heads"], geometry["head_dim"]) == (KV_HEADS, HEAD_DIM)
    assert (geometry["global_kv_heads"], geometry["global_head_dim"]) == (global_heads, wide)
    # AND the report: a token of a row costs 3 sliding and 3 full layers, each K and V at its width
    kv = _json(["report", str(tmp_path / "run"), "--json", "--no-export", "-q"], capsys)["kv"]
    per_token = 3 * 2 * KV_HEADS * HEAD_DIM * 4 + 3 * 2 * global_heads * wide * 4  # 2,304 B or 1,536 B
    assert kv["bytes_per_token_expected"] == per_token
    assert kv["final_bytes"] == final
    # its peak: the last step's layer 5 makes its 16-token V while its 15-token V is still live
    assert kv["peak_bytes"] == final + (written - 1) * full_side
    # AND diagnose prices a shorter context at the widths of the layers that hold it
    diagnosis = _json(["diagnose", str(tmp_path / "run"), "--json"], capsys)
    context = next(r for r in diagnosis["remedies"] if r["kind"] == "context")
    if diagnosis["tokens_held"] == PROMPT:
        # at the prefill, the layers holding the prompt at the moment, sliding and full in turn: all 6, or
        # the 5 before the last full layer writes where layer 4's masked attention peaks (a shorter prompt
        # frees those; before, priced at all 6)
        live = diagnosis["kv_layers_live"]
        assert live in (5, 6)
        following = sum(2 * (sliding_side if layer % 2 == 0 else full_side) for layer in range(live))
        assert diagnosis["kv_bytes"] == PROMPT * following
    else:
        following = 3 * 2 * full_side
    _priced_per_token(diagnosis, context, following)
    # AND the plan of its config.json is the recording: per token, final and peak
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--batch", str(ROWS)]
    planned = _json([*argv, "--prompt", str(PROMPT), "--context", str(PROMPT + NEW), "--json"], capsys)
    assert planned["kv_bytes_per_token"] == per_token
    assert (planned["kv_bytes"], planned["kv_peak_bytes"]) == (kv["final_bytes"], kv["peak_bytes"])


def _priced_per_token(diagnosis: dict[str, Any], context: dict[str, Any], per_token: int) -> None:
    """Asserts that diagnose prices a token of the moment's KV at `per_token` across the batch: a shorter
    context's, after a decode step; at the prefill, where fewer new tokens free nothing, a shorter
    prompt's."""
    if diagnosis["step_phase"] == "prefill":
        assert (context["setting"], context["saved_bytes"]) == (None, 0)
        shorter = [r for r in diagnosis["remedies"] if r["kind"] == "prompt"]
        for remedy in shorter:  # priced where the run's prefill moments are measured (profiled)
            assert f"{human_bytes(per_token)} of KV across the batch" in remedy["sentence"]
    else:
        assert context["saved_bytes"] == (diagnosis["tokens_held"] + 1 - context["setting"]) * per_token


def test_a_config_attribute_that_raises_leaves_its_figure_unknown_with_a_note(tmp_path: Path) -> None:
    # GIVEN a tiny NeoMME, whose sliding layers keep windows of two sizes: its config's `sliding_window` is
    # per layer, and reading it raises
    config = transformers.NeoMMEConfig(
        vocab_size=256, embedding_rank=16, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8, embedding_dim=16,
    )  # fmt: skip
    with pytest.raises(transformers.integrations.heterogeneity.AmbiguousGlobalPerLayerAttributeError):
        _ = config.sliding_window
    model = transformers.NeoMMEForMaskedLM(config).eval()
    ids = torch.randint(3, 200, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    # WHEN a forward pass of it is recorded
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model):
        model(ids)
    # THEN the recording completes, its window unknown and the manifest saying why, the rest read
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["ended"]["status"] == "ok"
    geometry = manifest["model"]
    assert geometry["sliding_window"] is None
    assert (geometry["num_layers"], geometry["num_kv_heads"], geometry["head_dim"]) == (6, 2, HEAD_DIM)
    assert (
        "model config: sliding_window could not be read (AmbiguousGlobalPerLayerAttributeError: "
        "'sliding_window' is a per-layer attribute and may vary across layers); its figures are left unknown"
    ) in manifest["notes"]
