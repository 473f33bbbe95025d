"""Encoder-decoder models (BART, T5, Whisper) under the real recorder: their KV is the decoder's, held in one
`EncoderDecoderCache` as two caches, the self-attention KV of the generated tokens and the cross-attention
KV of the encoder's output at the encoder's length. Mllama (Llama 3.2 Vision) holds both kinds in one cache:
its cross-attention layers hold the image's vision tokens. Tiny random-weight models; every figure is the
arithmetic decoder layers x 2 x heads x head_dim x 4 bytes (fp32) per token and row.
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

FP32 = 4


def _cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _bart(encoder_layers: int, decoder_layers: int, encoder_heads: int, decoder_heads: int) -> Any:
    config = transformers.BartConfig(
        vocab_size=512, d_model=64, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=encoder_heads, decoder_attention_heads=decoder_heads, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_position_embeddings=128, decoder_start_token_id=2, bos_token_id=0,
        pad_token_id=1, eos_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(config).eval()


def _t5() -> Any:
    # d_kv 8 is not d_model / num_heads (16): the head dim is T5's own field. As many decoder layers as
    # encoder layers: transformers 5.24 sizes T5's DynamicCache by `num_layers` and fails with more.
    config = transformers.T5Config(
        vocab_size=512, d_model=64, d_kv=8, d_ff=128, num_layers=3, num_decoder_layers=3, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


def _whisper() -> Any:
    # Whisper's `num_key_value_heads` is its encoder's heads (its attribute_map), like `num_attention_heads`
    config = transformers.WhisperConfig(
        vocab_size=600, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=8, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=30, max_target_positions=64, decoder_start_token_id=1, pad_token_id=0,
        eos_token_id=2, bos_token_id=1, begin_suppress_tokens=None, suppress_tokens=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config).eval()


def _record(model: Any, run: Path, inputs: dict[str, torch.Tensor], new: int, beams: int = 1) -> Any:
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        return model.generate(
            **inputs, max_new_tokens=new, min_new_tokens=new, num_beams=beams, do_sample=False,
            return_dict_in_generate=True,
        )  # fmt: skip


def _ids(batch: int, length: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(4, 512, (batch, length), generator=torch.Generator().manual_seed(0))}


def test_beam_search_headlines_the_decoders_self_attention_kv_not_the_encoders_cross_attention(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN BART (3 decoder layers, 2 heads of 64 / 2 = 32) beam-searching 3 prompts x 3 beams: its
    # EncoderDecoderCache reorders the self-attention cache, then the cross-attention one (written last)
    layers, heads, head_dim = 3, 2, 64 // 2
    batch, beams, encoder_tokens, new = 3, 3, 17, 9
    run = tmp_path / "run"
    out = _record(_bart(3, layers, 2, heads), run, _ids(batch, encoder_tokens), new, beams)
    assert out.sequences.shape == (batch, 1 + new)  # the decoder start token, then the new ones
    per_token = layers * 2 * heads * head_dim * FP32
    rows = batch * beams
    # The decoder start token and every new one but the last (never written back) are held
    decoder_tokens = 1 + new - 1

    # THEN the manifest says which cache is which, within the encoder-decoder cache
    manifest = json.loads((run / "manifest.json").read_text())
    [pair] = manifest["encoder_decoder_caches"]
    own, cross = pair["self_attention"], pair["cross_attention"]
    assert {pair["cache"], own, cross} <= set(manifest["model_caches"])

    # AND the headline is the self-attention cache's: the decoder's tokens, not the encoder's length
    kv = _cli_json(["report", str(run), "--no-export"], capsys)["kv"]
    assert kv["main_cache"] == own
    assert kv["tokens_held"] == decoder_tokens
    assert kv["batch"] == rows
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == per_token
    # the cross-attention KV counts in the totals, held at the encoder's length
    assert kv["final_bytes"] == per_token * rows * (decoder_tokens + encoder_tokens)
    by_id = {c["cache"]: c for c in kv["caches"]}
    assert (by_id[own]["role"], by_id[cross]["role"]) == ("self_attention", "cross_attention")
    assert by_id[cross]["tokens"] == encoder_tokens
    assert by_id[cross]["final_bytes"] == per_token * rows * encoder_tokens
    text_notes = _cli_json(["report", str(run), "--no-export"], capsys)["notes"]
    [note] = [n for n in text_notes if "cross-attention" in n]
    assert f"cache {cross} (of encoder-decoder cache {pair['cache']}" in note
    assert not any("draft cache" in n for n in text_notes)

    # AND tokens/s counts the generated tokens of the self-attention cache only
    [figures, _] = _cli_json(["compare", str(run), str(run)], capsys)["runs"]
    assert figures["generated_tokens_per_row"] == new
    assert figures["rows_are_beams"] is True

    # AND diagnose prices a shorter context by the decoder's tokens, not by the encoder's input
    diagnosis = _cli_json(["diagnose", str(run)], capsys)
    assert diagnosis["tokens_held"] == decoder_tokens
    [context] = [r for r in diagnosis["remedies"] if r["kind"] == "context"]
    assert f"instead of {decoder_tokens + 1} " in context["sentence"]  # as plan's --context: one more
    assert context["saved_bytes"] == (decoder_tokens + 1 - context["setting"]) * per_token * rows


def test_a_run_without_the_encoder_decoder_caches_field_still_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a greedy BART run whose manifest is rewritten as kvtrace wrote it before the roles were recorded
    run = tmp_path / "run"
    _record(_bart(2, 2, 2, 2), run, _ids(2, 6), 4)
    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    pair = manifest.pop("encoder_decoder_caches")[0]
    manifest["model_caches"] = [pair["cache"]]
    path.write_text(json.dumps(manifest))
    # THEN it reads, its caches without roles
    kv = _cli_json(["report", str(run), "--no-export"], capsys)["kv"]
    assert {c["role"] for c in kv["caches"]} == {None}
    assert kv["final_bytes"] == 2 * 2 * 2 * 32 * FP32 * 2 * (4 + 6)  # 4 decoder tokens, 6 encoder tokens


@pytest.mark.parametrize(
    ("make", "inputs", "layers", "heads", "head_dim"),
    [
        (lambda: _bart(2, 4, 4, 4), lambda: _ids(2, 16), 4, 4, 64 // 4),  # more decoder layers than encoder
        (lambda: _bart(2, 3, 8, 2), lambda: _ids(2, 16), 3, 2, 64 // 2),  # fewer decoder heads
        (_t5, lambda: _ids(2, 16), 3, 4, 8),
        (
            _whisper,
            lambda: {"input_features": torch.randn(2, 16, 60, generator=torch.Generator().manual_seed(0))},
            3, 2, 64 // 2,
        ),
    ],
    ids=["bart-decoder-layers", "bart-decoder-heads", "t5", "whisper"],
)  # fmt: skip
def test_the_kv_geometry_of_an_encoder_decoder_is_its_decoders(
    make: Any, inputs: Any, layers: int, heads: int, head_dim: int, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    run = tmp_path / "run"
    _record(make(), run, inputs(), 5)
    report = _cli_json(["report", str(run), "--no-export"], capsys)
    geometry, kv = report["geometry"], report["kv"]
    assert (geometry["num_layers"], geometry["num_attention_heads"]) == (layers, heads)
    assert (geometry["num_kv_heads"], geometry["head_dim"]) == (heads, head_dim)
    per_token = layers * 2 * heads * head_dim * FP32
    assert kv["bytes_per_token_expected"] == kv["bytes_per_token_measured"] == per_token
    assert all(c["model_shaped"] for c in kv["caches"] if c["final_bytes"])


# Mllama's tiny layout: 5 text layers, layer 2 cross-attention, 2 KV heads of 64 / 4 = 16; one image of 4
# tiles of 2 x 2 patches and a class token: 20 vision tokens; a 12-token prompt (the image token first)
MLLAMA_PROMPT, MLLAMA_NEW, MLLAMA_VISION_TOKENS = 12, 4, 1 * 4 * (2 * 2 + 1)
MLLAMA_SELF_LAYERS, MLLAMA_KV_HEADS, MLLAMA_HEAD_DIM = 4, 2, 16
MLLAMA_HELD = MLLAMA_PROMPT + MLLAMA_NEW - 1  # the last new token is never written back
MLLAMA_PER_TOKEN = MLLAMA_SELF_LAYERS * 2 * MLLAMA_KV_HEADS * MLLAMA_HEAD_DIM * FP32  # batch 1
MLLAMA_SELF_KV = MLLAMA_PER_TOKEN * MLLAMA_HELD
MLLAMA_CROSS_KV = 1 * 2 * MLLAMA_KV_HEADS * MLLAMA_HEAD_DIM * MLLAMA_VISION_TOKENS * 1 * FP32


def _mllama_run(run: Path, profiler: bool) -> Any:
    """Records Llama 3.2 Vision's layout, tiny: one DynamicCache whose layer 2 holds the cross-attention
    KV of the image's vision tokens, written at prefill and never grown, and whose other 4 layers hold the
    text's self-attention KV. Returns the model's config."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}  # fmt: skip
    text = dict(
        vocab_size=300, pad_token_id=0, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[2], rope_scaling=rope,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
        image_size=28, patch_size=14, max_num_tiles=4, vision_output_dim=64, intermediate_layers_indices=[0],
    )  # fmt: skip
    config = transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=299)
    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(config).eval()
    ids = torch.cat([torch.full((1, 1), 299), torch.randint(3, 290, (1, MLLAMA_PROMPT - 1))], 1)
    cross_mask = torch.zeros(1, MLLAMA_PROMPT, 1, 4, dtype=torch.long)
    cross_mask[:, :, 0, 0] = 1
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=profiler):
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 1, 4, 3, 28, 28),
            aspect_ratio_ids=torch.tensor([[1]]), aspect_ratio_mask=torch.tensor([[[1, 0, 0, 0]]]),
            cross_attention_mask=cross_mask, max_new_tokens=MLLAMA_NEW, min_new_tokens=MLLAMA_NEW,
            do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        )  # fmt: skip
    assert out.past_key_values.layers[2].keys.shape[-2] == MLLAMA_VISION_TOKENS
    return config


