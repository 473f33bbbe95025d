"""Cache layers that hold state beside K/V, on real tiny random-weight models (transformers 5.25, and 5.17's
layouts where it differs: DSA's K/V expanded to the heads, DeepSeek-V4's overlap gate in the model's dtype).

DSA models (DeepSeek-V3.2: DynamicIndexedLayer, StaticIndexedLayer) cache the indexer's keys, [batch,
tokens, index_head_dim], next to the MLA latent; DeepSeek-V4's layers keep compressed KV entries (and the
compressor's pending window and overlap state) beside the sliding K=V window. The log carries them as
`aux.*` parts, so the report's KV equals the distinct storages the returned cache holds, and the planner
counts the indexer keys per token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

import kvtrace
from kvtrace.cli import main
from kvtrace.geometry import transformers_version
from kvtrace.run_reader import read_run

LAYERS, KV_LORA, ROPE, INDEX_DIM, F32 = 4, 16, 8, 16, 4
HEADS, NOPE, V_DIM = 4, 16, 12  # the DSA model's query heads, and its heads' K (nope + rope) and V widths
# Elements a DSA layer caches a token: the latent, rotary key and indexer key (transformers 5.25); before
# it (5.17), each head's K and V, expanded from the latent, and the indexer key
DSA_LATENT = (transformers_version() or (5, 25)) >= (5, 25)
LATENT_WIDTH, EXPANDED_WIDTH = KV_LORA + ROPE + INDEX_DIM, HEADS * (NOPE + ROPE) + HEADS * V_DIM + INDEX_DIM
DSA_WIDTH = LATENT_WIDTH if DSA_LATENT else EXPANDED_WIDTH
BATCH, PROMPT, NEW = 2, 7, 5

pytestmark = pytest.mark.skipif(
    not hasattr(transformers.cache_utils, "DynamicIndexedLayer"), reason="transformers without DSA caches"
)


def _dsa_config() -> Any:
    return transformers.AutoConfig.for_model(
        "deepseek_v32", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=KV_LORA, q_lora_rank=16,
        qk_rope_head_dim=ROPE, qk_nope_head_dim=16, v_head_dim=12, head_dim=8, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, moe_intermediate_size=32,
        index_topk=4, index_head_dim=INDEX_DIM, index_n_heads=2,
    )  # fmt: skip


def _dsv4_config(**fields: Any) -> Any:
    return transformers.AutoConfig.for_model(
        "deepseek_v4", vocab_size=1000, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=16, num_experts_per_tok=2,
        n_routed_experts=4, sliding_window=4, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16,
        index_topk=2, hc_mult=2, partial_rotary_factor=0.25,
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4}, **fields,
    )  # fmt: skip


def _held_bytes(cache: Any) -> int:
    """Distinct storages of every tensor the cache's layers hold (scalar counters aside), each once."""
    storages: dict[int, int] = {}

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for layer in cache.layers:
        walk(vars(layer))
    return sum(storages.values())


def _record(config: Any, run: Path, new: int, dtype: torch.dtype = torch.float32, **generate: Any) -> Any:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
            pad_token_id=0, return_dict_in_generate=True, **generate,
        )  # fmt: skip
    return out.past_key_values


