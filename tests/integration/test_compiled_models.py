"""torch.compile: a compiled model's cache updates run inside the graph, out of kvtrace's reach, and
kvtrace's own hooks must not break the graph. The KV figures are still the arithmetic, per step:
layers x 2 x KV heads x head_dim x tokens x rows x 4 bytes (fp32)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch._dynamo.utils import counters

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from kvtrace.run_reader import read_run
from tests.tiny import HEAD_DIM, tiny_size

LAYERS, KV_HEADS, PROMPT, NEW = 4, 2, 10, 6


def _model(backend: str) -> Any:
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    model.forward = torch.compile(model.forward, backend=backend)
    return model


def _generate(model: Any, cache: str) -> Any:
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            cache_implementation=cache, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip


def _check_run(run: Path, cache: str, capsys: pytest.CaptureFixture[str]) -> None:
    events = read_run(run).kv_events
    steps = Counter((e.step, e.event) for e in events if e.phase != "end" and e.event != "freed")
    # THEN every step logs each layer's K and V: created at prefill, then one write (or growth) per step
    assert steps[(1, "created")] == 2 * LAYERS
    written = "written" if cache == "static" else "grown"
    assert [steps[(step, written)] for step in range(2, NEW + 1)] == [2 * LAYERS] * (NEW - 1)
    last = [e for e in events if e.step == NEW and e.kv == "k" and e.event == written]
    assert {e.tokens for e in last} == {PROMPT + NEW - 1}
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    held = PROMPT + NEW - 1
    assert kv["tokens_held"] == held
    assert kv["final_bytes"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * held * 4


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_model_compiled_before_the_block_is_recorded_step_by_step(
    cache: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a model compiled and warmed up before recording, as anyone benchmarking does
    torch._dynamo.reset()
    model = _model("eager")
    plain = _generate(model, cache)
    # WHEN it generates inside the block
    with kvtrace.record(tmp_path / "run", model=model, profiler=False):
        recorded = _generate(model, cache)
    assert torch.equal(plain.sequences, recorded.sequences)
    _check_run(tmp_path / "run", cache, capsys)


def test_compiling_inside_the_block_adds_no_graph_and_no_break(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the graphs dynamo makes for a static-cache generate() without kvtrace
    def compiled_graphs(record: bool) -> tuple[int, int]:
        torch._dynamo.reset()
        counters.clear()
        model = _model("eager")
        if record:
            with kvtrace.record(tmp_path / "run", model=model, profiler=False):
                _generate(model, "static")
        else:
            _generate(model, "static")
        return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())

    plain = compiled_graphs(record=False)
    # WHEN the first compile happens inside the block THEN kvtrace's hooks are neither traced nor guarded on
    assert compiled_graphs(record=True) == plain
    assert plain[1] == 0
    _check_run(tmp_path / "run", "static", capsys)


def test_inductor_static_cache_writes_are_logged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN inductor's own kernels writing the static cache in place (the GPU fast path, here on the CPU)
    torch._dynamo.reset()
    model = _model("inductor")
    _generate(model, "static")
    with kvtrace.record(tmp_path / "run", model=model, profiler=False):
        _generate(model, "static")
    _check_run(tmp_path / "run", "static", capsys)


def test_a_forward_that_raises_before_any_update_logs_no_step(tmp_path: Path) -> None:
    # GIVEN an eager model whose third forward fails before its first layer writes the cache (an OOM
    # in the embeddings, say)
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    calls = [0]

    def fail_third(module: Any, args: Any) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("out of memory (simulated)")

    handle = model.model.embed_tokens.register_forward_pre_hook(fail_third)
    # WHEN it generates inside the block
    run = kvtrace.record(tmp_path / "run", model=model, profiler=False)
    with pytest.raises(RuntimeError, match="simulated"), run:
        _generate(model, "static")
    handle.remove()
    # THEN the failed step wrote nothing, so nothing is logged for it (no step taken for a compiled one)
    events = read_run(tmp_path / "run").kv_events
    assert not [e for e in events if e.step == 3 and e.event != "freed"]
    assert len([e for e in events if e.step == 2 and e.event == "written"]) == 2 * LAYERS


def test_a_torch_compile_wrapper_passed_as_the_model_is_recorded_step_by_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN `torch.compile(model)`, whose generate() is the module's own (it calls the module, not the
    # wrapper), passed to record() as the model
    torch._dynamo.reset()
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    compiled = torch.compile(model, backend="eager")
    plain = _generate(model, "dynamic")
    # WHEN the wrapper generates inside the block
    with kvtrace.record(tmp_path / "run", model=compiled, profiler=False):
        recorded = _generate(compiled, "dynamic")
    # THEN every step is logged as for the module itself, with no warning
    assert torch.equal(plain.sequences, recorded.sequences)
    _check_run(tmp_path / "run", "dynamic", capsys)
    assert read_run(tmp_path / "run").manifest["warnings"] == []


@pytest.mark.parametrize("fullgraph", [True, False])
def test_transformers_compiled_decoding_keeps_its_graph_whole(
    fullgraph: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN transformers' own compiled decoding (`CompileConfig`: generate() compiles `model.__call__`,
    # here also on the CPU), where `fullgraph=True` refuses any graph break
    from transformers import CompileConfig

    def compiled_graphs(record: bool) -> tuple[int, int, Any]:
        torch._dynamo.reset()
        counters.clear()
        model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
        config = CompileConfig(fullgraph=fullgraph, backend="eager", mode=None)
        config._compile_all_devices = True
        model.generation_config.compile_config = config
        if not record:
            out = _generate(model, "static")
        else:
            with kvtrace.record(tmp_path / "run", model=model, profiler=False):
                out = _generate(model, "static")
            assert not getattr(type(model).get_compiled_call, "kvtrace_wrapper", False)  # put back
        return (*_counted(), out)

    plain = compiled_graphs(record=False)
    # WHEN it generates inside the block (it used to raise with fullgraph, and to break the graph at
    # kvtrace's forward and trace kvtrace's own bookkeeping without)
    recorded = compiled_graphs(record=True)
    # THEN dynamo makes the same graphs with no break, the tokens are the same, and every step is logged
    assert recorded[:2] == plain[:2] and plain[0] >= 1 and plain[1] == 0
    assert torch.equal(plain[2].sequences, recorded[2].sequences)
    _check_run(tmp_path / "run", "static", capsys)


def _counted() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_a_call_compiled_whole_breaks_only_at_kvtraces_forward(tmp_path: Path) -> None:
    # GIVEN a model whose whole call is compiled by the user and driven by their own loop: kvtrace's forward
    # is reached from inside the graph, so the graph breaks there
    torch._dynamo.reset()
    counters.clear()
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    call = torch.compile(model.__call__, backend="eager")
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    # WHEN it runs a prefill and decode steps inside the block
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        cache = transformers.DynamicCache(config=model.config)
        for _ in range(NEW):
            ids = call(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    # THEN dynamo traced none of kvtrace's bookkeeping (it used to compile the step's start and end, and
    # break on their JSON, locks and storages): the only breaks are at the wrapper itself
    reasons = list(counters["graph_break"])
    assert reasons and all("torch.compiler.disable" in reason for reason in reasons), reasons
    # AND every step is logged: the prompt's tokens, then one more per step
    events = [e for e in read_run(tmp_path / "run").kv_events if e.kv == "k" and e.layer == 0 and e.tokens]
    assert [e.tokens for e in events] == list(range(PROMPT, PROMPT + NEW))


def _kv_peak_in_trace(run: Path) -> int:
    """The peak of the KV storages' bytes as the profiler's allocator events show them, read with plain
    `json`: the allocations at a KV storage's address and size (`[memory]` events, in time order), each
    counted from its allocation to its free."""
    storages = {(e.addr, e.storage_bytes) for e in read_run(run).kv_events if e.event != "freed" and e.addr}
    (path,) = (run / "profiler").glob("*.pt.trace.json*")
    with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as fh:
        events = [e for e in json.load(fh)["traceEvents"] if e.get("name") == "[memory]"]
    held: dict[int, int] = {}
    live = peak = 0
    for event in sorted(events, key=lambda e: e["ts"]):
        addr, nbytes = event["args"]["Addr"], event["args"]["Bytes"]
        if nbytes > 0 and (addr, nbytes) in storages:
            held[addr] = nbytes
            live += nbytes
            peak = max(peak, live)
        elif nbytes < 0 and addr in held:
            live -= held.pop(addr)
    return peak


@pytest.mark.parametrize("profiler", [True, False], ids=["profiler", "light"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_the_kv_peak_is_the_allocators_order_of_a_steps_new_and_old_storages(
    compiled: bool, profiler: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a model whose forward is compiled (and warmed up), or the same model eager, decoding 2 rows: a
    # compiled graph makes every layer's new K and V before dynamo rebinds `layer.keys` after it, so all the
    # old storages are held with all the new ones; eager, each old one goes as soon as its layer's update
    # made its replacement. With the profiler on each update is logged as it happens (the graph's reach
    # none: logged at the step's end); without it the steps are deferred (and planned) to their end.
    torch._dynamo.reset()
    rows = 2
    model = _model("eager") if compiled else build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    ids = torch.randint(3, 1000, (rows, PROMPT), generator=torch.Generator().manual_seed(1))
    options: dict[str, Any] = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    with torch.no_grad():
        model.generate(ids, **options)
        # WHEN it generates inside the block
        with kvtrace.record(tmp_path / "run", model=model, profiler=profiler):
            model.generate(ids, **options)
    assert main(["report", str(tmp_path / "run"), "--json", "--no-export", "-q"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    # THEN the peak is at the last step: what the cache holds then, and what that step replaced (every
    # layer's K and V compiled, one tensor eager); one layer's K (or V) is KV_HEADS x HEAD_DIM x tokens x
    # rows x 4 bytes
    tensor_per_token = KV_HEADS * HEAD_DIM * rows * 4
    final = LAYERS * 2 * tensor_per_token * (PROMPT + NEW - 1)
    replaced = (LAYERS * 2 if compiled else 1) * tensor_per_token * (PROMPT + NEW - 2)
    assert kv["final_bytes"] == final
    assert kv["peak_bytes"] == final + replaced
    if profiler:  # AND it is the peak of the allocator's own events for those storages, in the run's trace
        assert _kv_peak_in_trace(tmp_path / "run") == final + replaced
