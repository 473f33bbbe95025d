"""`kvtrace plan --from-run` on a recorded transformers run: with no other flag it plans the run itself, so
its KV (final and peak) and weights must be the recording's, and each flag typed moves one setting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model, cache_keyword, make_cache
from tests.hf_versions import needs_fp8_cache
from tests.tiny import HEAD_DIM, record_generate, tiny_size, weights_bytes

LAYERS, KV_HEADS, BATCH, PROMPT, NEW = 2, 2, 2, 11, 6
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(tiny_size(LAYERS, KV_HEADS)).eval()


def _json(argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 0) -> dict[str, Any]:
    assert main(argv) == code, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _recorded(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    return _json(["report", str(run), "--json", "--no-export", "-q"], capsys)["kv"]


@pytest.mark.parametrize(
    ("options", "cache", "kv_dtype", "final"),
    [
        ({}, "dynamic", "fp32", TOKEN_ROW * BATCH * (PROMPT + NEW - 1)),
        # A StaticCache generate() makes: PROMPT + NEW positions (its max_length), one never written
        ({"cache_implementation": "static"}, "static", "fp32", TOKEN_ROW * BATCH * (PROMPT + NEW - 1)),
        # fp8 QuantizedCache: 1 byte an element and a float32 scale per K and per V per layer
        pytest.param(
            {"cache_implementation": "quantized", "cache_config": {"backend": "fp8"}},
            "quantized",
            "fp8",
            LAYERS * 2 * (KV_HEADS * HEAD_DIM * BATCH * (PROMPT + NEW - 1) + 4),
            marks=needs_fp8_cache,
        ),
    ],
    ids=["dynamic", "static", "fp8-quantized"],
)
def test_a_plan_from_a_run_with_no_other_flag_is_the_run_itself(
    model: Any,
    options: dict[str, Any],
    cache: str,
    kv_dtype: str,
    final: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a greedy generate() of NEW tokens after PROMPT on BATCH rows, recorded without the profiler
    run = tmp_path / "run"
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0, **options,
        )  # fmt: skip
    recorded = _recorded(run, capsys)
    assert recorded["final_bytes"] == final
    # WHEN it is planned from the run alone
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys)
    # THEN the plan is the run's settings: its cache, dtypes, rows, context and prompt
    request = plan["request"]
    assert (request["cache"], request["kv_dtype"], request["weights_dtype"]) == (cache, kv_dtype, "fp32")
    assert (request["batch"], request["context"], request["prompt"]) == (BATCH, PROMPT + NEW, PROMPT)
    # and its figures the recording's: the weights as measured, the KV final and peak as logged
    assert plan["weights_bytes"] == weights_bytes(model)
    assert (plan["kv_bytes"], plan["kv_peak_bytes"]) == (final, recorded["peak_bytes"])
    assert any("the run was on cpu" in note for note in plan["notes"])


def test_flags_typed_after_from_run_win_and_an_older_run_plans_from_its_manifest(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a recorded run
    run = tmp_path / "run"
    record_generate(model, run, BATCH, PROMPT, NEW, profiler=False)
    # WHEN a batch, context and GPU are typed
    argv = ["plan", "--from-run", str(run), "--batch", "8", "--context", "1025", "--gpu-memory", "1GiB"]
    plan = _json([*argv, "--json"], capsys)
    # THEN those win (the prompt stays the run's: the context changes the new tokens), the weights stay
    # the run's
    assert (plan["request"]["batch"], plan["request"]["context"], plan["request"]["prompt"]) == (
        8,
        1025,
        PROMPT,
    )
    assert plan["kv_bytes"] == TOKEN_ROW * 8 * 1024
    assert plan["weights_bytes"] == weights_bytes(model)
    assert plan["request"]["gpu_memory_bytes"] == 1 << 30
    # and the text says whose weights they are
    assert main(argv) == 0
    assert "(the run's)" in capsys.readouterr().out
    # GIVEN the same run as kvtrace wrote it before model_config.json: the manifest's geometry plans it
    (run / "model_config.json").unlink()
    older = _json(["plan", "--from-run", str(run), "--json"], capsys)
    assert (older["kv_bytes"], older["kv_bytes_per_token"]) == (
        TOKEN_ROW * BATCH * (PROMPT + NEW - 1),
        TOKEN_ROW,
    )
    assert any("model_config.json" in note for note in older["notes"])


def test_from_run_refuses_what_it_cannot_plan_in_one_line(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    record_generate(model, run, 1, 5, 2, profiler=False)
    # a model besides the run's own
    assert main(["plan", "--from-run", str(run), "--preset", "llama-3-8b"]) == 2
    assert "drop --preset/--config" in capsys.readouterr().err
    # a folder that is not a run
    assert main(["plan", "--from-run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# Transformers models with sliding windows: 4 layers x 2 KV heads x head_dim 16 (hidden 64 / 4 heads)
_SLIDING = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=1000, max_position_embeddings=256, sliding_window=8,
)  # fmt: skip
WINDOW = 8
SLIDING_ROW = 2 * 2 * 16 * 4  # one layer's K and V of one token of one row, float32


def _mistral() -> Any:
    import transformers

    torch.manual_seed(0)
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_SLIDING)).eval()


def _gemma2() -> Any:  # layers 0 and 2 slide, 1 and 3 keep every token
    import transformers

    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**_SLIDING, head_dim=16)).eval()


def _generate(model: Any, batch: int, prompt: int, new: int, seed: int = 0, **options: Any) -> None:
    ids = torch.randint(3, 1000, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
        pad_token_id=0, **options,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("make", "prompt", "new", "static", "final"),
    [
        # Mistral: every layer slides; the cache holds the window, the context is prompt + new all the same
        (_mistral, 6, 12, False, 4 * WINDOW * SLIDING_ROW * BATCH),
        (_mistral, 11, 6, False, 4 * WINDOW * SLIDING_ROW * BATCH),
        (_mistral, 11, 6, True, 4 * WINDOW * SLIDING_ROW * BATCH),
        # Gemma 2's StaticCache: its full layers prompt + new - 1 positions, its sliding ones the window
        (_gemma2, 6, 12, True, (2 * (6 + 12 - 1) + 2 * WINDOW) * SLIDING_ROW * BATCH),
    ],
    ids=["mistral-dynamic-long-decode", "mistral-dynamic-long-prompt", "mistral-static", "gemma2-static"],
)
def test_a_plan_from_a_run_with_sliding_layers_is_the_run_itself(
    make: Any,
    prompt: int,
    new: int,
    static: bool,
    final: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a generate() of `new` tokens after `prompt` on a model whose layers (some or all) slide
    model, run = make(), tmp_path / "run"
    options = {"cache_implementation": "static"} if static else {}
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        _generate(model, BATCH, prompt, new, **options)
    recorded = _recorded(run, capsys)
    assert recorded["final_bytes"] == final
    # WHEN it is planned from the run alone
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys)
    # THEN the context is the run's prompt + new tokens (not the window + 1), the cache kind the run's
    request = plan["request"]
    assert (request["context"], request["prompt"]) == (prompt + new, prompt)
    assert request["cache"] == ("static" if static else "dynamic")
    assert (plan["kv_bytes"], plan["kv_peak_bytes"]) == (final, recorded["peak_bytes"])


@pytest.mark.parametrize(
    ("kind", "beams", "final", "peak"),
    [
        # DynamicSlidingWindowLayer: each layer keeps a view of its last WINDOW - 1 tokens in a storage of
        # WINDOW (its last cat); the first decode step makes layer 0's new K and V of WINDOW tokens while
        # every layer still holds the prompt
        (
            "sliding",
            1,
            TOKEN_ROW * BATCH * WINDOW,
            TOKEN_ROW * BATCH * PROMPT + TOKEN_ROW // LAYERS * BATCH * WINDOW,
        ),
        # StaticSlidingWindowLayer: WINDOW positions allocated at the first step, written in place
        ("static_sliding", 1, TOKEN_ROW * BATCH * WINDOW, TOKEN_ROW * BATCH * WINDOW),
        # ... under beam search (2 x BATCH rows), whose reorder copies one layer's K beside it, and moves
        # the storages, which a static cache's otherwise are told by
        (
            "static_sliding",
            2,
            TOKEN_ROW * 2 * BATCH * WINDOW,
            TOKEN_ROW * 2 * BATCH * WINDOW + TOKEN_ROW // (2 * LAYERS) * 2 * BATCH * WINDOW,
        ),
    ],
    ids=["sliding", "static_sliding", "static_sliding-beams"],
)
def test_a_cache_given_a_window_its_models_config_lacks_is_planned_at_that_window(
    model: Any,
    kind: str,
    beams: int,
    final: int,
    peak: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN kvtrace demo's sliding caches, built from a config of their own with a window of WINDOW, on a
    # Llama whose config has none; a prompt longer than the window, so that every layer evicts
    assert getattr(model.config, "sliding_window", None) is None and PROMPT > WINDOW
    run = tmp_path / "run"
    cache, extra = make_cache(kind, model, BATCH, PROMPT + NEW, window=WINDOW)
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        _generate(model, BATCH, PROMPT, NEW, num_beams=beams, **{cache_keyword(): cache}, **extra)
    recorded = _recorded(run, capsys)
    assert (recorded["final_bytes"], recorded["peak_bytes"]) == (final, peak)
    # WHEN it is planned from the run alone
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys)
    # THEN the plan slides at the run's window, exactly, and its KV is the recording's; a note says why
    request = plan["request"]
    assert (request["context"], request["prompt"]) == (PROMPT + NEW, PROMPT)
    assert (request["batch"], request["beams"]) == (beams * BATCH, beams)
    assert (request["cache"], request["window"]) == (kind, WINDOW)  # the kind by demo's name for it
    assert (plan["kv_bytes"], plan["kv_peak_bytes"]) == (final, peak)
    assert any(f"a window of {WINDOW} tokens on every layer" in note for note in plan["notes"])


def test_the_budget_a_run_was_recorded_with_is_the_plans_gpu_memory(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run recorded with a budget its weights alone exceed (kvtrace demo records with one)
    run = tmp_path / "run"
    record_generate(model, run, BATCH, PROMPT, NEW, profiler=False, gpu_memory="512KiB")
    assert weights_bytes(model) > 1 << 19
    # WHEN planned from the run alone: THEN for that budget, not an 80 GiB GPU: it does not fit (exit 1)
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys, code=1)
    assert (plan["request"]["gpu_memory_bytes"], plan["fits"]) == (1 << 19, False)
    assert any("the budget the run was recorded with, 512.00 KiB" in note for note in plan["notes"])
    assert not any("80 GiB" in note for note in plan["notes"])
    # and a typed --gpu-memory wins, without the note
    typed = _json(["plan", "--from-run", str(run), "--gpu-memory", "1GiB", "--json"], capsys)
    assert (typed["request"]["gpu_memory_bytes"], typed["fits"]) == (1 << 30, True)
    assert not any("budget" in note for note in typed["notes"])


def test_block_size_help_says_only_a_vllm_run_gives_it(capsys: pytest.CaptureFixture[str]) -> None:
    # A transformers run has no paged blocks: its plan's blocks are of 16 unless --block-size says
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "paged KV block (default 16; with --engine vllm --from-run, the run's)" in text


def test_a_static_cache_with_room_to_spare_is_planned_at_its_length(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    # GIVEN a StaticCache made for 32 positions (the torch.compile recipe), 11 + 6 tokens generated in it
    run = tmp_path / "run"
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        _generate(model, BATCH, PROMPT, NEW, past_key_values=cache)
    assert _recorded(run, capsys)["final_bytes"] == TOKEN_ROW * BATCH * 32
    # WHEN planned from the run: THEN the static cache is its 32 positions, and a note says so
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys)
    assert (plan["request"]["cache"], plan["request"]["context"]) == ("static", 33)
    assert (plan["kv_bytes"], plan["kv_peak_bytes"]) == (TOKEN_ROW * BATCH * 32, TOKEN_ROW * BATCH * 32)
    assert any("room for 32 positions" in note for note in plan["notes"])


def test_a_run_of_two_generate_calls_plans_the_call_that_wrote_the_cache_last(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run of a long call (14 + 4) then a short one (5 + 3), each with its own cache
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        _generate(model, BATCH, 14, 4)
        _generate(model, BATCH, 5, 3, seed=1)
    # WHEN planned: THEN the prompt and the context are the last call's, and so is its KV
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys)
    assert (plan["request"]["prompt"], plan["request"]["context"]) == (5, 8)
    assert plan["kv_bytes"] == TOKEN_ROW * BATCH * (5 + 3 - 1)


def test_a_quantized_caches_bits_group_and_residual_are_read_from_the_log(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optimum.quanto")
    # GIVEN a quanto QuantizedCache of 4 bits, groups of 16, a residual of 2, 7 + 5 tokens generated
    run, prompt, new = tmp_path / "run", 7, 5
    config = {"backend": "quanto", "nbits": 4, "q_group_size": 16, "residual_length": 2}
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        _generate(model, BATCH, prompt, new, cache_implementation="quantized", cache_config=config)
    # 11 tokens written, (11 - 7) % 2 = 0 of them in the residual: each layer's K and V packed at half a
    # byte a value, a float32 scale and shift per group of 16 values
    values = BATCH * KV_HEADS * HEAD_DIM * (prompt + new - 1)
    final = LAYERS * 2 * (values // 2 + 2 * (values // 16) * 4)
    assert _recorded(run, capsys)["final_bytes"] == final
    # WHEN planned from the run: THEN a quantized int4 cache of the run's group and residual, its KV the run's
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys)
    request = plan["request"]
    assert (request["cache"], request["kv_dtype"], request["context"], request["prompt"]) == (
        "quantized", "int4", prompt + new, prompt,
    )  # fmt: skip
    assert (request["quant_group_size"], request["residual_length"]) == (16, 2)
    assert plan["kv_bytes"] == final


def _int2_packed(tokens: int) -> int:
    """One layer's K (or V) of `tokens` quantized at 2 bits in groups of 16: values, float32 scales and
    zero points."""
    values = BATCH * KV_HEADS * HEAD_DIM * tokens
    return values // 4 + 2 * (values // 16) * 4


@pytest.mark.parametrize("backend", [pytest.param("quanto", marks=pytest.mark.slow), "hqq"])
def test_a_2_bit_quantized_cache_is_planned_at_its_2_bits(
    model: Any, backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optimum.quanto" if backend == "quanto" else "hqq")
    # GIVEN a QuantizedCache of nbits=2, groups of 16, a residual of 4, 7 + 6 tokens generated: 12 written,
    # requantized at 11, so 11 quantized and 1 in the residual
    run, prompt, new, quantized = tmp_path / "run", 7, 6, 11
    config = {"backend": backend, "nbits": 2, "q_group_size": 16, "residual_length": 4}
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        _generate(model, BATCH, prompt, new, cache_implementation="quantized", cache_config=config)
    # each layer's K and V packed at four values a byte, a float32 scale and zero point per group of 16
    # values, and the residual token in float32
    values = BATCH * KV_HEADS * HEAD_DIM * quantized
    residual = BATCH * KV_HEADS * HEAD_DIM * 1 * 4
    final = LAYERS * 2 * (values // 4 + 2 * (values // 16) * 4 + residual)
    assert _recorded(run, capsys)["final_bytes"] == final
    # WHEN planned from the run
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys)
    # THEN an int2 cache (it was int4, its packed data twice the run's: 3,840 B planned for 3,136), no note
    request = plan["request"]
    assert (request["cache"], request["kv_dtype"]) == ("quantized", "int2")
    assert (request["quant_group_size"], request["residual_length"]) == (16, 4)
    assert plan["kv_bytes"] == final
    assert not any("planned at int4" in note for note in plan["notes"])
    # and its KV peak the cache's storages' at the step that requantized (11 tokens), the recording's KV
    # peak (its dequantized and returned K and V, not the cache's, are not KV): a bound, the first layer's
    # new quantized K and V made beside all 10 tokens held (7 quantized, 3 in the residual), less its old
    # quantized K, let go of as the new one is bound
    one_layer = BATCH * KV_HEADS * HEAD_DIM * 4  # a token of one layer's K (or V) in the residual
    before = LAYERS * 2 * (_int2_packed(prompt) + 3 * one_layer)
    assert plan["kv_peak_bytes"] == before + 2 * _int2_packed(quantized) - _int2_packed(prompt)
    assert plan["kv_peak_bytes"] >= _recorded(run, capsys)["peak_bytes"]


def test_an_assistant_models_cache_is_noted_with_its_bytes(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN assisted decoding (batch 1), the assistant a second tiny model with a cache of its own
    assistant = build_model(tiny_size(1, KV_HEADS)).eval()
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        _generate(model, 1, PROMPT, NEW, assistant_model=assistant)
    recorded = _recorded(run, capsys)
    # WHEN planned: THEN the plan is the main model's cache, and a note gives the assistant's bytes
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys)
    assert plan["kv_bytes"] == TOKEN_ROW * (PROMPT + NEW - 1)
    assistant_bytes = recorded["final_bytes"] - plan["kv_bytes"]
    assert assistant_bytes > 0
    assert any(f"{assistant_bytes:,} B" in note and "assistant" in note for note in plan["notes"])


def test_a_typed_dtype_plans_the_geometrys_weights_and_its_own_kv(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an fp32 run
    run = tmp_path / "run"
    record_generate(model, run, BATCH, PROMPT, NEW, profiler=False)
    # WHEN planned in bf16: THEN bf16 KV (half the run's), weights not the fp32 ones measured, and a note
    plan = _json(["plan", "--from-run", str(run), "--dtype", "bf16", "--json"], capsys)
    assert plan["request"]["kv_dtype"] == "bf16"
    assert plan["kv_bytes"] == TOKEN_ROW // 2 * BATCH * (PROMPT + NEW - 1)
    assert plan["weights_bytes"] < weights_bytes(model)
    assert any("--dtype bf16 is not the run's (fp32)" in note for note in plan["notes"])


def test_from_run_says_whose_setting_is_wrong_and_when_the_run_was_cut_short(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    record_generate(model, run, BATCH, PROMPT, NEW, profiler=False)
    # the run's 2 rows under a typed --beams 3: the batch named as the run's
    assert main(["plan", "--from-run", str(run), "--beams", "3"]) == 2
    assert "the run's batch (2 rows) is not a multiple of --beams 3" in capsys.readouterr().err
    # a run whose manifest still says running (its process was killed): a note says it was cut short
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["ended"] = {"status": "running"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys)
    assert any("cut short" in note for note in plan["notes"])
    # a run recorded without model=: told to plan with --preset or --config instead of --from-run
    bare = tmp_path / "bare"
    ids = torch.randint(3, 1000, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(bare, profiler=False):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0
        )
    assert main(["plan", "--from-run", str(bare)]) == 2
    assert "instead of --from-run" in capsys.readouterr().err


def test_from_run_of_a_hand_written_model_says_why_it_has_no_geometry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model passed as model= whose KV came through kvtrace.track has no geometry to plan from: the
    error names the model, not a missing model= (which the run did pass)."""

    class Decoder(torch.nn.Module):  # no config, no cache_k/cache_v: its KV is the caller's tensor
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(KV_HEADS * HEAD_DIM, 2 * KV_HEADS * HEAD_DIM, bias=False)

        def forward(self, x: torch.Tensor, kv: torch.Tensor, start: int) -> None:
            k, v = self.proj(x).view(x.shape[0], x.shape[1], 2, KV_HEADS, HEAD_DIM).unbind(2)
            kv[0, :, start : start + x.shape[1]] = k
            kv[1, :, start : start + x.shape[1]] = v

    decoder = Decoder()
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=decoder, profiler=False):
        kv = torch.zeros(LAYERS, 2, BATCH, PROMPT, KV_HEADS, HEAD_DIM)  # [layers, 2, batch, seq, heads, dim]
        for layer in range(LAYERS):
            decoder(torch.randn(BATCH, PROMPT, KV_HEADS * HEAD_DIM), kv[layer], 0)
            kvtrace.track(kv[layer, 0], layer=layer, kind="k", layout="bshd")
            kvtrace.track(kv[layer, 1], layer=layer, kind="v", layout="bshd")
    assert main(["plan", "--from-run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "its model (Decoder) has no Hugging Face config" in err, err
    assert "recorded without model=" not in err
    assert len(err.strip().splitlines()) == 1


class _BufferAttention(torch.nn.Module):
    """A hand-written decoder's attention (no Hugging Face config, no Meta `params`): K and V written in
    place into preallocated [max_batch, max_seq, kv_heads, head_dim] `cache_k`/`cache_v` buffers."""

    def __init__(self, max_batch: int, max_seq: int) -> None:
        super().__init__()
        self.wkv = torch.nn.Linear(KV_HEADS * HEAD_DIM, 2 * KV_HEADS * HEAD_DIM, bias=False)
        shape = (max_batch, max_seq, KV_HEADS, HEAD_DIM)
        self.register_buffer("cache_k", torch.zeros(shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, seq, _ = x.shape
        k, v = self.wkv(x).view(rows, seq, 2, KV_HEADS, HEAD_DIM).unbind(2)
        self.cache_k[:rows, start_pos : start_pos + seq] = k
        self.cache_v[:rows, start_pos : start_pos + seq] = v
        return x + self.cache_v[:rows, start_pos : start_pos + seq].reshape(rows, seq, -1)


class _BufferDecoder(torch.nn.Module):
    def __init__(self, max_batch: int, max_seq: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_BufferAttention(max_batch, max_seq) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, start_pos)
        return x


@pytest.mark.parametrize("profiler", [True, False], ids=["profiled", "unprofiled"])
def test_from_run_of_a_hand_written_decoder_plans_its_cache_buffers(
    profiler: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a hand-written decoder (no config, no params) with cache_k/cache_v of 4 rows x 32 positions,
    # run on 2 rows: a prefill of PROMPT tokens and NEW decode steps
    max_batch, max_seq = 4, 32
    decoder = _BufferDecoder(max_batch, max_seq).eval()
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=decoder, profiler=profiler):
        decoder(torch.randn(BATCH, PROMPT, KV_HEADS * HEAD_DIM), 0)
        for step in range(NEW):
            decoder(torch.randn(BATCH, 1, KV_HEADS * HEAD_DIM), PROMPT + step)
    buffers = LAYERS * 2 * max_batch * max_seq * KV_HEADS * HEAD_DIM * 4  # float32
    weights = LAYERS * (KV_HEADS * HEAD_DIM) * (2 * KV_HEADS * HEAD_DIM) * 4  # the wkv matrices, float32
    # WHEN planned from the run alone, and at bf16
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys)
    bf16 = _json(["plan", "--from-run", str(run), "--dtype", "bf16", "--json"], capsys)
    # THEN its buffers' geometry: 2 layers of KV_HEADS x HEAD_DIM, all of it the buffers' static cache of
    # max_batch rows and max_seq positions, and the weights measured (re-stored at bf16: half)
    assert plan["kv_bytes_per_token"] == TOKEN_ROW
    assert (plan["request"]["cache"], plan["request"]["batch"], plan["request"]["context"]) == (
        "static",
        max_batch,
        max_seq + 1,
    )
    assert (plan["kv_bytes"], plan["kv_peak_bytes"]) == (buffers, buffers)
    assert plan["weights_bytes"] == weights
    assert (bf16["kv_bytes"], bf16["weights_bytes"]) == (buffers // 2, weights // 2)
    said = [note for note in plan["notes"] if "cache buffers' geometry" in note]
    assert len(said) == 1 and f"{LAYERS} layers of K and V of {KV_HEADS} KV heads" in said[0], plan["notes"]
    assert "hidden size, MLP and vocabulary they do not say" in said[0]
    # a prefill's activations need the hidden size the buffers do not say: measured by the profiled run,
    # never estimated from a hidden size of 0
    assert plan["prefill_activations_bytes"] is None