def _report(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_dsa_indexer_keys_are_logged_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cache: str
) -> None:
    # GIVEN a DeepSeek-V3.2 model whose layers cache the latent (K: kv_lora_rank, V: the rotary key) and
    # the indexer's keys, each [batch, tokens, index_head_dim]
    run = tmp_path / cache
    past = _record(_dsa_config(), run, NEW, cache_implementation=cache)
    tokens = PROMPT + NEW - 1  # generate() never writes its last token (a static cache: max_cache_len)
    want = LAYERS * DSA_WIDTH * tokens * BATCH * F32  # 14,080 B (K/V alone: 8,448); 5.17: 56,320 B
    # WHEN the run is reported, and planned
    report = _report(run, capsys)
    assert main(["plan", "--from-run", str(run), "--cache", "dynamic", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # THEN its KV is what the cache holds, indexer keys included, and the plan's too, as the transformers
    # it was recorded under lays it out (under 5.17 the plan counted the latent: 8,448 B for 56,320)
    assert _held_bytes(past) == want
    assert report["kv"]["final_bytes"] == want
    assert plan["kv_bytes"] == want
    # AND a token's bytes by the arithmetic are those measured, the indexer keys counted (they were left
    # out: 2,304 B for 2,560 held under 5.17, 384 for 640 under 5.25)
    per_token = LAYERS * DSA_WIDTH * F32  # 640 B; 5.17: 2,560 B
    assert report["kv"]["bytes_per_token_measured"] == per_token
    assert report["kv"]["bytes_per_token_expected"] == per_token
    # AND planned for the other release (--transformers), its cache is that release's layout, said so
    other, width = ("5.17", EXPANDED_WIDTH) if DSA_LATENT else ("5.25", LATENT_WIDTH)
    flags = ["--cache", "dynamic", "--transformers", other, "--json"]
    assert main(["plan", "--from-run", str(run), *flags]) == 0
    relaid = json.loads(capsys.readouterr().out)
    assert relaid["kv_bytes"] == LAYERS * width * tokens * BATCH * F32
    assert relaid["request"]["transformers_layout"] == other
    assert plan["request"]["transformers_layout"] == ("5.25" if DSA_LATENT else "5.17")
    assert any(note.startswith(f"--transformers {other} is not the run's") for note in relaid["notes"])
    events = read_run(run).kv_events
    for layer in range(LAYERS):
        mine = [e for e in events if e.part == "aux.indexer_keys" and e.layer == layer]
        assert mine and mine[0].event == "created" and mine[0].kv == "k"
        shape = list([e for e in mine if e.shape][-1].shape)
        assert shape[0] == BATCH and shape[-1] == INDEX_DIM
        if cache == "dynamic":
            assert shape[1] == tokens
        if cache == "dynamic":  # grown by torch.cat every step, the old storage freed
            assert sum(e.event == "grown" for e in mine) == NEW - 1
            assert sum(e.event == "freed" for e in mine) == NEW - 1


@pytest.mark.parametrize("new", [1, 8, 40])
def test_dsv4_compressed_entries_are_logged_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], new: int
) -> None:
    # GIVEN DeepSeek-V4, whose compressed KV entries grow with the context beside its sliding K=V window
    run = tmp_path / f"v4-{new}"
    past = _record(_dsv4_config(), run, new)
    window = sum(layer.keys.untyped_storage().nbytes() for layer in past.layers)
    # WHEN the run is reported THEN its KV is every distinct storage the layers hold, not the window alone
    report = _report(run, capsys)
    held = _held_bytes(past)
    assert held > window
    assert report["kv"]["final_bytes"] == held
    events = read_run(run).kv_events
    parts = {e.part for e in events}
    assert {"aux.compressed_kv.compressor", "aux.compressed_kv.indexer"} <= parts


