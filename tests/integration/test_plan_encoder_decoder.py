"""`kvtrace plan` of encoder-decoder models (T5, BART): the decoder's layers hold the KV, its self-attention
KV of the generated tokens and the cross-attention KV of the encoder's output, at the encoder's input length.
Real recordings of tiny random-weight models; every figure is the arithmetic decoder layers x 2 x heads x
head_dim x 4 bytes (fp32) per token and row, and `--from-run` at the run's own settings is the recording.
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
from tests.cli_json import cli_json, plan_json, report_json

FP32 = 4
NEW = 6  # new tokens; the decoder start token and all but the last new one are held
DECODER_TOKENS = 1 + NEW - 1
ENCODER_TOKENS = 11


def _record(model: Any, run: Path, batch: int, beams: int = 1, encoder: int = ENCODER_TOKENS) -> None:
    ids = torch.randint(4, 500, (batch, encoder), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(run, model=model):  # allocator events: the peak's activations
        model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
            num_beams=beams, do_sample=False,
        )  # fmt: skip


def _t5(run: Path, encoder: int = ENCODER_TOKENS) -> int:
    """T5 of 3 encoder and 2 decoder layers, 4 heads of d_kv 16, 2 rows. Returns a layer's K bytes a token."""
    config = transformers.T5Config(
        vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    _record(transformers.T5ForConditionalGeneration(config).eval(), run, 2, encoder=encoder)
    return 4 * 16 * FP32


def _bart(run: Path, batch: int, beams: int = 1, encoder: int = ENCODER_TOKENS) -> int:
    """BART of 3 encoder layers of 8 heads, 2 decoder layers of 2 heads (64 / 2 = 32 wide) and its own MLP
    width. Returns a decoder layer's K bytes a token."""
    config = transformers.BartConfig(
        vocab_size=512, d_model=64, encoder_layers=3, decoder_layers=2, encoder_attention_heads=8,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=96, max_position_embeddings=128,
        decoder_start_token_id=2, bos_token_id=0, pad_token_id=1, eos_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    _record(transformers.BartForConditionalGeneration(config).eval(), run, batch, beams, encoder)
    return 2 * 32 * FP32


def test_t5_plan_from_run_is_the_recording_with_its_cross_attention_kv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN T5 with fewer decoder layers (2) than encoder layers (3), greedy over 2 rows
    run = tmp_path / "t5"
    layer_k = _t5(run)
    rows, decoder_layers = 2, 2
    per_token = decoder_layers * 2 * layer_k  # 1,024 B: the decoder's layers, not the encoder's 3 (1,536)
    own = per_token * rows * DECODER_TOKENS  # 10,240 B
    cross = per_token * rows * ENCODER_TOKENS  # 22,528 B, at the encoder's input length
    growth = layer_k * rows * (DECODER_TOKENS - 1)  # the last step's copy of one layer's K

    # WHEN it is planned from the run, at the run's own settings
    report = report_json(run, capsys)
    plan = plan_json(run, capsys)

    # THEN the plan's KV is the recording's and the arithmetic's, the cross-attention KV a line of its own
    assert report["kv"]["final_bytes"] == own + cross
    assert report["kv"]["peak_bytes"] == own + cross + growth
    assert plan["kv_bytes_per_token"] == per_token
    assert plan["kv_bytes"] == own + cross
    assert plan["kv_peak_bytes"] == own + cross + growth
    assert (plan["kv_cross_attention_bytes"], plan["encoder_tokens"]) == (cross, ENCODER_TOKENS)
    assert plan["kv_cross_attention_bytes_per_token"] == per_token
    assert plan["peak_bytes"] == report["devices"][0]["peak_allocated_bytes"]
    # AND no note calls the cross-attention cache another call's
    assert not any("another cache" in note for note in plan["notes"])

    # AND a longer encoder input grows the cross-attention KV alone; a longer context the self-attention's
    longer = plan_json(run, capsys, "--encoder-tokens", str(2 * ENCODER_TOKENS))
    assert longer["kv_bytes"] == own + 2 * cross
    wider = plan_json(run, capsys, "--context", str(DECODER_TOKENS + 1 + 4))
    assert wider["kv_bytes"] == per_token * rows * (DECODER_TOKENS + 4) + cross

    # AND the text names what the cross-attention part grows with
    assert main(["plan", "--from-run", str(run)]) == 0
    text = capsys.readouterr().out
    assert f"cross-attention      {cross / 1024:.2f} KiB ({rows} x {ENCODER_TOKENS} encoder tokens" in text
    assert "grows with the encoder's input length and the batch, not with the context" in text


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beams"])
def test_bart_plan_from_run_reads_its_config_and_is_the_recording(
    beams: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN BART, whose config names its decoder's shape decoder_layers, decoder_attention_heads, d_model
    run = tmp_path / "bart"
    layer_k = _bart(run, 2, beams)
    rows = 2 * beams
    per_token = 2 * 2 * layer_k
    own, cross = per_token * rows * DECODER_TOKENS, per_token * rows * ENCODER_TOKENS
    # the peak: greedy, the last step's copy of one layer's K; beam search, the reorder of the
    # cross-attention cache after the self-attention one, one layer's K of it beside the rest
    extra = layer_k * rows * (DECODER_TOKENS - 1) if beams == 1 else layer_k * rows * ENCODER_TOKENS

    report = report_json(run, capsys)
    assert main(["plan", "--from-run", str(run), "--json"]) == 0  # was 2: "missing field num_hidden_layers"
    plan = json.loads(capsys.readouterr().out)

    assert report["kv"]["final_bytes"] == plan["kv_bytes"] == own + cross
    assert report["kv"]["peak_bytes"] == plan["kv_peak_bytes"] == own + cross + extra
    assert plan["kv_bytes_per_token"] == per_token
    assert plan["request"]["beams"] == beams and plan["request"]["batch"] == rows
    assert plan["peak_bytes"] == report["devices"][0]["peak_allocated_bytes"]


@pytest.mark.parametrize(("family", "longer"), [("t5", 200), ("bart", 120)])
def test_plan_at_a_longer_encoder_input_holds_its_encoder_pass(
    family: str, longer: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the same model recorded at an 11-token encoder input and at a longer one, whose encoder pass
    # (its encoder x encoder scores, masks and position biases, before any KV) is its peak
    short, long = tmp_path / "short", tmp_path / "long"
    for run, encoder in ((short, ENCODER_TOKENS), (long, longer)):
        _t5(run, encoder) if family == "t5" else _bart(run, 2, encoder=encoder)
    recorded = report_json(long, capsys)
    real = recorded["devices"][0]["peak_allocated_bytes"]
    assert recorded["devices"][0]["categories_at_peak"]["kv"] == 0  # the encoder pass: no KV made yet

    # WHEN the short run is planned at the longer input
    plan = plan_json(short, capsys, "--encoder-tokens", str(longer))

    # THEN the plan holds that pass (T5 planned 1,379,180 B where it peaked at 3,400,536: -59.4%), within
    # a quarter above it, and says what it costs
    assert real <= plan["peak_bytes"] <= real * 1.25
    assert any("the encoder pass: " in n and f"at {longer:,} encoder tokens" in n for n in plan["notes"])
    # AND the run's own settings still plan its own peak
    own = plan_json(short, capsys)
    assert own["peak_bytes"] == report_json(short, capsys)["devices"][0]["peak_allocated_bytes"]
    assert not any("the encoder pass: " in n for n in own["notes"])


def test_plan_config_of_an_encoder_decoder_plans_its_cross_attention_at_the_encoder_length(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "bart"
    layer_k = _bart(run, 2) // FP32 * 2  # in bf16, plan's default
    config = str(run / "model_config.json")
    per_token = 2 * 2 * layer_k
    batch, context = 4, 20

    # WHEN the encoder's input length is given, the cross-attention KV is held at it
    flags = ["plan", "--config", config, "--batch", str(batch), "--context", str(context), "--json"]
    plan = cli_json([*flags, "--encoder-tokens", "50"], capsys)
    assert plan["kv_bytes_per_token"] == per_token
    assert plan["kv_cross_attention_bytes"] == per_token * batch * 50
    assert plan["kv_bytes"] == per_token * batch * (context - 1) + per_token * batch * 50
    # AND the weights say what they leave out
    left_out = "the encoder's and the cross-attention projections are not counted"
    assert any(left_out in note for note in plan["notes"])

    # WHEN it is not, the context stands for it, and a note says so
    plan = cli_json(flags, capsys)
    assert plan["encoder_tokens"] == context
    assert plan["kv_cross_attention_bytes"] == per_token * batch * context
    assert any("planned for 20 tokens a row, the context (--encoder-tokens)" in n for n in plan["notes"])


def test_encoder_tokens_is_refused_for_a_decoder_only_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--preset", "llama-3-8b", "--encoder-tokens", "5"]) == 2
    assert "not an encoder-decoder model" in capsys.readouterr().err
