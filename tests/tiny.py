"""The tiny Llama 3 shape the integration tests record: small enough for seconds on a CPU, with GQA."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvtrace.llama import ModelSize

HEADS, HIDDEN = 4, 64
HEAD_DIM = HIDDEN // HEADS


def cache_arg(cache: Any) -> dict[str, Any]:
    """`{keyword: cache}` for generate() and a model's forward: `cache` where transformers renamed
    `past_key_values` (5.25), `past_key_values` before it (5.17 refuses `cache` in generate() and drops it
    unread in a forward, which then builds a cache of its own)."""
    from kvtrace.llama import cache_keyword

    return {cache_keyword(): cache}


def tiny_size(layers: int, kv_heads: int = 2) -> ModelSize:
    """Hidden 64, 4 query heads (head_dim 16), `kv_heads` KV heads, a 1000-token vocabulary."""
    return ModelSize(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_layers=layers,
        num_heads=HEADS,
        num_kv_heads=kv_heads,
        vocab_size=1000,
    )


def weights_bytes(model: Any) -> int:
    """Bytes of every distinct parameter and buffer storage: what weights.jsonl lists, and what the device
    holds before the first step."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def plan_weighs_as_built(config: Any, folder: Path, capsys: Any) -> None:
    """Asserts that `kvtrace plan --config` weighs `config`, saved as transformers saves it, as the model
    transformers builds from it holds (`weights_bytes`), in fp32 and in bf16, and does not call the weights
    an estimate."""
    import json

    import torch
    import transformers

    from kvtrace.cli import main

    config.save_pretrained(folder)
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        argv = ["plan", "--config", str(folder), "--dtype", name, "--json"]
        assert main(argv) == 0, capsys.readouterr().err
        planned = json.loads(capsys.readouterr().out)
        assert planned["weights_bytes"] == weights_bytes(model), name
        assert not [note for note in planned["notes"] if note.startswith("weights:")], name


def record_generate(
    model: Any,
    out: Path,
    batch: int,
    prompt: int,
    new_tokens: int,
    cache: str | None = None,
    window: int | None = None,
    padded: int = 0,
    logits_to_keep: int | None = None,
    prefill_chunk_size: int | None = None,
    **options: Any,
) -> None:
    """`kvtrace.record(out, model=model, **options)` around a greedy `generate()` of exactly `new_tokens` on
    `batch` rows of `prompt` seeded random ids, without grad; with `cache`, the cache `kvtrace demo --cache`
    builds of that kind (and `window`); the first row's first `padded` ids left padding, masked out;
    `logits_to_keep` given to generate() where set (0: every position's logits at the prefill), and
    `prefill_chunk_size` (a chunked prefill: the prompt run that many tokens a forward)."""
    import torch

    import kvtrace
    from kvtrace.llama import cache_keyword, make_cache

    ids = torch.randint(3, 1000, (batch, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, :padded], mask[0, :padded] = 0, 0  # pad_token_id 0, as generate() is told below
    given: dict[str, Any] = {}
    if cache is not None:
        sized = {} if window is None else {"window": window}
        made, extra = make_cache(cache, model, batch, prompt + new_tokens, **sized)
        given = {cache_keyword(): made, **extra} if made is not None else dict(extra)
    if logits_to_keep is not None:
        given["logits_to_keep"] = logits_to_keep
    if prefill_chunk_size is not None:
        given["prefill_chunk_size"] = prefill_chunk_size
    gc.collect()  # tensors earlier tests left in cycles, freed mid-recording, are not this run's (as sweep)
    with torch.no_grad(), kvtrace.record(out, model=model, **options):
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **given,
        )


def weights_on_cuda0(run: Path) -> list[dict[str, Any]]:
    """Rewrite a CPU run's files as a GPU run whose cache is offloaded to the CPU writes them: its device
    cuda:0 (an H200), its weights there, its KV storages left on the CPU, so cuda:0 has no event. Returns
    the rows of weights.jsonl."""
    import json

    manifest = json.loads((run / "manifest.json").read_text())
    manifest["device"] = {"type": "cuda", "name": "NVIDIA H200", "index": 0, "total_memory_bytes": 141 << 30}
    (run / "manifest.json").write_text(json.dumps(manifest))
    weights = [json.loads(line) for line in (run / "weights.jsonl").read_text().splitlines()]
    (run / "weights.jsonl").write_text("".join(json.dumps({**w, "device": "cuda:0"}) + "\n" for w in weights))
    events = [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]
    assert {e["device"] for e in events if "device" in e} == {"cpu"}
    return weights