def _storages(tensors: Any) -> int:
    """Bytes of the distinct storages of `tensors`, each once (None skipped)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(seen.values())


# A V4 whose first layer is a plain sliding one (DynamicSlidingWindowLayer: K and V apart), then HCA, CSA, HCA
_WITH_SLIDING = [
    "sliding_attention", "heavily_compressed_attention", "compressed_sparse_attention",
    "heavily_compressed_attention",
]  # fmt: skip


@pytest.mark.parametrize(
    ("new", "layer_types", "dtype"),
    [
        (1, None, "fp32"),
        (8, None, "fp32"),
        (40, None, "fp32"),
        (8, _WITH_SLIDING, "fp32"),
        (41, None, "bf16"),
    ],
)
def test_plan_of_dsv4_is_what_its_cache_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], new: int, layer_types: list[str] | None, dtype: str
) -> None:
    # GIVEN a DeepSeek-V4 run (every layer a 4-token K = V window; CSA entries every 2 tokens with indexer
    # keys, HCA's every 4; the CSA overlap gate float32 in a bf16 model too) and its config.json
    config = _dsv4_config(**({"layer_types": layer_types} if layer_types else {}))
    run = tmp_path / "run"
    past = _record(config, run, new, torch.bfloat16 if dtype == "bf16" else torch.float32)
    config.save_pretrained(tmp_path / "config")
    report = _report(run, capsys)
    # WHEN its config is planned at the run's batch, prompt, context and dtype, and the run itself
    context = PROMPT + new
    shape = ["--batch", str(BATCH), "--context", str(context), "--prompt", str(PROMPT), "--dtype", dtype]
    assert main(["plan", "--config", str(tmp_path / "config"), *shape, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert main(["plan", "--from-run", str(run), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    # THEN both plans' KV is every storage the cache holds, as the run's final KV (was the window's alone,
    # K and V counted apart: 4 layers x 2 x 3 tokens x 32 x 2 rows x 4 B = 6,144 B, flat)
    held = _held_bytes(past)
    assert plan["kv_bytes"] == from_run["kv_bytes"] == report["kv"]["final_bytes"] == held
    # AND each part is what those storages hold: the windows, each kind of compressed state
    layers = past.layers
    parts = plan["kv_parts"]
    assert parts["window"] == sum(_storages([layer.keys, layer.values]) for layer in layers)
    assert parts["compressed_entries"] == _storages(
        [getattr(layer, "compressed_kv", {}).get("compressor") for layer in layers]
    )
    assert parts["indexer_keys"] == _storages(
        [getattr(layer, "compressed_kv", {}).get("indexer") for layer in layers]
    )
    assert sum(parts.values()) == held
    # AND the KV peak planned bounds the run's (each step's new storages beside the old, at most)
    assert plan["kv_peak_bytes"] >= report["kv"]["peak_bytes"]
    # AND a token adds the compressed entries and indexer keys, a fraction a layer: (32 + 16) / 2 for the
    # CSA layer, 32 / 4 for each HCA one, x 4 B (bf16: 2)
    hca = (layer_types or config.layer_types).count("heavily_compressed_attention")
    element = F32 if dtype == "fp32" else 2
    assert plan["kv_bytes_per_token"] == ((32 + INDEX_DIM) // 2 + hca * 32 // 4) * element


def test_plan_counts_indexer_keys_and_takes_dsv4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the two models' config.json files, as save_pretrained writes them
    _dsa_config().save_pretrained(tmp_path / "dsa")
    _dsv4_config().save_pretrained(tmp_path / "dsv4")
    # WHEN planned at bf16 THEN a DSA token costs its latent, rotary key and indexer keys in every layer, as
    # the installed transformers caches them
    assert main(["plan", "--config", str(tmp_path / "dsa"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # (320, was 192; under 5.17, which caches each head's K and V, 1,280, was 192)
    assert plan["kv_bytes_per_token"] == LAYERS * DSA_WIDTH * 2
    # AND DeepSeek-V4's config, which names its MLP width moe_intermediate_size only, is planned
    assert main(["plan", "--config", str(tmp_path / "dsv4"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["request"]["geometry"]["intermediate_size"] == 32


def test_aux_parts_that_take_each_others_addresses_keep_their_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN DeepSeek-V4 layers (the real class, driven by the real Cache.update) whose auxiliary parts, set
    # after each update as the model sets them, are placed in host memory the test keeps (four numpy pools
    # per layer), so that every step `buffer_kv`'s new tensor sits where `buffer_gate`'s old one was and
    # `compressed_kv`'s where `buffer_kv`'s old one was: each part gives its address to another, both ways
    # round the order the layer's parts are listed in
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HCACache

    config, rows, dim, steps = _dsv4_config(), 1, 8, 6
    cache = transformers.DynamicCache(config=config)
    cache.layers = [DeepseekV4HCACache(config) for _ in range(LAYERS)]
    pools = [[np.zeros(rows * (steps + 1) * dim, dtype=np.float32) for _ in range(4)] for _ in range(LAYERS)]
    # per layer: pool index of compressed_kv, buffer_kv, buffer_gate, and the free one
    where = [[0, 1, 2, 3] for _ in range(LAYERS)]

    def placed(layer: int, pool: int, tokens: int) -> torch.Tensor:
        return torch.from_numpy(pools[layer][pool][: rows * tokens * dim]).view(rows, tokens, dim)

    token = torch.randn(rows, 1, 1, 32)
    with torch.no_grad(), kvtrace.record(tmp_path / "run", profiler=False):
        for step in range(steps):
            for index, layer in enumerate(cache.layers):
                cache.update(token, token, index)
                compressed, kv, gate, free = where[index]
                if step:  # compressed_kv where buffer_kv was, buffer_kv where buffer_gate was
                    compressed, kv, gate, free = kv, gate, free, compressed
                    where[index] = [compressed, kv, gate, free]
                layer.compressed_kv["compressor"] = placed(index, compressed, step + 1)
                layer.buffer_kv["compressor"] = placed(index, kv, step + 1)
                layer.buffer_gate["compressor"] = placed(index, gate, step + 1)
    took = [layer.buffer_kv["compressor"].data_ptr() for layer in cache.layers]
    assert took == [int(pools[i][where[i][1]].ctypes.data) for i in range(LAYERS)]  # the arrangement held

    # WHEN the run is reported
    report = _report(tmp_path / "run", capsys)

    # THEN every storage the layers hold is in its final KV: a part's free is logged before another part's
    # new tensor at its address, whatever the order of the parts
    held = _held_bytes(cache)
    # the K=V window's storage is the last update's torch.cat, of which the layer keeps a view
    window = min(steps, config.sliding_window) * 32
    assert held == LAYERS * (window + 3 * rows * steps * dim) * F32 == 4352
    assert report["kv"]["final_bytes"] == held


def _dsv4_prefill_bytes(prompt: int, layer_types: list[str], element: int = F32) -> int:
    """DeepSeek-V4's cache of the test's batch once a `prompt`-token prefill is in (head_dim 32, CSA every
    2 tokens with 16-wide indexer keys, HCA every 4): each layer's K = V window holds the whole prompt, its
    compressor the prompt's kv and gate projections (CSA's two series each, of head_dim + index_head_dim),
    its compressed entries one a rate; a CSA layer with an entry its overlap state too, the gate float32."""
    per_row = 0
    for kind in layer_types:
        rate = 2 if kind == "compressed_sparse_attention" else 4
        entries = prompt // rate
        if kind == "compressed_sparse_attention":
            overlap = rate * (32 + INDEX_DIM) if entries else 0
            elements = prompt * 32 + entries * (32 + INDEX_DIM) + 2 * prompt * 2 * (32 + INDEX_DIM) + overlap
            per_row += elements * element + overlap * F32
        else:
            per_row += (prompt * 32 + entries * 32 + 2 * prompt * 32) * element
    return per_row * BATCH


def test_diagnose_of_dsv4_offers_what_its_cache_runs_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a DeepSeek-V4 run (a DynamicCache of its own layers: transformers 5.25 gives it no static or
    # quantized cache, and its window is the config's) and its config.json
    config = _dsv4_config()
    run = tmp_path / "run"
    _record(config, run, 8)
    config.save_pretrained(tmp_path / "config")
    report = _report(run, capsys)
    # WHEN it is diagnosed
    assert main(["diagnose", str(run), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    remedies = {remedy["kind"]: remedy for remedy in found["remedies"]}
    # THEN no static cache, quantized cache or sliding window is offered (were: a static cache for the
    # torch.cat transient, fp8 and int4 KV, a smaller window), and on the CPU no offloading either
    assert {"static_cache", "quantized_kv", "sliding_window"}.isdisjoint(remedies)
    assert set(remedies) == {"batch", "context"}
    assert found["kv_bytes"] == report["kv"]["peak_bytes"]
    # AND a shorter context is priced as the plan counts V4's cache at it: the peak is the first decode
    # step's (step 1 the prefill), a context of prompt + 2; a quarter of it cut, the prompt a token shorter,
    # whose peak is its prefill's (the whole prompt held beside the window's new storage: none yet)
    assert (found["step"], found["step_phase"]) == (2, "decode")
    context = PROMPT + 2
    shorter = context - context // 4
    prompt = shorter - 1
    planned = _dsv4_prefill_bytes(prompt, config.layer_types)  # 28,032 B
    shape = ["--batch", str(BATCH), "--context", str(shorter), "--prompt", str(prompt), "--dtype", "fp32"]
    assert main(["plan", "--config", str(tmp_path / "config"), *shape, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["kv_peak_bytes"] == planned
    context_remedy = remedies["context"]
    assert context_remedy["setting"] == shorter
    assert context_remedy["saved_bytes"] == found["kv_bytes"] - planned
    # AND a token of context costs what the plan says, the compressed entries and indexer keys: (32 + 16) / 2
    # for the CSA layer, 32 / 4 for each HCA one, x 4 B, x the batch (was the window's K and V a token)
    hca = config.layer_types.count("heavily_compressed_attention")
    per_token = ((32 + INDEX_DIM) // 2 + hca * 32 // 4) * F32
    assert plan["kv_bytes_per_token"] == per_token
    assert f"grow {per_token * BATCH} B a token across the batch" in context_remedy["sentence"]
    assert any("DynamicCache only" in note for note in found["notes"])
