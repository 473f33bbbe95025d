"""Stack rules skip texts that hold none of their needles: the same categories as running every pattern."""

from __future__ import annotations

import pickle
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from analyzers.attribution import RULES, _frame_categories
from analyzers.model import KV, WEIGHTS
from analyzers.readers.snapshot import read_snapshot
from analyzers.report import load_source
from analyzers.summary import summarize

SNAPSHOTS = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces" / "snapshots"

# One stack line per rule that its pattern matches, as torch writes frames ("file:line:function").
MATCHING = [
    "transformers/cache_utils.py:812:update",
    "transformers/cache_utils.py:120:lazy_initialization",
    "transformers/cache_utils.py:640:crop",
    "transformers/cache_utils.py:700:batch_repeat_interleave",
    "model.py:88:forward self.cache_k[:bsz] = xk",
    "model.py:90:forward k_cache.index_copy_(2, pos, k)",
    "model.py:91:forward self.key_cache",
    "model.py:92:forward self.cache_v[:bsz] = xv",
    "model.py:93:forward v_cache.index_copy_(2, pos, v)",
    "model.py:94:forward self.value_cache",
    "kvpress/presses/base_press.py:40:forward_hook",
    "transformers/modeling_utils.py:4000:from_pretrained",
    "torch/nn/modules/module.py:2100:load_state_dict",
    "transformers/modeling_utils.py:4500:_load_pretrained_model",
    "transformers/modeling_utils.py:2000:_init_weights",
    "mymodel.py:12:init_weights_list",
    "torch/nn/modules/module.py:900:_apply",
    "torch/nn/modules/module.py:1100:to",
    "torch/nn/modules/linear.py:100:__init__",
    "torch/nn/modules/normalization.py:80:reset_parameters",
]


def test_every_match_holds_one_of_its_rules_needles() -> None:
    # GIVEN frames that each built-in rule matches WHEN a rule's pattern matches a frame
    matched_rules = set()
    for frame in MATCHING:
        for rule in RULES:
            found = rule.pattern.search(frame)
            if found is not None:
                matched_rules.add(rule.label)
                # THEN the matched text itself contains one of the rule's needles (a necessary condition)
                assert rule.needles, rule.label
                assert any(needle in found.group(0) for needle in rule.needles), (rule.label, frame)
    assert matched_rules == {rule.label for rule in RULES}  # every rule exercised


def _stack_texts() -> list[str]:
    texts = ["\n".join(MATCHING[i : i + 3]) for i in range(0, len(MATCHING), 3)]
    texts += ["a.py:1:f\nb.py:2:g", "torch/nn/modules/conv.py:10:__init__", "my_k_cache_helper.py:3:go"]
    for path in sorted(SNAPSHOTS.glob("*.pickle")):
        texts += read_snapshot(path).frames
    return texts


@pytest.mark.skipif(not SNAPSHOTS.exists(), reason="shared/real_traces not present")
def test_needles_change_no_category() -> None:
    # GIVEN the stack texts of every real snapshot plus texts that hit each rule
    texts = _stack_texts()
    # WHEN categories are given with the needles and with every pattern run on every text
    fast = _frame_categories(texts, RULES)
    full = _frame_categories(texts, [replace(rule, needles=()) for rule in RULES])
    # THEN they are the same, and both categories occur
    assert np.array_equal(fast[0], full[0]) and np.array_equal(fast[1], full[1])
    assert {KV, WEIGHTS} <= set(fast[0].tolist())


def _windows(frame: str) -> str:
    """A frame as a Windows install writes it: site-packages under a drive, backslashes."""
    return "D:\\Dev\\x\\.venv\\Lib\\site-packages\\" + frame.replace("/", "\\")


def test_windows_frames_get_the_categories_of_posix_frames() -> None:
    # GIVEN each frame a rule matches, and the same frame with a Windows path
    posix = _frame_categories(MATCHING, RULES)
    windows = _frame_categories([_windows(frame) for frame in MATCHING], RULES)
    # THEN both get the same category and K/V
    assert windows[0].tolist() == posix[0].tolist()
    assert windows[1].tolist() == posix[1].tolist()
    assert -1 not in windows[0].tolist()