@contextmanager
def raising_before_layer(model: Any, error: BaseException, forward: int, layer: int) -> Iterator[None]:
    """Inside it, the model's `forward`-th forward (1: the prefill) raises `error` as its decoder layer
    `layer` begins: where a real OOM stops a step, the layers before it having written their KV, the others
    not. Counted from layer 0's forwards, so a direct `model.forward` call (no `model(...)`) counts too."""
    calls = [0]

    def count(module: Any, args: Any) -> None:
        calls[0] += 1

    def fail(module: Any, args: Any) -> None:
        if calls[0] == forward:
            raise error

    counting = model.model.layers[0].register_forward_pre_hook(count)
    failing = model.model.layers[layer].register_forward_pre_hook(fail)
    try:
        yield
    finally:
        counting.remove()
        failing.remove()


@contextmanager
def raising_in_values_update(model: Any, error: BaseException, forward: int, layer: int) -> Iterator[None]:
    """Inside it, the model's `forward`-th forward (1: the prefill) raises `error` from decoder layer
    `layer`'s V concatenation, its K already grown: where a real OOM in a DynamicCache's torch.cat of the
    values stops a step (sample_traces/h200/oom_b266, layer 5), K holding a token more than V. Raised by
    torch.cat itself when given that layer's values, so that the cache's update runs as it does."""
    import torch

    calls = [0]
    caches: list[Any] = []
    concatenate = torch.cat

    def count(module: Any, args: Any) -> None:
        calls[0] += 1

    def see_cache(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        caches[:] = [kwargs.get("cache", kwargs.get("past_key_values"))]

    def cat(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        layers = getattr(caches[0], "layers", []) if caches else []
        if (
            calls[0] == forward
            and len(layers) > layer
            and tensors[0] is getattr(layers[layer], "values", None)
        ):
            raise error
        return concatenate(tensors, *args, **kwargs)

    counting = model.model.layers[0].register_forward_pre_hook(count)
    seeing = model.model.layers[layer].register_forward_pre_hook(see_cache, with_kwargs=True)
    torch.cat = cat
    try:
        yield
    finally:
        torch.cat = concatenate
        counting.remove()
        seeing.remove()


def stale_free(events: list[dict[str, Any]], made: tuple[int, int], addr: int, nbytes: int) -> None:
    """Give a CPU trace's events (`traceEvents`) the free of the block held from before the trace at `addr`
    at the stale size `nbytes` (torch's CPU reporter keeps the size of each block an earlier profiling session
    of the process saw at an address, and reports it when a later block there goes): its own free resized
    where this process's earlier profiling already made the reporter report one, else one just after the
    allocation `made` (address, bytes: its replacement's)."""
    at = [e for e in events if e.get("name") == "[memory]" and e["args"]["Addr"] == addr]
    if at and at[0]["args"]["Bytes"] < 0:
        at[0]["args"]["Bytes"] = -nbytes
        return
    index = next(
        i for i, e in enumerate(events)
        if e.get("name") == "[memory]" and (e["args"]["Addr"], e["args"]["Bytes"]) == made
    )  # fmt: skip
    free = {**events[index], "ts": events[index]["ts"] + 0.001}
    free["args"] = {**free["args"], "Addr": addr, "Bytes": -nbytes}
    events.insert(index + 1, free)


def killed_mid_step_script(model: str, cut: int, rows: int, prompt: int, generate: str) -> str:
    """A child process's code (`python -c CODE RUN_DIR`, run from the repository's root): `model` (a Python
    expression) generates under `kvtrace.record(RUN_DIR, profiler=True)`, each layer's update logged as it
    happens, and SIGKILLs itself inside layer 1 of its `cut`-th forward (the OOM killer's way: no exception,
    no teardown), layer 0's update of that forward on disk. `generate`: generate()'s other arguments."""
    import textwrap

    return textwrap.dedent(
        f"""
        import os, signal, sys, time
        import torch, kvtrace
        from kvtrace.llama import ModelSize, build_model
        from tests.tiny import tiny_size

        model = {model}
        second, forwards = model.model.layers[1], []
        forward = second.forward

        def killed_inside(*args, **kwargs):
            forwards.append(1)
            if len(forwards) == {cut}:  # layer 0 has updated its K and V in this forward, layer 1 not yet
                time.sleep(0.3)  # the writer flushes every 0.1 s: layer 0's update is on disk
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(*args, **kwargs)

        second.forward = killed_inside
        ids = torch.randint(3, 1000, ({rows}, {prompt}), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), kvtrace.record(sys.argv[1], model=model, profiler=True):
            model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, {generate}
            )
        """
    )
