"""Decoder models other than Llama: their configs name the KV geometry differently (GPT-2's `n_layer`,
Falcon's `multi_query`, Qwen2-MoE's `sliding_window: 0`, Qwen3-Next's linear-attention layers). The
configs here are made and saved by transformers itself; the figures are the arithmetic
layers-with-KV x 2 x KV heads x head_dim x 4 bytes (fp32) per token.
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
from tests.tiny import plan_weighs_as_built, weights_bytes


def _plan_per_token(config: Any, folder: Path, capsys: pytest.CaptureFixture[str]) -> int:
    config.save_pretrained(folder)
    argv = ["plan", "--config", str(folder), "--dtype", "fp32", "--context", "100", "--gpu-memory", "1GiB"]
    argv.append("--json")
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    assert data["kv_bytes"] == 99 * data["kv_bytes_per_token"]  # generate() never writes the 100th token
    return int(data["kv_bytes_per_token"])


@pytest.mark.parametrize(
    ("make", "per_token"),
    [
        (lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256), 2 * 2 * 4 * 16 * 4),
        (
            lambda: transformers.GPTBigCodeConfig(
                n_embd=64, n_layer=2, n_head=4, vocab_size=256, multi_query=True
            ),
            2 * 2 * 1 * 16 * 4,
        ),
        (
            lambda: transformers.FalconConfig(
                hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=256, multi_query=True
            ),
            4 * 2 * 1 * 16 * 4,
        ),
        (
            lambda: transformers.Qwen2MoeConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, shared_expert_intermediate_size=32,
            ),
            4 * 2 * 2 * 16 * 4,
        ),
        (
            lambda: transformers.Qwen3NextConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, vocab_size=256, full_attention_interval=2, num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            ),
            2 * 2 * 2 * 32 * 4,  # 2 of its 4 layers are full attention; linear attention holds no KV
        ),
    ],
    ids=["gpt2", "gpt-bigcode-mqa", "falcon-mqa", "qwen2-moe-window-0", "qwen3-next-linear-layers"],
)  # fmt: skip
def test_plan_reads_the_kv_geometry_of_configs_transformers_writes(
    make: Any, per_token: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _plan_per_token(make(), tmp_path / "config", capsys) == per_token


def _plan_after_a_prompt(
    config: Any, folder: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Any, Any, dict[str, Any]]:
    """The model `config` builds, its cache after a 5-token prompt, and `plan --json` of the config at a
    context of 6: the prompt and one new token, which generate() never writes."""
    model = transformers.AutoModelForCausalLM.from_config(config)
    cache = transformers.DynamicCache(config=config)
    with torch.no_grad():
        model(torch.randint(3, 200, (1, 5)), past_key_values=cache, use_cache=True)
    config.save_pretrained(folder / "config")
    argv = ["plan", "--config", str(folder / "config"), "--dtype", "fp32", "--context", "6", "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    return model, cache, json.loads(capsys.readouterr().out)


def _record_generate(
    model: Any,
    run: Path,
    prompt: int = 11,
    new: int = 6,
    batch: int = 1,
    gpu_memory: int | None = None,
    profiler: bool = False,
    beams: int = 1,
    cache: str = "dynamic",
    use_cache: bool | None = None,
) -> Any:
    """Greedy generate() of `new` tokens after a `prompt`-token prompt (6 after 11 by default), recorded
    into `run` (output and cache); `beams` > 1 beam-searches, in `batch` x `beams` rows; `use_cache` passed
    on when given (None: the model's generation config decides)."""
    extra: dict[str, Any] = {} if cache == "dynamic" else {"cache_implementation": cache}
    if use_cache is not None:
        extra["use_cache"] = use_cache
    ids = torch.randint(3, 200, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=profiler, gpu_memory=gpu_memory):
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0, return_dict_in_generate=True, num_beams=beams, **extra,
        )  # fmt: skip


def _record_config(
    config: Any, folder: Path, capsys: pytest.CaptureFixture[str], **generate: Any
) -> tuple[Any, dict[str, Any]]:
    """`config` saved in `folder`/config (for `plan --config`), its model built with seed 0 and its
    `_record_generate(**generate)` recorded in `folder`/run: the output and the report's `kv`."""
    config.save_pretrained(folder / "config")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    out = _record_generate(model, folder / "run", **generate)
    assert main(["report", str(folder / "run"), "--json", "--no-export", "-q"]) == 0
    return out, json.loads(capsys.readouterr().out)["kv"]


def test_a_multi_query_falcon_run_has_one_kv_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a multi-query Falcon (4 query heads sharing 1 KV head) generating 6 tokens after 11
    config = transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=256, multi_query=True
    )
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(config).eval()
    run = tmp_path / "run"
    out = _record_generate(model, run)
    held = out.past_key_values.layers[0].keys
    assert held.shape[1] == 1
    # THEN the geometry and the arithmetic say 1 KV head, as the tensors do
    assert json.loads((run / "manifest.json").read_text())["model"]["num_kv_heads"] == 1
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    assert kv["bytes_per_token_expected"] == 4 * 2 * 1 * 16 * 4
    assert kv["final_bytes"] == 4 * 2 * 1 * 16 * 4 * 16  # 16 tokens held: 11 + 6 - 1


def _gemma2_window_8() -> Any:
    """Gemma 2 of 4 layers, head_dim 48: layers 0 and 2 slide (window 8), layers 1 and 3 keep every token."""
    return transformers.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=48, sliding_window=8, vocab_size=256, max_position_embeddings=256,
    )  # fmt: skip


def _diagnose_remedies(
    model: Any, run: Path, capsys: pytest.CaptureFixture[str], prompt: int = 11, new: int = 6
) -> dict[str, dict[str, Any]]:
    _record_generate(model, run, prompt, new)
    assert main(["diagnose", str(run), "--json"]) == 0
    return {r["kind"]: r for r in json.loads(capsys.readouterr().out)["remedies"]}


def test_diagnose_prices_a_shorter_context_by_the_layers_that_keep_every_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Gemma 2: layers 0 and 2 slide (window 8: they hold 7 tokens), layers 1 and 3 keep all 16
    config = _gemma2_window_8()
    torch.manual_seed(0)
    remedies = _diagnose_remedies(transformers.Gemma2ForCausalLM(config).eval(), tmp_path / "run", capsys)
    # THEN with no budget, the shortest context, 12 instead of 17 (the 11-token prompt and one new token; 16
    # tokens held), frees 5 tokens of the two global layers: 5 x 2 x 2 x 2 x 48 x 4 B
    context = remedies["context"]
    assert context["setting"] == 12 and context["saved_bytes"] == 5 * 2 * 2 * 2 * 48 * 4


# 4 layers x 2 KV heads x 16 dims, fp32, at batch 2: one layer's K and V of one token of both rows
_LAYER_TOKEN = 2 * 2 * 2 * 16 * 4  # 512 B
_SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=256, max_position_embeddings=256,
)  # fmt: skip


def _gemma2(**overrides: Any) -> Any:
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**{**_SMALL, **overrides})).eval()