@pytest.mark.skipif(
    not (SNAPSHOTS / "memory_snapshot.pickle").exists(), reason="shared/real_traces not present"
)
def test_windows_snapshot_weights(tmp_path: Path) -> None:
    # GIVEN a snapshot whose frames are the real Windows snapshot's own: torch's module.py there, and a
    # user frame; `module.to()` and `nn.Linear.__init__` allocate 3 blocks, the forward pass 1
    real = read_snapshot(SNAPSHOTS / "memory_snapshot.pickle").frames
    module_py = next(
        line.split(".py:")[0] + ".py"
        for text in real
        for line in text.splitlines()
        if line.endswith(":_call_impl") and "\\torch\\nn\\modules\\module.py:" in line
    )
    linear_py = module_py[: -len("module.py")] + "linear.py"
    user = {"filename": "D:\\Dev\\assignment2-systems\\train.py", "line": 10, "name": "<module>"}
    to = [{"filename": module_py, "line": 1340, "name": "to"}, user]
    init = [{"filename": linear_py, "line": 106, "name": "__init__"}, user]
    call = [{"filename": module_py, "line": 1773, "name": "_call_impl"}, user]
    allocs = [(0, 4096, to), (4096, 2048, init), (6144, 1024, to), (7168, 512, call)]
    trace = [{"action": "segment_alloc", "addr": 0, "size": 8192, "time_us": 1}]
    trace += [
        {"action": "alloc", "addr": addr, "size": size, "time_us": 2 + i, "frames": frames}
        for i, (addr, size, frames) in enumerate(allocs)
    ]
    blocks = [
        {"address": addr, "size": size, "requested_size": size, "state": "active_allocated"}
        for addr, size, _frames in allocs
    ]
    segment = {"device": 0, "address": 0, "total_size": 8192, "allocated_size": 7680, "blocks": blocks}
    path = tmp_path / "windows.pickle"
    path.write_bytes(pickle.dumps({"segments": [segment], "device_traces": [trace]}, protocol=4))

    # WHEN it is reported
    (dev,) = summarize(load_source(path)).devices

    # THEN the blocks made by module.to() and Linear.__init__ are the weights
    assert dev.peak_allocated_bytes == 4096 + 2048 + 1024 + 512
    assert dev.categories_at_peak == {"kv": 0, "weights": 4096 + 2048 + 1024, "other": 512}


def test_a_gpu_block_holds_a_storage_as_the_caching_allocator_rounds_it() -> None:
    # c10/cuda/CUDACachingAllocator.cpp: round_size (512 B steps), should_split (a large-pool block is not
    # split when 1 MiB or less would be left), get_free_block (past max_split_size_mb, < 20 MiB over)
    from analyzers.attribution import block_holds

    kib, mib = 1 << 10, 1 << 20
    assert block_holds(8960, 8960)  # as asked (a CPU's, or a multiple of 512)
    assert block_holds(9216, 8960) and block_holds(512, 128)  # rounded up to 512 B
    assert not block_holds(8704, 8960)  # smaller than the storage
    # 11.5 MiB in a fresh 12 MiB segment: 0.5 MiB left over is not split off
    assert block_holds(12 * mib, 11 * mib + 512 * kib)
    assert block_holds(11 * mib + 512 * kib + mib, 11 * mib + 512 * kib)
    assert not block_holds(11 * mib + 512 * kib + mib + 512, 11 * mib + 512 * kib)
    # past max_split_size_mb (> 20 MiB): a cached block of less than 20 MiB more
    assert block_holds(30 * mib + 20 * mib - 512, 30 * mib)
    assert not block_holds(30 * mib + 20 * mib, 30 * mib)


def test_rules_with_line_breaks_or_no_needles_match_as_run_on_every_text() -> None:
    # GIVEN custom rules the line-by-line needle search cannot serve: a needle and a pattern spanning two
    # lines, a rule without needles, and a needle that only a later rule than a matching one holds
    from analyzers.stack_rules import Rule, frame_rule_matches

    rules = [
        Rule(re.compile(r"a\.py:1:f\nb\.py"), KV, "two lines", "k", needles=("f\nb.py",)),
        Rule(re.compile(r"helper"), WEIGHTS, "no needles"),
        Rule(re.compile(r"v_cache"), KV, "v", "v", needles=("v_cache",)),
    ]
    texts = [
        "a.py:1:f\nb.py:2:g",
        "a.py:1:f\nc.py:2:g\nb.py:3:h",
        "x.py:1:helper\ny.py:2:v_cache",
        "y.py:2:v_cache",
    ]
    texts += ["", "b.py:2:g\na.py:1:f"]
    # WHEN categories are given with the needles and with every pattern run on every whole text
    fast = frame_rule_matches(texts, rules)
    full = frame_rule_matches(texts, [replace(rule, needles=()) for rule in rules])
    # THEN they are the same: the two-line rule, the rule without needles first, the v rule
    assert fast == full == ([KV, -1, WEIGHTS, KV, -1, -1], [1, 0, 0, 2, 0, 0])
