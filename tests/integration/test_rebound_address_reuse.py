"""A layer rebound between two decode steps by code outside the cache's update (a logits processor that
copies a layer's K and V), its old storages released: the next step's torch.cat is often handed one of
their addresses (by malloc here, by the CUDA caching allocator most of the time there), for the rebound
layer's own new storage or for an earlier layer's, updated before it. The log must say that the old storage
was freed before a new one is made at its address, not that the old one was written, nor that a new storage
of an earlier layer sits over one still live, so that its replay by address gives what the cache holds at
each step's end.

Whether malloc hands the address back is the allocator's choice, which depends on what the process
allocated and freed before: each case generates in a fresh interpreter (this file run as a script, its heap
the same at every run) until malloc did (the first to third generation there), and the test checks the log
of that generation against the addresses the processor saw. In a process that ran other tests first it may
not happen in a dozen generations.

Full mode captures each layer's update as it happens and its writer thread drains the captures every 0.1 s,
which may fall between an earlier layer's new storage and the rebound layer's update that captures the
release: the `-drained` case makes the writer's drain (`Recording._flush`) run after every layer update.

    python test_rebound_address_reuse.py LAYERS REBOUND PROFILER DRAINED OUT_DIR  # prints {"run":, "addr":}
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from kvlog_math import assert_addresses_freed_before_reuse, assert_well_ordered, kv_bytes
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import kvtrace
from analyzers.kv_log import analyze_kv_log
from kvtrace.cli import main
from kvtrace.llama import DEFAULT_PROMPTS, build_model, encode_batch, llama3_tokenizer
from kvtrace.run_reader import read_run
from tests.tiny import HEAD_DIM, cache_arg
from tests.writer_drain import flush_after_each_update

REPO = Path(__file__).resolve().parents[2]

NEW_TOKENS = 6
REBIND_AT_CALL = NEW_TOKENS - 1  # before the last step: the final state depends on its update
ATTEMPTS = 12
KV_HEADS, F32 = 2, 4


class RebindToCopies(LogitsProcessor):
    """At its `at_call`-th call, rebinds one layer of `cache` to copies of its K and V, keeping no reference
    to the old tensors, so their storages are released. At every call it notes each layer's K and V storage
    addresses (ints only): where each step's storages really are."""

    def __init__(self, cache: DynamicCache, layer: int, at_call: int) -> None:
        self.cache, self.layer, self.at_call = cache, layer, at_call
        self.addresses: list[list[tuple[int, int]]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        layers = self.cache.layers
        self.addresses.append(
            [
                (one.keys.untyped_storage().data_ptr(), one.values.untyped_storage().data_ptr())
                for one in layers
            ]
        )
        if len(self.addresses) == self.at_call:
            layer = layers[self.layer]
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        return scores


def _generate_until_reused(
    layers: int, rebound: int, profiler: bool, drained: bool, out_dir: Path
) -> tuple[Path, int]:
    """Record generations of the tests' tiny Llama 3 with `layers` layers on their two real prompts until the
    step after the rebinding put a new storage of any layer (the rebound one's or an earlier one's; with
    `drained`, an earlier one's, so that a drain falls between the two) at an address of one of the rebound
    layer's released ones; that run, and the address."""
    from conftest import PAD_ID, TINY

    model = build_model(dataclasses.replace(TINY, num_layers=layers))
    ids, mask = encode_batch(llama3_tokenizer(), list(DEFAULT_PROMPTS[:2]), PAD_ID)
    for attempt in range(ATTEMPTS):
        run = out_dir / f"run{attempt}"
        cache = DynamicCache(config=model.config)
        rebind = RebindToCopies(cache, rebound, REBIND_AT_CALL)
        with torch.no_grad(), kvtrace.record(run, model=model, profiler=profiler) as recording:
            if drained:
                flush_after_each_update(recording)
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                **cache_arg(cache),
                logits_processor=LogitsProcessorList([rebind]),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
        released = set(rebind.addresses[REBIND_AT_CALL - 1][rebound])
        now = rebind.addresses[REBIND_AT_CALL]
        reused = released & {addr for layer in (now[:rebound] if drained else now) for addr in layer}
        if reused:
            return run, reused.pop()
    raise RuntimeError(f"malloc never gave a released K/V address back to the next update in {ATTEMPTS} runs")


def _generate_in_fresh_process(
    layers: int, rebound: int, profiler: bool, drained: bool, out_dir: Path
) -> tuple[Path, int]:
    """`_generate_until_reused` in an interpreter of its own (this file as a script)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    flags = [str(layers), str(rebound), str(int(profiler)), str(int(drained))]
    argv = [sys.executable, __file__, *flags, str(out_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    return Path(said["run"]), int(said["addr"])


def _report_kv(run: Path) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(run), "--json", "--no-export"]) == 0
    return json.loads(out.getvalue())["kv"]


# (layers, rebound layer, profiler, drained). Full mode checks the layer updated last before each update
# (`_rebound` in kvtrace.integrations.hf_caches), so it logs the last layer's copies as they were made. A
# middle layer's release is captured at its own update, a few layers after an earlier layer's new storage
# took the address; the writer thread's drain may fall between the two (4 of 30 generations on a loaded
# machine before it searched the slots for released storages): `-drained` makes it fall there every time.
CASES = [
    (2, 0, False, False),
    (2, 0, True, False),
    (2, 1, False, False),
    (2, 1, True, False),
    (4, 2, False, False),
    (4, 2, True, False),
    (4, 2, True, True),
]


@pytest.mark.parametrize(
    ("layers", "rebound", "profiler", "drained"),
    CASES,
    ids=[
        "first-of-2-light",
        "first-of-2-full",
        "last-of-2-light",
        "last-of-2-full",
        "third-of-4-light",
        "third-of-4-full",
        "third-of-4-full-drained",
    ],
)
def test_a_new_storage_at_a_released_storage_s_address_is_logged_after_its_free(
    prompt_batch: Any, tmp_path: Path, layers: int, rebound: int, profiler: bool, drained: bool
) -> None:
    # GIVEN a generate() whose logits processor rebinds one layer to copies before the last step, and whose
    # last step made a new K or V storage of that layer, or of an earlier one, at a released one's address
    # (drained: an earlier one's, with the writer's drain after each layer update, so between the two)
    run, reused_addr = _generate_in_fresh_process(layers, rebound, profiler, drained, tmp_path)
    events = read_run(run).kv_events
    assert_well_ordered(events)
    # THEN the released storage is freed before a new storage is logged at its address ...
    assert_addresses_freed_before_reuse(events)
    step = REBIND_AT_CALL + 1
    at_reused = [e.event for e in events if e.step == step and e.phase == "decode" and e.addr == reused_addr]
    assert at_reused == ["freed", "grown"]
    # ... every update of this dynamic cache made a new storage: none is written in place
    # (but the copies themselves, where full mode sees them before the next step's first update)
    copies = ["replaced"] * 2 if profiler and rebound == layers - 1 else []
    grown = ["grown"] * 2 * layers
    updates = [e.event for e in events if e.event in ("created", "grown", "replaced", "written")]
    assert updates == ["created"] * 2 * layers + grown * (NEW_TOKENS - 2) + copies + grown
    # ... and the replay by address holds, at every step's end, the K and V of every layer at that step
    rows, prompt = prompt_batch.rows, prompt_batch.prompt_len

    def held(tokens: int) -> int:
        return layers * 2 * kv_bytes(KV_HEADS, HEAD_DIM, tokens, rows, F32)

    step_live = analyze_kv_log(events).step_live
    assert {s: sum(step_live[s].values()) for s in range(1, NEW_TOKENS + 1)} == {
        s: held(prompt + s - 1) for s in range(1, NEW_TOKENS + 1)
    }
    # AND the report's final KV is what the cache held at the end
    assert _report_kv(run)["final_bytes"] == held(prompt + NEW_TOKENS - 1)


if __name__ == "__main__":
    found_run, found_addr = _generate_until_reused(
        int(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3])), bool(int(sys.argv[4])), Path(sys.argv[5])
    )
    print(json.dumps({"run": str(found_run), "addr": found_addr}))
