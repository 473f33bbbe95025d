"""Encoder-decoder models (BART, T5, Whisper) under the real recorder: their KV is the decoder's, held in one
`EncoderDecoderCache` as two caches, the self-attention KV of the generated tokens and the cross-attention
KV of the encoder's output at the encoder's length. Tiny random-weight models; every figure is the
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
    assert f"instead of {decoder_tokens} " in context["sentence"]
    assert context["saved_bytes"] == (decoder_tokens - context["setting"]) * per_token * rows


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