def _diagnosis(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["diagnose", str(run), "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def _kv(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    return dict(json.loads(capsys.readouterr().out)["kv"])


def test_diagnose_prices_a_hybrid_caches_shorter_prompt_by_every_layer_at_prefill(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Gemma 2 (layers 0 and 2 slide at 8, 1 and 3 keep every token) at batch 2, a 12-token prompt and
    # 16 new tokens, profiled: the run peaks at prefill, where every layer holds the whole prompt
    _record_generate(_gemma2(sliding_window=8), tmp_path / "run", prompt=12, new=16, batch=2, profiler=True)
    # WHEN it is diagnosed
    diagnosis = _diagnosis(tmp_path / "run", capsys)
    assert (diagnosis["step"], diagnosis["step_phase"]) == (1, "prefill")
    assert diagnosis["kv_bytes"] == 4 * 12 * _LAYER_TOKEN
    remedies = {r["kind"]: r for r in diagnosis["remedies"]}
    # THEN fewer new tokens free nothing there (before: "A context of 10 tokens", shorter than the prompt),
    # and a shorter prompt frees a token of all 4 layers, the sliding ones included
    context = remedies["context"]
    assert (context["setting"], context["saved_bytes"]) == (None, 0)
    assert f"{4 * _LAYER_TOKEN / 1024:.2f} KiB of KV across the batch" in remedies["prompt"]["sentence"]
    # AND a prompt of 9 holds 3 tokens of that less at the same moment
    _record_generate(_gemma2(sliding_window=8), tmp_path / "p9", prompt=9, new=16, batch=2, profiler=True)
    shorter = _diagnosis(tmp_path / "p9", capsys)
    assert shorter["step_phase"] == "prefill"
    assert shorter["kv_bytes"] == diagnosis["kv_bytes"] - 3 * 4 * _LAYER_TOKEN
    # AND no window helps at prefill: every layer sliding at the model's 8 still holds the prompt, and its
    # first decode step makes layer 0's new 8 tokens before the prompt goes: (4 x 12 + 8) tokens
    window = remedies["sliding_window"]
    assert window["setting"] == 8 and window["saved_bytes"] == 0 and window["fits"] is None
    assert "28.00 KiB at its peak" in window["sentence"]
    slides = ["sliding_attention"] * 4
    every = _gemma2(sliding_window=8, layer_types=slides)
    _record_generate(every, tmp_path / "w8", prompt=12, new=16, batch=2)
    assert _kv(tmp_path / "w8", capsys)["peak_bytes"] == (4 * 12 + 8) * _LAYER_TOKEN


@pytest.mark.parametrize("hybrid", [False, True], ids=["llama", "gemma2-hybrid"])
def test_diagnose_prices_a_sliding_window_as_the_cache_that_slides_would_peak(
    hybrid: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Llama (no window), or Gemma 2 whose layers 0 and 2 slide at 8, at batch 2 after 12 + 16 tokens
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(**_SMALL)
    model = _gemma2(sliding_window=8) if hybrid else transformers.LlamaForCausalLM(llama)
    _record_generate(model.eval(), tmp_path / "run", prompt=12, new=16, batch=2)
    # WHEN it is diagnosed at its KV peak (27 tokens held)
    diagnosis = _diagnosis(tmp_path / "run", capsys)
    assert diagnosis["tokens_held"] == 27
    window = next(r for r in diagnosis["remedies"] if r["kind"] == "sliding_window")
    # THEN the window proposed is the shorter context's 21 tokens on Llama, but on Gemma 2 the model's own 8
    # (a larger one would grow its sliding layers): every layer keeps a storage of the window and makes
    # its new K and V before freeing the old, and a 12-token prompt beyond a window of 8 is held whole
    # until the first decode step
    size = 8 if hybrid else 21
    peak = (4 * max(12, size) + size) * _LAYER_TOKEN  # 28,672 B; 53,760 B
    assert window["setting"] == size
    assert window["saved_bytes"] == diagnosis["kv_bytes"] - peak
    held = 4 * size * _LAYER_TOKEN
    assert f"holds {held / 1024:.2f} KiB of KV at most" in window["sentence"]
    assert f"{peak / 1024:.2f} KiB at its peak" in window["sentence"]
    # AND recorded with every layer sliding at that window, the cache peaks and ends there
    torch.manual_seed(0)
    slides = ["sliding_attention"] * 4
    remedied = (
        _gemma2(sliding_window=size, layer_types=slides)
        if hybrid
        else transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=size, **_SMALL))
    )
    _record_generate(remedied.eval(), tmp_path / "slides", prompt=12, new=16, batch=2)
    kv = _kv(tmp_path / "slides", capsys)
    assert (kv["peak_bytes"], kv["final_bytes"]) == (peak, held)


def test_a_hybrid_caches_bytes_per_token_divide_each_layers_bytes_by_its_own_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Gemma 2 at batch 2 after 11 + 6 tokens: layers 1 and 3 keep all 16, layers 0 and 2 slide
    # (window 8: 7 tokens, in storages of 8 positions)
    config = _gemma2_window_8()
    torch.manual_seed(0)
    run = tmp_path / "run"
    _record_generate(transformers.Gemma2ForCausalLM(config).eval(), run, batch=2)
    last: dict[tuple[int, str], dict[str, Any]] = {}  # each layer's K and V as the raw log last shows them
    for line in (run / "kv_events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("shape"):
            last[(event["layer"], event["kv"])] = event
    # WHEN it is reported
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    # THEN a token of a row costs each layer's storages over that layer's own tokens, summed: the global
    # layers 2 x (K, V) x 2 heads x 48 x 4 B each, the sliding ones 8 positions' bytes over their 7 tokens
    assert {e["tokens"] for e in last.values()} == {7, 16}
    per_token = sum(e["storage_bytes"] / (e["tokens"] * 2) for e in last.values())
    assert per_token == pytest.approx(2 * (2 * 2 * 48 * 4) + 2 * (2 * 8 * 2 * 48 * 4 / 7))
    assert kv["bytes_per_token_measured"] == pytest.approx(per_token)
    (cache,) = kv["caches"]
    assert cache["bytes_per_token_measured"] == pytest.approx(per_token)
    # never every layer's bytes over the global layers' 16 tokens
    assert kv["bytes_per_token_measured"] != pytest.approx(kv["final_bytes"] / (16 * 2))


def test_diagnose_prices_a_token_of_window_by_the_arithmetic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Mistral with a window of 8 on every layer (7 tokens visible, 8 slots per storage), a prompt
    # shorter than the window and enough new tokens to slide: its peak is the window's, not the prompt's
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(_mistral_config()).eval()
    remedies = _diagnose_remedies(model, tmp_path / "run", capsys, prompt=4, new=12)
    # THEN a window one token shorter frees one token of every layer: 4 x 2 x 2 x 16 x 4 B
    window = remedies["sliding_window"]
    assert window["setting"] == 6 and window["saved_bytes"] == 4 * 2 * 2 * 16 * 4
    assert remedies["context"]["saved_bytes"] == 0


def _mistral_config() -> Any:
    """Mistral with a window of 8 on every layer; 4 layers x 2 KV heads x 16 dims: in fp32 one layer's K
    and V of one token are 2 x 2 x 16 x 4 = 256 B."""
    return transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, vocab_size=256, max_position_embeddings=256,
    )  # fmt: skip


def _meta_weights_bytes(model: torch.nn.Module) -> int:
    """`weights_bytes` of a model built on the meta device, whose storages have no address: each distinct
    parameter and buffer at its own dtype (transformers shares no storage between two of them but a tied
    lm_head, which `parameters()` lists once)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_diagnose_prices_a_shorter_prompt_where_sliding_layers_hold_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Mistral (window 8) at batch 2 with a 64-token prompt and 4 new tokens, under a budget of the
    # weights + 30,000 B of KV. At prefill every layer's storage is the whole prompt; at the first decode
    # step layer 0 makes its 8-token K and V before it lets go of it: the KV peaks at
    # (4 layers x 64 + 8) tokens x 2 rows x 256 B = 135,168 B.
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(_mistral_config()).eval()
    layer_token, per_token = 2 * 256, 4 * 2 * 256  # one layer, all layers: one token of both rows
    peak = (4 * 64 + 8) * layer_token
    budget = weights_bytes(model) + 30_000
    _record_generate(model, tmp_path / "run", prompt=64, new=4, batch=2, gpu_memory=budget)
    # WHEN the run is diagnosed
    assert main(["diagnose", str(tmp_path / "run"), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    remedies = {r["kind"]: r for r in diagnosis["remedies"]}
    shortfall = peak - 30_000
    assert (diagnosis["kv_bytes"], diagnosis["shortfall_bytes"]) == (peak, shortfall)
    # THEN a prompt shorter by the shortfall's tokens fits; a smaller window frees nothing at this moment
    cut = -(-shortfall // per_token)  # 52 tokens
    context = remedies["context"]
    assert context["fits"] is True and context["saved_bytes"] == cut * per_token
    assert f"A prompt {cut} tokens shorter" in context["sentence"]
    assert remedies["sliding_window"]["saved_bytes"] == 0 and remedies["sliding_window"]["fits"] is False
    # AND batch 1 is not enough, but not because the KV is not the whole problem (132 KiB > the shortfall)
    batch = remedies["batch"]
    assert batch["saved_bytes"] == peak // 2 and batch["fits"] is False
    assert "not the whole problem" not in batch["sentence"]
    # AND the remedy holds: recorded with a prompt that much shorter, the run fits the same budget
    _record_generate(model, tmp_path / "short", prompt=64 - cut, new=4, batch=2, gpu_memory=budget)
    assert main(["report", str(tmp_path / "short"), "--json", "--no-export", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kv"]["peak_bytes"] == peak - cut * per_token and report["budget"]["crossed"] is False
    # AND no int4 QuantizedCache is offered: transformers refuses it for a model with sliding layers
    (int4,) = [r for r in diagnosis["remedies"] if r["kind"] == "quantized_kv" and r["setting"] == 4]
    assert int4["saved_bytes"] is None and int4["fits"] is None
    assert "has 4 sliding layers (it raises ValueError)" in int4["sentence"]
    with pytest.raises(ValueError, match="only full attention layers"):
        transformers.QuantizedCache(backend="quanto", config=model.config)


@pytest.mark.parametrize(
    ("make", "kv_bytes", "capped"),
    [
        (
            lambda: transformers.MistralConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=8, vocab_size=256,
            ),
            4 * 8 * (2 * 2 * 16 * 4),  # every layer keeps its window of 8
            True,
        ),
        (
            lambda: transformers.Gemma2Config(
                hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=48, sliding_window=8, vocab_size=256,
            ),
            (2 * 39 + 2 * 8) * (2 * 2 * 48 * 4),  # 2 global layers keep all 39 written, 2 sliding ones 8
            False,
        ),
    ],
    ids=["mistral-all-sliding", "gemma2-hybrid"],
)  # fmt: skip
def test_plan_keeps_the_models_own_windows(
    make: Any, kv_bytes: int, capped: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make().save_pretrained(tmp_path / "config")
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--context", "40", "--json"]
    assert main([*argv, "--prompt", "8"]) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    assert data["kv_bytes"] == kv_bytes
    assert (data["max_context"] is None) == capped  # a cache that only slides never outgrows its window
    # without a prompt the worst one is planned: it grows with the context, and the sliding layers hold it
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    assert data["max_context"] is not None and data["prompt_tokens"] == 38


@pytest.mark.parametrize(
    "make",
    [
        lambda: transformers.Gemma2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=48, sliding_window=8, vocab_size=256,
        ),
        lambda: transformers.Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=2,
            vocab_size=256,
        ),
        lambda: transformers.Llama4TextConfig(
            hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=8,
            num_local_experts=2, vocab_size=256,
        ),
    ],
    ids=["gemma2-sliding-first", "qwen2-full-first", "llama4-chunked"],
)  # fmt: skip
def test_plan_replays_a_step_in_the_models_layer_order(
    make: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a model whose layers slide or keep every token, in the order its config lists, and a 30-token
    # prompt with 2 new tokens: at the one decode step the sliding layers let go of the prompt, and a full
    # layer's copy peaks higher when it comes before they do (Qwen2) than after (Gemma 2)
    config = make()
    _, kv = _record_config(config, tmp_path, capsys, prompt=30, new=2, batch=2)
    # WHEN that run is planned
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--batch", "2", "--json"]
    assert main([*argv, "--prompt", "30", "--context", "32"]) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN its peak, prefill and final KV are the recording's
    assert (planned["kv_peak_bytes"], planned["kv_bytes"]) == (kv["peak_bytes"], kv["final_bytes"])
    head_dim = getattr(config, "head_dim", None) or 64 // 4
    per_layer_token = 2 * 2 * head_dim * 4 * 2  # K and V, 2 heads, 2 rows, fp32
    assert planned["kv_prefill_bytes"] == 4 * 30 * per_layer_token
    # ... and the run's manifest keeps the window its layers slide at (Llama 4's chunk, 8)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model"]["sliding_window"] == 8


def test_diagnose_offers_a_llama4s_full_layers_its_chunk_as_their_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Llama 4 whose 3 RoPE layers attend in chunks of 8 and whose 4th (NoPE) layer keeps every token
    config = transformers.Llama4TextConfig(
        hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=8,
        num_local_experts=2, vocab_size=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _record_generate(model, tmp_path / "run", prompt=20, new=6, batch=2)
    # WHEN its peak is diagnosed
    assert main(["diagnose", str(tmp_path / "run"), "--json"]) == 0
    remedies = json.loads(capsys.readouterr().out)["remedies"]
    # THEN the window proposed is the chunk the 3 layers already keep, for the one layer that does not
    window = next(r for r in remedies if r["kind"] == "sliding_window")
    assert window["setting"] == 8
    assert window["sentence"].startswith(
        "Making its 1 full-attention layer slide at the model's own window of 8 tokens (a larger "
        "sliding_window would grow its 3 sliding layers)"
    )


def test_the_arithmetic_of_a_latent_attention_cache_follows_its_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN DeepSeek-V3 (multi-head latent attention): its cache holds one K of kv_lora_rank + ... width and
    # one V of its own width per layer, not num_key_value_heads x head_dim of each
    config = transformers.DeepseekV3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, max_position_embeddings=256, q_lora_rank=None, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=24, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    run = tmp_path / "run"
    out = _record_generate(model, run)
    layers = out.past_key_values.layers
    per_token = sum(
        (layer.keys.shape[1] * layer.keys.shape[3] + layer.values.shape[1] * layer.values.shape[3]) * 4
        for layer in layers
    )
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    # THEN the arithmetic is the tensors' widths, and the measured figure agrees with it
    assert kv["bytes_per_token_expected"] == per_token == kv["bytes_per_token_measured"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: transformers.MixtralConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, num_local_experts=4,
        ),
        lambda: transformers.Qwen2MoeConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, num_experts=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, decoder_sparse_step=2,
        ),
        lambda: transformers.Qwen3MoeConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, num_experts=4, moe_intermediate_size=32,
            num_experts_per_tok=2, mlp_only_layers=[0],
        ),
        lambda: transformers.DeepseekV3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=256, q_lora_rank=24, kv_lora_rank=32, qk_rope_head_dim=16,
            qk_nope_head_dim=32, v_head_dim=24, n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2,
            moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
        ),
    ],
    ids=["mixtral", "qwen2-moe-sparse-step", "qwen3-moe-dense-first", "deepseek-v3-latent"],
)  # fmt: skip
def test_plan_weighs_every_expert_and_latent_projection(
    make: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a mixture-of-experts config (and DeepSeek's latent attention) as transformers saves it
    # WHEN it is planned
    model, cache, data = _plan_after_a_prompt(make(), tmp_path, capsys)
    # THEN the weights are the model's own parameters, every expert resident, and its buffers (RoPE's, the
    # expert-score bias of DeepSeek-V3), and the KV what its cache holds
    assert data["weights_bytes"] == weights_bytes(model)
    held = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    assert data["kv_bytes"] == 4 * held


def _published_config(model_type: str, **fields: Any) -> dict[str, Any]:
    """A small config.json as the Hub publishes Gemma 2's and 3's: no `layer_types` (their config classes
    derive them), 64 wide, 2 KV heads of 16, window 8, 256-token vocabulary."""
    return {
        "model_type": model_type, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 512,
        "sliding_window": 8, "query_pre_attn_scalar": 16, **fields,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "held_tokens"),
    [
        # Gemma2Config alternates from a sliding layer 0: layers 0 and 2 hold their window's storage (the
        # last step's 7 kept + 1 new), layers 1 and 3 all 39 tokens written
        (_published_config("gemma2", num_hidden_layers=4), 8 + 39 + 8 + 39),
        # Gemma3TextConfig: every `sliding_window_pattern`-th layer (6 by default) keeps every token
        (_published_config("gemma3_text", num_hidden_layers=6), 5 * 8 + 39),
        (_published_config("gemma3_text", num_hidden_layers=6, sliding_window_pattern=3), 2 * (2 * 8 + 39)),
    ],
    ids=["gemma2", "gemma3-default-pattern", "gemma3-pattern-3"],
)
def test_plan_reads_the_layer_types_a_published_config_leaves_out(
    raw: dict[str, Any], held_tokens: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Gemma config.json without `layer_types`, and the model transformers builds from it
    # generating 20 tokens after a 20-token prompt
    (tmp_path / "config.json").write_text(json.dumps(raw))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**raw)).eval()
    out = _record_generate(model, tmp_path / "run", prompt=20, new=20)
    assert main(["report", str(tmp_path / "run"), "--json", "--no-export", "-q"]) == 0
    recorded = json.loads(capsys.readouterr().out)["kv"]
    # WHEN it is planned at that prompt and context
    argv = ["plan", "--config", str(tmp_path / "config.json"), "--dtype", "fp32", "--context", "40"]
    assert main([*argv, "--prompt", "20", "--json"]) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN its KV is what the cache's storages hold (2 x 2 KV heads x 16 x 4 B per layer and token), and
    # its peak the recording's
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _cache_tensors(out)}
    assert planned["kv_bytes"] == sum(storages.values()) == held_tokens * 2 * 2 * 16 * 4
    assert planned["kv_peak_bytes"] == recorded["peak_bytes"]


def _cache_tensors(out: Any) -> list[torch.Tensor]:
    return [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]


# Published configs that leave out what their family's config class derives (transformers 5.24):
# `layer_types`, and `use_sliding_window` (off for Qwen's), with the other keys that steer the rule
@pytest.mark.parametrize(
    ("model_type", "fields"),
    [
        ("gemma2", {}),
        ("vaultgemma", {}),
        ("gpt_oss", {"num_local_experts": 4}),
        ("gemma3_text", {}),
        ("gemma3_text", {"sliding_window_pattern": 4}),
        ("cohere2", {}),
        ("cohere2", {"sliding_window_pattern": 3}),
        ("exaone4", {"sliding_window_pattern": 2}),
        ("olmo3", {}),
        ("qwen2", {"use_sliding_window": True, "max_window_layers": 5}),
        ("qwen2", {}),  # a window size without use_sliding_window: no window
        ("qwen3", {"use_sliding_window": True, "max_window_layers": 0}),
        ("qwen2_moe", {"use_sliding_window": True, "max_window_layers": 7, "num_experts": 4}),
        ("qwen3_next", {"full_attention_interval": 3, "num_experts": 4}),
        ("smollm3", {"use_sliding_window": True}),
        ("llama4_text", {"attention_chunk_size": 6}),  # its RoPE layers chunk, at 6 (not at the window)
        ("llama4_text", {"no_rope_layer_interval": 3, "num_local_experts": 2}),  # chunks of 8192
        ("mistral", {}),  # no rule: every layer slides
    ],
)
def test_plan_derives_the_layer_types_a_config_leaves_out_as_transformers_does(
    model_type: str, fields: dict[str, Any], tmp_path: Path
) -> None:
    from transformers.cache_utils import get_layer_types_and_kwargs

    from analyzers.planning.hf_config import geometry_from_config

    # GIVEN a 12-layer config.json of the family with a window of 8 and no `layer_types`
    raw = {
        "model_type": model_type, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 12,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
        "sliding_window": 8, **fields,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = transformers.AutoConfig.for_model(**raw)
    # THEN the layers holding KV, and which of them keep only a window, are those its caches are built with
    types, per_layer = get_layer_types_and_kwargs(config)
    if isinstance(per_layer, dict):  # the oracle is each layer's kwargs, which older releases do not give
        why = f"transformers {transformers.__version__} gives one kwargs dict for all layers, not each one's"
        pytest.skip(why)
    windows = [
        kwargs.get("sliding_window")
        for t, kwargs in zip(types, per_layer, strict=True)
        if t != "linear_attention"
    ]
    expected = [bool(window) for window in windows]  # Qwen2-MoE's 0: none
    geom = geometry_from_config(tmp_path)
    slides = geom.layer_slides or (True,) * geom.layers_with_kv
    assert [geom.sliding_window is not None and slide for slide in slides] == expected
    assert {window for window in windows if window} <= {geom.sliding_window}


# The geometry of google/gemma-7b's and google/gemma-2-9b's published config.json, which leave
# `tie_word_embeddings` out (GemmaConfig and Gemma2Config tie), and a tiny Gemma 3
_GEMMA_7B = {
    "model_type": "gemma", "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "vocab_size": 256000,
}  # fmt: skip
_GEMMA_2_9B = {
    "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
    "sliding_window": 4096, "query_pre_attn_scalar": 256,
}  # fmt: skip


# Bloom as its older configs have it: the width as `n_embed` (BloomConfig reads it as hidden_size), and an
# `n_inner` its MLP ignores (always 4x); no `tie_word_embeddings` (BloomConfig ties them)
_BLOOM = {
    "model_type": "bloom", "n_embed": 64, "n_layer": 2, "num_attention_heads": 4, "n_inner": 96,
    "vocab_size": 256,
}  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [_GEMMA_7B, _GEMMA_2_9B, _published_config("gemma3_text", num_hidden_layers=6), _BLOOM],
    ids=["gemma-7b", "gemma-2-9b", "gemma3", "bloom-n-embed"],
)
def test_plan_weighs_a_published_config_as_transformers_builds_it(
    raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Gemma (or Bloom) config.json that does not say whether the lm_head is tied, and the model
    # transformers builds from it (on the meta device: only the shapes)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # WHEN it is planned in bf16
    assert main(["plan", "--config", str(tmp_path / "config.json"), "--json"]) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN the weights are the model's parameters at 2 B each (the lm_head is the embedding matrix, counted
    # once, and Gemma 2's and 3's four norms per layer are there) and its buffers: RoPE's float32 tables,
    # Gemma's embedding scale
    assert config.tie_word_embeddings is True
    assert planned["weights_bytes"] == _meta_weights_bytes(model)
    # ... and the plan does not call them an estimate
    assert not [note for note in planned["notes"] if note.startswith("weights:")]


def test_plan_weighs_gpt_neo_2_7b_with_the_causal_mask_each_layer_keeps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN EleutherAI/gpt-neo-2.7B's geometry, and the model transformers builds from it in bf16 (on the
    # meta device: only the shapes)
    config = transformers.GPTNeoConfig(
        hidden_size=2560, num_layers=32, num_heads=20, max_position_embeddings=2048, vocab_size=50257,
        attention_types=[[["global", "local"], 16]],
    )  # fmt: skip
    config.save_pretrained(tmp_path / "config")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # WHEN it is planned in bf16
    assert main(["plan", "--config", str(tmp_path / "config"), "--json"]) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN the weights are its parameters at 2 B each and, in each of its 32 layers, a causal mask of
    # 2048 x 2048 bools (1 B each): 128 MiB beside the parameters
    parameters = sum(p.numel() for p in model.parameters())
    assert planned["weights_bytes"] == 2 * parameters + 32 * 2048 * 2048 == _meta_weights_bytes(model)


def test_plan_says_its_weights_are_an_estimate_for_a_family_it_does_not_lay_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN MiniCPM3 (its scaled embeddings' int64 buffer), a layout the planner does not model exactly
    config = transformers.MiniCPM3Config(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16,
    )  # fmt: skip
    config.save_pretrained(tmp_path / "config")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    true_bytes = _meta_weights_bytes(model)
    # WHEN it is planned
    assert main(["plan", "--config", str(tmp_path / "config"), "--json"]) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN its weights, weighed as a Llama's, are not the model's, and the plan says they are an estimate
    assert planned["weights_bytes"] != true_bytes
    assert any("'minicpm3' is weighed as a Llama-style decoder" in note for note in planned["notes"])


def test_plan_refuses_a_family_that_keeps_no_kv_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN GPT-1, whose transformers model takes no past_key_values: each step runs the whole context again
    transformers.OpenAIGPTConfig(**_GPT2).save_pretrained(tmp_path / "config")
    model = transformers.AutoModelForCausalLM.from_config(transformers.OpenAIGPTConfig(**_GPT2))
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 5)), use_cache=True)
    assert getattr(out, "past_key_values", None) is None
    # WHEN it is planned THEN it is refused in one line (it planned 1,024 B of KV per token it never holds)
    assert main(["plan", "--config", str(tmp_path / "config")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_type 'openai-gpt' keeps no KV cache in transformers" in err


def test_plan_ties_the_lm_head_when_the_familys_config_class_does() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from analyzers.planning.config_defaults import tied_by_default

    # GIVEN every causal-LM family transformers knows, and its config class's `tie_word_embeddings`
    # default (a class without one is untied: PreTrainedModel reads it with getattr(..., False))
    checked = 0
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config_class = transformers.models.auto.configuration_auto.CONFIG_MAPPING[model_type]
        field = getattr(config_class, "__dataclass_fields__", {}).get("tie_word_embeddings")
        default = field.default if field is not None else False
        # THEN the planner's default is the same
        assert tied_by_default(model_type) is bool(default), model_type
        checked += 1
    assert checked > 100


def test_a_new_decoder_architecture_falcon_counts_the_kv_heads_its_cache_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Falcon-40B-style config (new decoder architecture, 4 query heads, 2 KV heads of 16), whose
    # attention in transformers before 5.25 repeated each KV head for its query heads before writing the
    # cache (4 held), and from 5.25 caches its own 2, generating 6 after 11
    config = transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, vocab_size=256,
        new_decoder_architecture=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(config).eval()
    run = tmp_path / "run"
    out = _record_generate(model, run)
    shapes = {tuple(t.shape) for t in _cache_tensors(out)}
    assert len(shapes) == 1
    held = next(iter(shapes))[1]
    assert next(iter(shapes)) == (1, held, 16, 16) and held in (2, 4)
    per_token = 2 * 2 * held * 16 * 4  # layers x K and V x the heads held x head_dim x fp32
    # WHEN the run is reported
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    # THEN the arithmetic counts the heads the cache holds, as its tensors do
    assert json.loads((run / "manifest.json").read_text())["model"]["num_kv_heads"] == held
    assert kv["bytes_per_token_expected"] == per_token
    assert kv["final_bytes"] == per_token * 16
    # and a plan (no transformers at hand: the newest's) holds the model's 2, with a note for older ones,
    # as vLLM does
    config.save_pretrained(tmp_path / "config")
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--context", "17", "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    assert planned["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert planned["kv_bytes"] * held // 2 == sum(t.nbytes for t in _cache_tensors(out))
    said = "an earlier transformers caches one per query head, 4: 2x this KV"
    assert any(said in note for note in planned["notes"])
    assert main([*argv, "--engine", "vllm"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4


_FALCON = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}
_GPT2 = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "n_positions": 96}
_OPT = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 160, "vocab_size": 256,
    "max_position_embeddings": 96,
}  # fmt: skip
_LLAMA = {
    "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256,
}  # fmt: skip
_MHA = {k: v for k, v in _LLAMA.items() if k != "num_key_value_heads"}  # GPT-NeoX has no GQA
_LLAMA4 = {**_LLAMA, "num_hidden_layers": 4, "head_dim": 16, "intermediate_size_mlp": 96}
# Gemma 3n and 4: 6 layers, every other one full, head_dim 16, per-layer inputs (PLE) of 8 from 128 rows
_GEMMA = {
    **_LLAMA, "num_hidden_layers": 6, "head_dim": 16, "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": 128, "layer_types": ["sliding_attention", "full_attention"] * 3,
}  # fmt: skip
_GEMMA4 = {**_GEMMA, "global_head_dim": 32}  # its full layers twice as wide
_CTRL = {"n_embd": 64, "n_layer": 2, "n_head": 4, "dff": 160, "vocab_size": 256, "n_positions": 96}
_XGLM = {
    "d_model": 64, "num_layers": 2, "attention_heads": 4, "ffn_dim": 160, "vocab_size": 256,
    "max_position_embeddings": 96,
}  # fmt: skip
_BLOOM_SHAPE = {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256}
_MPT = {"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256, "max_seq_len": 96}
# GPT-Neo: global and local layers (the local ones attend to the last window_size tokens)
_GPT_NEO = {
    "hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 256, "max_position_embeddings": 96,
    "attention_types": [[["global", "local"], 1]], "window_size": 2,
}  # fmt: skip
_LATENT = {
    "q_lora_rank": 24, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 24,
    "n_routed_experts": 4, "n_shared_experts": 2, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, **_MHA, "num_key_value_heads": 4,
}  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        transformers.GPT2Config(**_GPT2),
        transformers.GPT2Config(**_GPT2, n_inner=96, tie_word_embeddings=False),
        transformers.GPTBigCodeConfig(**_GPT2, multi_query=True),
        transformers.GPTBigCodeConfig(**_GPT2, multi_query=False, n_inner=96),
        transformers.FalconConfig(**_FALCON, multi_query=True),  # Falcon-7B: one shared norm per layer
        transformers.FalconConfig(**_FALCON, multi_query=False, parallel_attn=False, bias=True, alibi=True),
        transformers.FalconConfig(**_FALCON, new_decoder_architecture=True, num_kv_heads=2),  # 40B: 2 norms
        transformers.FalconConfig(**_FALCON, new_decoder_architecture=True, num_ln_in_parallel_attn=1),
        transformers.FalconConfig(**_FALCON, ffn_hidden_size=96, tie_word_embeddings=False),
        transformers.OPTConfig(**_OPT),
        # OPT-350m's shape: embeddings narrower than the layers, norms after the blocks, no final norm
        transformers.OPTConfig(**_OPT, word_embed_proj_dim=32, do_layer_norm_before=False),
        transformers.OPTConfig(**_OPT, enable_bias=False, layer_norm_elementwise_affine=False),
        transformers.OPTConfig(**_OPT, _remove_final_layer_norm=True, tie_word_embeddings=False),
        transformers.LlamaConfig(**_LLAMA),
        transformers.MistralConfig(**_LLAMA, sliding_window=8),
        transformers.Qwen2Config(**_LLAMA),
        transformers.Qwen3Config(**_LLAMA, head_dim=32),
        transformers.Phi3Config(**_LLAMA, pad_token_id=0),
        transformers.GemmaConfig(**_LLAMA, head_dim=32),
        transformers.Gemma2Config(**_LLAMA, head_dim=32),
        transformers.Gemma3TextConfig(**_LLAMA, head_dim=32),
        # Llama-style blocks with the biases their config asks for: q, k, v and output; every MLP matrix
        transformers.LlamaConfig(**_LLAMA, attention_bias=True),
        transformers.LlamaConfig(**_LLAMA, mlp_bias=True, tie_word_embeddings=True),
        transformers.Qwen3Config(**_LLAMA, head_dim=32, attention_bias=True),
        transformers.Gemma2Config(**_LLAMA, head_dim=32, attention_bias=True),
        transformers.Qwen2MoeConfig(**_LLAMA, num_experts=4, moe_intermediate_size=32, qkv_bias=False),
        transformers.DeepseekV2Config(**_LATENT, attention_bias=True, mlp_bias=True),
        transformers.DeepseekV3Config(**{**_LATENT, "q_lora_rank": None}, attention_bias=True),
        # GPT-NeoX (Pythia): a fused qkv, an up/down MLP with biases, two LayerNorms a layer
        transformers.GPTNeoXConfig(**_MHA),
        transformers.GPTNeoXConfig(**_MHA, attention_bias=False, tie_word_embeddings=True),
        # Bloom: a LayerNorm of the embeddings, a 4x MLP; tied lm_head
        transformers.BloomConfig(**_BLOOM_SHAPE),
        transformers.BloomConfig(
            hidden_size=96, n_layer=3, n_head=6, vocab_size=128, tie_word_embeddings=False
        ),
        # Phi (phi-2): one LayerNorm a layer, biases everywhere, the lm_head's too; LayerNorms of q and k
        transformers.PhiConfig(**_MHA),
        transformers.PhiConfig(**_LLAMA, qk_layernorm=True, tie_word_embeddings=True),
        # Llama 4: fused experts, a router and a shared expert on its MoE layers (Scout: all; Maverick:
        # every other one), a dense MLP of intermediate_size_mlp on the rest; its qk norm has no weights
        transformers.Llama4TextConfig(**_LLAMA4, num_local_experts=4),
        transformers.Llama4TextConfig(**_LLAMA4, num_local_experts=4, interleave_moe_layer_step=2),
        transformers.Llama4TextConfig(**_LLAMA4, num_local_experts=3, moe_layers=[0, 3]),
        # GPT-J and CodeGen: Phi's shape, but q, k, v (fused in CodeGen) and the output unbiased
        transformers.GPTJConfig(**_GPT2, rotary_dim=8),
        transformers.GPTJConfig(**_GPT2, rotary_dim=8, n_inner=96, tie_word_embeddings=True),
        transformers.CodeGenConfig(**_GPT2, rotary_dim=8),
        # StableLM: LayerNorms; q, k, v biases, per-head qk LayerNorms, one norm for the parallel residual
        transformers.StableLmConfig(**_LLAMA),
        transformers.StableLmConfig(
            **_LLAMA, use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True
        ),
        # StarCoder2: an up/down MLP, LayerNorms, `use_bias` on every projection; tied
        transformers.Starcoder2Config(**_LLAMA),
        transformers.Starcoder2Config(**_LLAMA, use_bias=False, tie_word_embeddings=False),
        # OLMo: norms without weights; OLMo 2, 3 and OLMoE: q and k normed with a weight per head
        transformers.OlmoConfig(**_LLAMA),
        transformers.OlmoConfig(**_LLAMA, attention_bias=True),
        transformers.Olmo2Config(**_LLAMA),
        transformers.Olmo3Config(**_LLAMA, sliding_window=8),
        transformers.OlmoeConfig(**_LLAMA, num_experts=4, num_experts_per_tok=2),
        # Cohere (Command R): one weight-only LayerNorm a layer, per-head qk norms when asked; tied
        transformers.CohereConfig(**_LLAMA),
        transformers.CohereConfig(**_LLAMA, use_qk_norm=True, attention_bias=True),
        transformers.Cohere2Config(**_LLAMA, sliding_window=8),
        transformers.GraniteConfig(**_LLAMA, attention_bias=True, mlp_bias=True),
        transformers.GraniteMoeConfig(**_LLAMA, num_local_experts=4, attention_bias=True),
        transformers.PhimoeConfig(**_LLAMA, num_local_experts=4, attention_bias=True, lm_head_bias=True),
        # MPT: its own names (d_model, n_heads, n_layers), a 4x up/down MLP whatever expansion_ratio says
        transformers.MptConfig(**_MPT, expansion_ratio=2),
        # Nemotron, Arcee, Apertus: up/down MLPs; Nemotron's LayerNorms biased, Apertus' xIELU learned
        transformers.NemotronConfig(**_LLAMA),
        transformers.NemotronConfig(**_LLAMA, attention_bias=True, mlp_bias=True),
        transformers.ArceeConfig(**_LLAMA),
        transformers.ArceeConfig(**_LLAMA, mlp_bias=True, tie_word_embeddings=True),
        transformers.ApertusConfig(**_LLAMA),
        transformers.ApertusConfig(**_LLAMA, attention_bias=True, hidden_act="silu"),
        # Persimmon: biased fused q, k, v and MLP, LayerNorms, per-head-dim qk LayerNorms unless turned off
        transformers.PersimmonConfig(**_MHA),
        transformers.PersimmonConfig(**_MHA, qk_layernorm=False),
        # Granite-MoE with its ungated shared expert of shared_intermediate_size
        transformers.GraniteMoeSharedConfig(**_LLAMA, num_local_experts=4, shared_intermediate_size=48),
        transformers.GraniteMoeSharedConfig(**_LLAMA, num_local_experts=4, attention_bias=True),
        # GPT-OSS: biased attention with a sink per head, biased experts and router
        transformers.GptOssConfig(**_LLAMA, num_local_experts=4, head_dim=16),
        transformers.GptOssConfig(**_LLAMA, num_local_experts=4, head_dim=24, attention_bias=False),
        # GPT-Neo: a 4x MLP when intermediate_size is None, learned positions, only the output biased
        transformers.GPTNeoConfig(**_GPT_NEO),
        transformers.GPTNeoConfig(**_GPT_NEO, intermediate_size=96, tie_word_embeddings=False),
        # JetMoE: attention experts of kv_channels-wide heads, a shared K-V projection, MoE with a bias
        transformers.JetMoeConfig(**_LLAMA, num_local_experts=4, kv_channels=24),
        # Gemma 4: full layers global_head_dim wide, without a v projection under attention_k_eq_v; the
        # KV-sharing layers without k and v projections (their MLP twice as wide when asked); per-layer
        # inputs; experts beside each dense MLP
        transformers.Gemma4TextConfig(**_GEMMA4),
        transformers.Gemma4TextConfig(**_GEMMA4, attention_k_eq_v=True, num_global_key_value_heads=1),
        transformers.Gemma4TextConfig(
            **{**_GEMMA4, "hidden_size_per_layer_input": 0}, num_kv_shared_layers=2, use_double_wide_mlp=True,
            attention_k_eq_v=True,
        ),
        transformers.Gemma4TextConfig(
            **_GEMMA4, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
            attention_bias=True,
        ),
        # Gemma 3n: per-layer MLP widths and inputs, AltUp, LAuReL, KV-sharing layers
        transformers.Gemma3nTextConfig(
            **{**_GEMMA, "intermediate_size": [160, 96, 128, 160, 96, 64]}, num_kv_shared_layers=2,
            altup_num_inputs=3, laurel_rank=8,
        ),
        transformers.Gemma3nTextConfig(
            **{**_GEMMA, "intermediate_size": 96}, attention_bias=True, num_kv_shared_layers=0
        ),
        # CTRL (its own dff), XGLM (its attention_heads): sinusoidal positions; BioGPT's learned ones 2 rows
        # longer; biases and LayerNorms everywhere, CTRL's lm_head biased too
        transformers.CTRLConfig(**_CTRL),
        transformers.CTRLConfig(**_CTRL, tie_word_embeddings=False),
        transformers.BioGptConfig(**_MHA, max_position_embeddings=96),
        transformers.BioGptConfig(**_MHA, tie_word_embeddings=False),
        transformers.XGLMConfig(**_XGLM),
        # EXAONE 4: q and k norms; Seed-OSS and Helium: attention_bias on q, k and v alone; BitNet: norms of
        # the attention's output and the MLP's intermediate units; DiffLlama: four lambdas of head_dim a layer
        transformers.Exaone4Config(**_LLAMA, head_dim=16),
        transformers.SeedOssConfig(**_LLAMA, head_dim=16),
        transformers.SeedOssConfig(
            **_LLAMA, head_dim=16, attention_bias=False, attention_out_bias=True, mlp_bias=True
        ),
        transformers.HeliumConfig(**_LLAMA, head_dim=16, attention_bias=True, mlp_bias=True),
        transformers.BitNetConfig(**_LLAMA, head_dim=16, attention_bias=True),
        transformers.DiffLlamaConfig(**_LLAMA, head_dim=16, attention_bias=True),
    ],
    ids=[
        "gpt2", "gpt2-untied", "gpt-bigcode-mqa", "gpt-bigcode-mha", "falcon-7b", "falcon-sequential-bias",
        "falcon-40b", "falcon-new-one-norm", "falcon-untied", "opt", "opt-350m", "opt-no-bias-no-affine",
        "opt-no-final-norm", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3",
        "llama-attention-bias", "llama-mlp-bias-tied", "qwen3-attention-bias", "gemma2-attention-bias",
        "qwen2-moe-no-qkv-bias", "deepseek-v2-biases", "deepseek-v3-attention-bias", "gpt-neox",
        "gpt-neox-no-attention-bias-tied", "bloom", "bloom-untied", "phi", "phi-qk-layernorm-tied",
        "llama4-scout", "llama4-maverick", "llama4-moe-layers-listed", "gptj", "gptj-tied-n-inner", "codegen",
        "stablelm", "stablelm-qkv-bias-qk-norm-parallel", "starcoder2", "starcoder2-no-bias-untied", "olmo",
        "olmo-attention-bias", "olmo2", "olmo3", "olmoe", "cohere", "cohere-qk-norm-attention-bias",
        "cohere2", "granite-biases", "granitemoe", "phimoe-biases", "mpt", "nemotron", "nemotron-biases",
        "arcee", "arcee-mlp-bias-tied", "apertus", "apertus-attention-bias-silu", "persimmon",
        "persimmon-no-qk-layernorm", "granitemoeshared", "granitemoeshared-no-shared-attention-bias",
        "gpt-oss", "gpt-oss-no-attention-bias", "gpt-neo", "gpt-neo-n-inner-untied", "jetmoe", "gemma4",
        "gemma4-k-eq-v", "gemma4-kv-shared-double-wide-no-ple", "gemma4-moe-attention-bias", "gemma3n",
        "gemma3n-attention-bias-defaults", "ctrl", "ctrl-untied", "biogpt", "biogpt-untied", "xglm",
        "exaone4", "seed-oss", "seed-oss-output-mlp-bias", "helium-biases", "bitnet-attention-bias",
        "diffllama-attention-bias",
    ],
)  # fmt: skip
def test_plan_weighs_each_family_as_transformers_builds_it(
    config: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a config as transformers saves it, and the model it builds from it in fp32 and in bf16
    # WHEN it is planned in that dtype
    # THEN the weights are what the recorder counts: every distinct storage of its parameters (a tied
    # lm_head once: GPT-2's, Falcon's, OPT's, GPT-NeoX's, Bloom's, Phi's, GPT-J's, StarCoder2's and MPT's
    # MLPs have two matrices, and their biases, LayerNorms' biases (none in OLMo, which has no norm
    # weights), learned positions (OPT's 2 rows longer), OPT's projections in and out, Bloom's embedding
    # norm, Phi's and GPT-J's lm_head bias, the per-head qk norms of StableLM, OLMo 2 and Cohere, and the
    # biases a config asks for are there; DeepSeek's routers stay float32) and of its buffers, each at
    # its own dtype: RoPE's inv_freq (float32 in bf16 too), GPT-Neo's and GPT-BigCode's bool causal
    # masks, GPT-J's and CTRL's float32 sinusoidal tables, XGLM's in the model's dtype, Gemma's scales
    # ... and the plan does not call them an estimate
    plan_weighs_as_built(config, tmp_path / "config", capsys)


def test_plan_weighs_a_llama4_checkpoint_config_as_transformers_builds_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Llama 4's top-level (multimodal) config, its MoE layers left to interleave_moe_layer_step (no
    # moe_layers list in the file), and the language model transformers builds from it
    text = transformers.Llama4TextConfig(**_LLAMA4, num_local_experts=4, interleave_moe_layer_step=2)
    vision = transformers.Llama4VisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56,
        patch_size=14, vision_output_dim=48, projector_input_dim=48, projector_output_dim=48,
    )  # fmt: skip
    transformers.Llama4Config(text_config=text.to_dict(), vision_config=vision.to_dict()).save_pretrained(
        tmp_path / "config"
    )
    saved = json.loads((tmp_path / "config" / "config.json").read_text())
    del saved["text_config"]["moe_layers"]
    (tmp_path / "config" / "config.json").write_text(json.dumps(saved))
    config = transformers.AutoConfig.from_pretrained(tmp_path / "config")
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # WHEN it is planned in bf16
    assert main(["plan", "--config", str(tmp_path / "config"), "--json"]) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN the weights are the language model's parameters at 2 B each: layers 1 and 3 hold 4 experts of
    # 160 (3 matrices), a router and a shared expert of 160, layers 0 and 2 a dense MLP of 96; and its RoPE
    # table, inv_freq and original_inv_freq of head_dim / 2 float32 each
    assert planned["weights_bytes"] == weights_bytes(model)
    hidden, vocab = 64, 256
    attention = 2 * hidden * 4 * 16 + 2 * hidden * 2 * 16
    moe = 4 * 3 * hidden * 160 + hidden * 4 + 3 * hidden * 160
    dense = 3 * hidden * 96
    layers = 4 * (attention + 2 * hidden) + 2 * moe + 2 * dense
    assert planned["weights_bytes"] == 2 * (2 * vocab * hidden + layers + hidden) + 4 * 2 * (16 // 2)
    # ... and the only note on them is the vision tower's, which the figure leaves out
    assert [note for note in planned["notes"] if note.startswith("weights:")] == [
        "weights: the language model's only; its vision_config tower is not counted, so the weights figure "
        "is below the checkpoint's"
    ]


def test_plan_weighs_a_gemma4_checkpoint_configs_language_model_as_transformers_builds_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Gemma 4's top-level config (a vision tower beside the language model), its full layers 32 wide
    # with one KV head that is also their V, its last 2 layers reusing earlier K and V
    text = {**_GEMMA4, "attention_k_eq_v": True, "num_global_key_value_heads": 1, "num_kv_shared_layers": 2}
    vision = transformers.Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16
    )
    config = transformers.Gemma4Config(text_config=text, vision_config=vision.to_dict())
    config.save_pretrained(tmp_path / "config")
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # WHEN it is planned in bf16
    assert main(["plan", "--config", str(tmp_path / "config"), "--json"]) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN the weights are its language model's parameters at 2 B each (the lm_head is tied to them) and
    # buffers: RoPE's float32 tables, one pair per kind of layer, and its scales in bf16
    assert planned["weights_bytes"] == weights_bytes(model.model.language_model)
    # ... and the only note on them is the vision tower's, which the figure leaves out
    assert [note for note in planned["notes"] if note.startswith("weights:")] == [
        "weights: the language model's only; its vision_config tower is not counted, so the weights figure "
        "is below the checkpoint's"
    ]


@pytest.mark.parametrize(
    "config",
    [
        transformers.GPTNeoXConfig(**_MHA),
        transformers.BloomConfig(**_BLOOM_SHAPE),
        transformers.PhiConfig(**_LLAMA),
        transformers.GPTJConfig(**_GPT2, rotary_dim=8),
        transformers.MptConfig(**_MPT),
        transformers.GPTNeoConfig(**_GPT_NEO),  # its local layer's window (2) is masked, not cached
        transformers.CTRLConfig(**_CTRL),
        transformers.BioGptConfig(**_MHA),
        transformers.XGLMConfig(**_XGLM),
    ],
    ids=["gpt-neox", "bloom", "phi-gqa", "gptj", "mpt", "gpt-neo", "ctrl", "biogpt", "xglm"],
)
def test_plan_holds_the_kv_these_families_caches_hold(
    config: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a 5-token prompt through the model, into transformers' cache (Bloom's as every other's now)
    # WHEN it is planned
    _, cache, data = _plan_after_a_prompt(config, tmp_path, capsys)
    # THEN the KV is what its cache holds: 2 layers x K and V x 5 tokens x its KV heads x 16 x 4 B
    held = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert data["kv_bytes"] == sum(t.nbytes for t in held) == 2 * 2 * 5 * kv_heads * 16 * 4


def test_plan_says_generate_keeps_no_cache_where_the_config_turns_it_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN MPT's config as transformers saves it (MptConfig defaults to use_cache=False), and generate() of
    # 6 tokens after 11 recorded as called by default, and with use_cache=True
    config = transformers.MptConfig(**_MPT)
    out, kv = _record_config(config, tmp_path, capsys)
    cached, cached_kv = _record_config(config, tmp_path / "cached", capsys, use_cache=True)
    assert json.loads((tmp_path / "config" / "config.json").read_text())["use_cache"] is False
    # WHEN it is planned for that prompt and context
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--prompt", "11", "--context"]
    argv.append("17")
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN the run as called keeps no KV, and the plan sizes use_cache=True's: 2 layers x K and V x 4 heads
    # x 16 x 4 B per token, 16 tokens, as that run's cache holds
    assert out.past_key_values is None and kv["peak_bytes"] == 0
    held = [t for layer in cached.past_key_values.layers for t in (layer.keys, layer.values)]
    assert planned["kv_bytes"] == cached_kv["final_bytes"] == sum(t.nbytes for t in held)
    assert planned["kv_bytes"] == 2 * 2 * 4 * 16 * 4 * 16
    # AND its first note says that generate() keeps none unless asked, and which file turns it off
    off = "KV cache OFF by default: config.json sets use_cache: false, so generate() keeps no KV cache"
    assert planned["notes"][0].startswith(off)
    assert main(argv) == 0
    assert f"note: {off}" in capsys.readouterr().out
    # AND a generation_config.json beside it decides instead, as from_pretrained reads them: no use_cache
    # there, or true, caches; false does not
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "saved")
    ids = torch.randint(3, 200, (1, 4), generator=torch.Generator().manual_seed(0))
    for generation in ({"use_cache": True}, {"eos_token_id": 0}, {"use_cache": False}):
        (tmp_path / "saved" / "generation_config.json").write_text(json.dumps(generation))
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
        with torch.no_grad():
            kept = loaded.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0,
                return_dict_in_generate=True,
            ).past_key_values  # fmt: skip
        assert main(["plan", "--config", str(tmp_path / "saved"), "--json"]) == 0, capsys.readouterr().err
        notes = json.loads(capsys.readouterr().out)["notes"]
        off = [note for note in notes if note.startswith("KV cache OFF by default: generation_config.json ")]
        assert (kept is None) is (generation.get("use_cache") is False) is bool(off), generation


def test_plan_holds_the_kv_a_jetmoe_cache_holds_after_generate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a JetMoE whose heads are kv_channels (24) wide, not hidden_size / heads (16), generating 6
    # tokens after 11: its cache holds its 2 KV heads of 24 per layer
    config = transformers.JetMoeConfig(**_LLAMA, num_local_experts=4, kv_channels=24)
    out, kv = _record_config(config, tmp_path, capsys)
    held = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
    # WHEN it is planned for that prompt and context
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--prompt", "11", "--json"]
    assert main([*argv, "--context", "17"]) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN its KV per token and final KV are the cache's: 2 layers x K and V x 2 heads x 24 x 4 B, 16 tokens
    per_token = 2 * 2 * 2 * 24 * 4
    assert planned["kv_bytes_per_token"] == kv["bytes_per_token_expected"] == per_token
    assert planned["kv_bytes"] == kv["final_bytes"] == sum(t.nbytes for t in held) == per_token * 16


def test_plan_refuses_a_gpt2_decoder_with_cross_attention(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the GPT-2 decoder of an encoder-decoder model, whose cross-attention a plan does not size
    transformers.GPT2Config(**_GPT2, add_cross_attention=True).save_pretrained(tmp_path / "config")
    # WHEN it is planned THEN it is refused, naming why
    assert main(["plan", "--config", str(tmp_path / "config"), "--json"]) != 0
    assert "add_cross_attention" in capsys.readouterr().err


def _mistral(window: int = 8) -> Any:
    """A tiny Mistral whose 2 layers all slide at `window` (DynamicSlidingWindowLayer in a dynamic cache)."""
    return transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, sliding_window=window,
    )  # fmt: skip


@pytest.mark.parametrize("new", [1, 7])
def test_plans_kv_tokens_are_the_tokens_a_sliding_layer_holds(
    new: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Mistral whose layers slide at 8, fed a 13-token prompt: after the prefill each layer holds a
    # view of its last 7 tokens (window - 1) in the prompt's 13-token storage; after decode steps, in an
    # 8-token one
    out, kv = _record_config(_mistral(), tmp_path, capsys, prompt=13, new=new)
    assert out.past_key_values.layers[0].keys.shape[-2] == 7
    # WHEN it is planned
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--prompt", "13", "--json"]
    assert main([*argv, "--context", str(13 + new)]) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN its tokens are those held, as the report counts them, and its bytes the storage
    assert planned["kv_tokens"] == kv["tokens_held"] == 8 - 1
    storage = 13 if new == 1 else 8
    assert planned["kv_bytes"] == kv["final_bytes"] == 2 * storage * 2 * 2 * 16 * 4  # layers, K and V, fp32


U = 2 * 2 * 16 * 4  # one layer's K (or V) of one token: 2 rows (1 prompt x 2 beams), 2 heads of 16, fp32


@pytest.mark.parametrize(
    ("family", "cache", "prompt", "new", "final", "peak"),
    [
        # 11 tokens written in 2 full layers; the last reorder copies layer 0's 11-token K beside it
        ("llama", "static", 5, 7, 2 * 2 * 11 * U, (2 * 2 * 11 + 11) * U),
        ("llama", "dynamic", 5, 7, 2 * 2 * 11 * U, (2 * 2 * 11 + 11) * U),
        # a static cache's sliding layers hold their 8-token window, copied whole
        ("mistral", "static", 5, 7, 2 * 2 * 8 * U, (2 * 2 * 8 + 8) * U),
        # sliding at 8: each reorder leaves a compact 7-token K and V, so the last step's layer 1 makes its
        # 8-token K and V beside its old 7-token ones and layer 0's new 8-token ones
        ("mistral", "dynamic", 5, 7, 2 * 2 * 7 * U, (8 + 8 + 7 + 7 + 8 + 8) * U),
        # a 13-token prompt: the reorder after the prefill copies layer 0's 7-token view beside the prompts
        ("mistral", "dynamic", 13, 3, 2 * 2 * 7 * U, (2 * 2 * 13 + 7) * U),
    ],
)
def test_plan_of_a_beam_search_is_the_recordings(
    family: str, cache: str, prompt: int, new: int, final: int, peak: int, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # GIVEN one prompt beam-searched with num_beams=2 (2 rows): after every forward, the prefill's and the
    # last one's too, reorder_cache rebinds each layer's K, then V, to a copy made while the old one is live
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256,
        )  # fmt: skip
    else:
        config = _mistral()
    _, kv = _record_config(config, tmp_path, capsys, prompt=prompt, new=new, beams=2, cache=cache)
    # WHEN it is planned as 2 rows of 2 beams
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--batch", "2", "--beams", "2"]
    argv += ["--prompt", str(prompt), "--context", str(prompt + new), "--cache", cache, "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN its final KV and peak are the recording's, and the arithmetic's
    assert (planned["kv_bytes"], planned["kv_peak_bytes"]) == (kv["final_bytes"], kv["peak_bytes"])
    assert (planned["kv_bytes"], planned["kv_peak_bytes"]) == (final, peak)


def test_plan_refuses_a_batch_that_is_not_whole_prompts_of_beams(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN 3 rows asked for with 2 beams a prompt
    argv = ["plan", "--preset", "llama-3-8b", "--batch", "3", "--beams", "2"]
    # THEN it is refused as bad input, saying what --batch counts
    assert main(argv) == 2
    assert "--batch 3 is not a multiple of --beams 2" in capsys.readouterr().err
    # AND without --batch and without a run, the batch is the default one, not a run's
    assert main(["plan", "--preset", "llama-3-8b", "--beams", "4"]) == 2
    err = capsys.readouterr().err
    assert "the default batch (1 row, no --batch given) is not a multiple of --beams 4" in err
    assert "the run's" not in err