@pytest.mark.parametrize("profiler", [False, True], ids=["deferred-updates", "every-update"])
def test_mllama_cross_attention_layers_hold_the_images_kv_apart_from_the_tokens(
    profiler: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _mllama_run(run, profiler)

    # THEN the manifest says which layers of the model's cache are logged apart, and warns of nothing
    manifest = json.loads((run / "manifest.json").read_text())
    [part] = manifest["cross_attention_parts"]
    own, cross = part["cache"], part["cross_attention"]
    assert part["layers"] == [2] and {own, cross} <= set(manifest["model_caches"])
    assert not any("held" in w for w in manifest["warnings"])
    assert manifest["model"]["kv_layers"] == MLLAMA_SELF_LAYERS

    # AND tokens held and bytes per token are the text's; the image's KV counts in the totals, named
    report = _cli_json(["report", str(run), "--no-export"], capsys)
    kv = report["kv"]
    assert (kv["main_cache"], kv["tokens_held"], kv["batch"]) == (own, MLLAMA_HELD, 1)
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == MLLAMA_PER_TOKEN
    assert kv["final_bytes"] == MLLAMA_SELF_KV + MLLAMA_CROSS_KV
    by_id = {c["cache"]: c for c in kv["caches"]}
    assert by_id[cross]["role"] == "cross_attention"
    assert (by_id[cross]["cross_attention_of"], by_id[cross]["cross_layers"]) == (own, [2])
    assert (by_id[cross]["tokens"], by_id[cross]["final_bytes"]) == (MLLAMA_VISION_TOKENS, MLLAMA_CROSS_KV)
    assert by_id[own]["final_bytes"] == MLLAMA_SELF_KV
    [note] = [n for n in report["notes"] if "cross-attention" in n]
    assert f"cache {cross} (layer 2 of cache {own}: {MLLAMA_VISION_TOKENS} vision tokens x 1 rows" in note
    assert main(["report", str(run), "--no-export"]) == 0
    said = f"of which cross-attention (image) KV: {MLLAMA_CROSS_KV / 1024:.2f} KiB"
    assert said in capsys.readouterr().out


def test_mllama_diagnose_and_plan_price_tokens_by_the_self_attention_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    config = _mllama_run(run, profiler=False)  # the KV log's moment: the end of the last decode step
    [part] = json.loads((run / "manifest.json").read_text())["cross_attention_parts"]

    # THEN diagnose prices every token remedy by the text's tokens, the image's KV a fixed cost
    diagnosis = _cli_json(["diagnose", str(run)], capsys)
    assert (diagnosis["tokens_held"], diagnosis["kv_final_bytes"]) == (
        MLLAMA_HELD, MLLAMA_SELF_KV + MLLAMA_CROSS_KV
    )  # fmt: skip
    context = next(r for r in diagnosis["remedies"] if r["kind"] == "context")
    assert f"A context of {context['setting']} tokens instead of {MLLAMA_HELD + 1} " in context["sentence"]
    assert context["saved_bytes"] == (MLLAMA_HELD + 1 - context["setting"]) * MLLAMA_PER_TOKEN
    int4 = next(r for r in diagnosis["remedies"] if r["kind"] == "quantized_kv" and r["setting"] == 4)
    assert f"holds these {MLLAMA_HELD} tokens" in int4["sentence"]
    assert f"instead of {MLLAMA_SELF_KV / 1024:.2f} KiB" in int4["sentence"]
    # A sliding window on the 4 self-attention layers, the image's KV held besides
    window = next(r for r in diagnosis["remedies"] if r["kind"] == "sliding_window")
    size, layer_token = window["setting"], MLLAMA_PER_TOKEN / MLLAMA_SELF_LAYERS
    held = MLLAMA_SELF_LAYERS * size * layer_token + MLLAMA_CROSS_KV
    peak = (MLLAMA_SELF_LAYERS * max(MLLAMA_PROMPT, size) + size) * layer_token + MLLAMA_CROSS_KV
    assert f"holds {held / 1024:.2f} KiB of KV at most" in window["sentence"]
    assert f"{peak / 1024:.2f} KiB at its peak" in window["sentence"]
    assert f"with the {MLLAMA_CROSS_KV / 1024:.2f} KiB of cross-attention KV" in window["sentence"]
    assert "20-token prompt" not in window["sentence"]
    named = f"cache {part['cross_attention']} is the cross-attention KV of the image(s) in layer 2"
    assert any(named in n for n in diagnosis["notes"])

    # AND plan --config counts the self-attention layers per token, and says why
    config.save_pretrained(tmp_path / "config")
    plan = _cli_json(["plan", "--config", str(tmp_path / "config"), "--context", "15"], capsys)
    bf16 = 2
    assert plan["kv_bytes_per_token"] == MLLAMA_SELF_LAYERS * 2 * MLLAMA_KV_HEADS * MLLAMA_HEAD_DIM * bf16
    assert any("cross-attention layer (2) holds the image's KV" in n for n in plan["notes"])
