"""NVTX ranges of a real recording, seen by a real NVTX tool (an injection library built by the test)."""

from __future__ import annotations

from pathlib import Path

from tests.nvtx_tool.harness import range_events, run_with_tool

LAYERS, NEW = 3, 4

SCRIPT = f"""
import torch, kvtrace
from kvtrace.llama import ModelSize, build_model
model = build_model(ModelSize(hidden_size=64, intermediate_size=128, num_layers={LAYERS}, num_heads=4,
                              num_kv_heads=2, vocab_size=1000))
ids = torch.randint(3, 1000, (2, 9))
with torch.no_grad(), kvtrace.record(RUN, model=model, profiler=False):
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens={NEW}, min_new_tokens={NEW},
                   do_sample=False, pad_token_id=0)
"""


def test_nvtx_sees_prefill_every_decode_step_and_every_layer_update(tmp_path: Path) -> None:
    # GIVEN generate() recorded in a process that has an NVTX tool attached
    events = run_with_tool(f"RUN = {str(tmp_path / 'run')!r}\n" + SCRIPT, tmp_path)
    ranges = range_events(events)
    # THEN the kvtrace domain holds, in order: each step's range enclosing one update range per layer
    expected: list[tuple[str, str, str]] = []
    steps = ["kvtrace/prefill"] + [f"kvtrace/decode {i}" for i in range(1, NEW)]
    for step in steps:
        expected.append(("push", "kvtrace", step))
        for layer in range(LAYERS):
            expected += [("push", "kvtrace", f"kvtrace/kv_update L{layer}"), ("pop", "kvtrace", "")]
        expected.append(("pop", "kvtrace", ""))
    assert ranges == expected
    depth = 0
    for kind, _, _ in ranges:
        depth += {"push": 1, "pop": -1}.get(kind, 0)
        assert depth >= 0
    assert depth == 0


WINDOW, PROMPT, CROP = 8, 9, 2

SLIDING_SCRIPT = f"""
import torch, kvtrace
from transformers import DynamicCache
from kvtrace.llama import ModelSize, build_model, llama3_config
size = ModelSize(hidden_size=64, intermediate_size=128, num_layers={LAYERS}, num_heads=4, num_kv_heads=2,
                 vocab_size=1000)
model = build_model(size)
cache = DynamicCache(config=llama3_config(size, sliding_window={WINDOW}))
ids = torch.randint(3, 1000, (2, {PROMPT}))
with torch.no_grad(), kvtrace.record(RUN, model=model, profiler=False):
    model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens={NEW},
                   min_new_tokens={NEW}, do_sample=False, pad_token_id=0)
    plain = DynamicCache()  # a sliding layer refuses a crop once its window is full
    model(ids, past_key_values=plain, use_cache=True)
    plain.crop(-{CROP})
"""


def test_window_and_crop_evictions_get_evict_ranges(tmp_path: Path) -> None:
    # GIVEN a sliding-window cache (it keeps the last WINDOW - 1 tokens of each update) that takes a prompt
    # longer than that, then a decode step at a time; then a plain cache's prefill, cropped after it
    assert PROMPT > WINDOW - 1  # the prefill already lets tokens go, and every decode step one more
    events = run_with_tool(f"RUN = {str(tmp_path / 'run')!r}\n" + SLIDING_SCRIPT, tmp_path)
    ranges = range_events(events)

    # THEN every update that let tokens go holds one evict range per K and V tensor it shortened, inside
    # its kv_update range; the plain prefill none; the crop, outside any forward, one per K and V of a layer
    def evict(layer: int) -> list[tuple[str, str, str]]:
        return [
            event
            for kv in "kv"
            for event in (("push", "kvtrace", f"kvtrace/evict L{layer} {kv}"), ("pop", "kvtrace", ""))
        ]

    expected: list[tuple[str, str, str]] = []
    steps = ["kvtrace/prefill"] + [f"kvtrace/decode {i}" for i in range(1, NEW)]
    for step in steps:
        expected.append(("push", "kvtrace", step))
        for layer in range(LAYERS):
            expected.append(("push", "kvtrace", f"kvtrace/kv_update L{layer}"))
            expected += evict(layer)
            expected.append(("pop", "kvtrace", ""))
        expected.append(("pop", "kvtrace", ""))
    expected.append(("push", "kvtrace", "kvtrace/prefill"))
    for layer in range(LAYERS):
        expected += [("push", "kvtrace", f"kvtrace/kv_update L{layer}"), ("pop", "kvtrace", "")]
    expected.append(("pop", "kvtrace", ""))
    for layer in range(LAYERS):
        expected += evict(layer)
    assert ranges == expected


PRESS_SCRIPT = f"""
import torch, kvtrace
from transformers import DynamicCache
from kvtrace.llama import ModelSize, build_model
model = build_model(ModelSize(hidden_size=64, intermediate_size=128, num_layers={LAYERS}, num_heads=4,
                              num_kv_heads=2, vocab_size=1000))
cache = DynamicCache()
def press(module, args, output):  # compresses the layer right after its attention, as kvpress does
    layer = cache.layers[module.layer_idx]
    keys, values = layer.keys[:, :, -4:, :].contiguous(), layer.values[:, :, -4:, :].contiguous()
    layer.keys, layer.values = keys, values
for decoder_layer in model.model.layers:
    decoder_layer.self_attn.register_forward_hook(press)
ids = torch.randint(3, 1000, (2, 9))
with torch.no_grad(), kvtrace.record(RUN, model=model, profiler=False):
    model(input_ids=ids, past_key_values=cache, use_cache=True)
"""


def test_nvtx_evict_ranges_follow_the_update_of_the_layer_evicted(tmp_path: Path) -> None:
    # GIVEN an attention hook that evicts from each layer before the next layer's update
    events = run_with_tool(f"RUN = {str(tmp_path / 'run')!r}\n" + PRESS_SCRIPT, tmp_path)
    # THEN each layer's evict ranges sit between its own update range and the next layer's
    expected: list[tuple[str, str, str]] = [("push", "kvtrace", "kvtrace/prefill")]
    for layer in range(LAYERS):
        for name in (f"kvtrace/kv_update L{layer}", f"kvtrace/evict L{layer} k", f"kvtrace/evict L{layer} v"):
            expected += [("push", "kvtrace", name), ("pop", "kvtrace", "")]
    expected.append(("pop", "kvtrace", ""))
    assert range_events(events) == expected
