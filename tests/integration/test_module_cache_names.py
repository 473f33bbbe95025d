"""Which module each module cache is, and a module holding two K/V pairs. A layer's second cache-holding
module logs under 1001 beside the first's 1000: the manifest names each one's module and attributes, and the
report, its JSON and `diagnose` say it where they list the caches. A module holding two pairs of K/V
attributes (`k_cache`/`v_cache` and `k_cache_local`/`v_cache_local`) has each pair a cache of its own, so
neither overwrites the other's slots in the KV log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import kvtrace
from kvtrace.cli import main
from tests.cli_json import cli_json, report_json
from tests.integration.test_json_docs import _chapter, _unnamed
from tests.integration.test_module_cache_cat_grown import (
    DECODES,
    HEAD_DIM,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    PROMPT,
    ROWS,
    TOKEN_BYTES,
    LiveStorages,
    TwoCacheDecoder,
    _record,
)

HELD = PROMPT + DECODES  # tokens per row each layer holds after the last step
SELF_ATTN = "layers.*.self_attn (k_cache, v_cache)"
CROSS_ATTN = "layers.*.cross_attn (k_cache, v_cache)"


def test_each_module_cache_is_named_by_its_module_in_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder whose every layer holds `self_attn` and `cross_attn`, each with its own K and V
    model = TwoCacheDecoder(False, LiveStorages(), False)  # kept alive: its caches are the end's KV
    _record(tmp_path / "run", model)

    # WHEN the run's manifest and its report (JSON, text) and diagnosis are read
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text(encoding="utf-8"))
    caches = {cache["cache"]: cache for cache in report_json(tmp_path / "run", capsys)["kv"]["caches"]}
    main(["report", str(tmp_path / "run"), "--no-export", "-q"])
    text = capsys.readouterr().out
    notes = cli_json(["diagnose", str(tmp_path / "run"), "--json"], capsys)["notes"]

    # THEN the manifest says which module and attributes each id is, and docs/format.md names its keys
    assert manifest["module_caches"] == [
        {"cache": 1000, "module": "layers.*.self_attn", "k": "k_cache", "v": "v_cache"},
        {"cache": 1001, "module": "layers.*.cross_attn", "k": "k_cache", "v": "v_cache"},
    ]
    assert _unnamed(manifest["module_caches"][0], _chapter("manifest.json")) == []
    assert "module_caches" not in _unnamed(manifest, _chapter("manifest.json"))
    # ... the report's caches carry it, each beside its own bytes (every layer's HELD tokens, K and V)
    assert {cid: (c["module"], c["final_bytes"]) for cid, c in caches.items()} == {
        1000: (SELF_ATTN, LAYERS * 2 * HELD * TOKEN_BYTES),
        1001: (CROSS_ATTN, LAYERS * 2 * HELD * TOKEN_BYTES),
    }
    # ... the text lists each cache with its module
    lines = text.splitlines()
    assert any(line.split()[0] == "1000" and SELF_ATTN in line for line in lines if line.strip())
    assert any(line.split()[:2] == ["1001", "main"] and CROSS_ATTN in line for line in lines if line.strip())
    # ... and so does the diagnosis's note on the caches held
    held = next(note for note in notes if "KV caches were held at the end" in note)
    assert f"cache 1000 is {SELF_ATTN}" in held and f"cache 1001 is {CROSS_ATTN}" in held


def test_a_run_recorded_before_module_names_reads_with_no_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run of two module caches whose manifest has no `module_caches`, as kvtrace wrote them before
    model = TwoCacheDecoder(False, LiveStorages(), False)
    _record(tmp_path / "run", model)
    path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    del manifest["module_caches"]
    path.write_text(json.dumps(manifest), encoding="utf-8")

    # WHEN the report reads it
    kv = report_json(tmp_path / "run", capsys)["kv"]
    main(["report", str(tmp_path / "run"), "--no-export", "-q"])
    text = capsys.readouterr().out

    # THEN both caches read, their bytes as before, with no module named
    assert [(c["cache"], c["module"]) for c in kv["caches"]] == [(1000, None), (1001, None)]
    assert kv["final_bytes"] == 2 * LAYERS * 2 * HELD * TOKEN_BYTES == 25344
    assert "layers.*" not in text


class TwoPairAttention(nn.Module):
    """One module holding two K/V pairs grown by torch.cat, each old tensor released as its new one is
    bound: `k_cache`/`v_cache` and `k_cache_local`/`v_cache_local`."""

    n_kv_heads = KV_HEADS  # both pairs read [batch, kv_heads, seq, head_dim]

    def __init__(self, live: LiveStorages) -> None:
        super().__init__()
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.live = live
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_cache_local: torch.Tensor | None = None
        self.v_cache_local: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, seq, _ = x.shape
        k = self.k(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        born = self.live.born
        if self.k_cache is None or self.v_cache is None:
            self.k_cache, self.v_cache = born(k.contiguous()), born(v.contiguous())
            self.k_cache_local, self.v_cache_local = born(k.contiguous()), born(v.contiguous())
            return x
        assert self.k_cache_local is not None and self.v_cache_local is not None
        self.k_cache = born(torch.cat([self.k_cache, k], 2))
        self.v_cache = born(torch.cat([self.v_cache, v], 2))
        self.k_cache_local = born(torch.cat([self.k_cache_local, k], 2))
        self.v_cache_local = born(torch.cat([self.v_cache_local, v], 2))
        return x


class TwoPairDecoder(nn.Module):
    def __init__(self, live: LiveStorages) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoPairAttention(live) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, start_pos)
        return x


def test_two_kv_pairs_in_one_module_each_count_their_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder whose every layer's one module holds two K/V pairs, named to record() as caches,
    # recorded over a prefill and DECODES decode steps
    live = LiveStorages()
    model = TwoPairDecoder(live)  # kept alive: its caches are the end's KV
    attrs = {"k_cache": "k", "v_cache": "v", "k_cache_local": "k", "v_cache_local": "v"}
    x = torch.randn(ROWS, HELD, HIDDEN)
    run = tmp_path / "run"
    with (
        torch.no_grad(),
        kvtrace.record(run, model=model, profiler=False, snapshots=False, cache_attrs=attrs),
    ):
        model(x[:, :PROMPT], 0)
        for pos in range(PROMPT, HELD):
            model(x[:, pos : pos + 1], pos)

    # WHEN the report reads its KV log
    kv = report_json(run, capsys)["kv"]

    # THEN the end holds both pairs' HELD tokens in every layer: layers x 2 pairs x 2 (K, V) x HELD tokens
    # x rows x kv_heads x head_dim x 4 bytes
    final = LAYERS * 2 * 2 * HELD * ROWS * KV_HEADS * HEAD_DIM * 4
    assert final == 25344
    assert (kv["final_bytes"], live.now) == (final, final)
    # ... its peak is the last tensor's copy (V local of the last layer: HELD new beside HELD - 1 old) at the
    # last step, beside every other tensor grown
    peak = ((LAYERS * 2 * 2 - 1) * HELD + HELD + (HELD - 1)) * TOKEN_BYTES
    assert peak == 27264
    assert (kv["peak_bytes"], live.peak) == (peak, peak)
    # ... and each pair is a cache of its own, named by its attributes
    caches = {cache["cache"]: cache for cache in kv["caches"]}
    assert {cid: (c["module"], c["final_bytes"]) for cid, c in caches.items()} == {
        1000: ("layers.* (k_cache, v_cache)", final // 2),
        1001: ("layers.* (k_cache_local, v_cache_local)", final // 2),
    }
    rows = sorted((row["cache"], row["layer"], row["k_bytes"], row["v_bytes"]) for row in kv["per_layer"])
    one = HELD * TOKEN_BYTES
    assert rows == [(cid, layer, one, one) for cid in (1000, 1001) for layer in range(LAYERS)]


@pytest.mark.parametrize(
    ("held", "pairs"),
    [
        (  # names that differ by their K/V word pair so, whatever their order
            [("k_local", "k"), ("k_global", "k"), ("v_global", "v"), ("v_local", "v")],
            [["k_local", "v_local"], ["k_global", "v_global"]],
        ),
        (  # Meta's and gpt-fast's names on one module
            [("cache_k", "k"), ("cache_v", "v"), ("k_cache", "k"), ("v_cache", "v")],
            [["cache_k", "cache_v"], ["k_cache", "v_cache"]],
        ),
        ([("kc", "k"), ("vc", "v")], [["kc", "vc"]]),  # no K/V word: in order
        ([("k_cache", "k")], [["k_cache"]]),  # a K alone
    ],
)
def test_a_modules_cache_attributes_pair_by_name_then_order(
    held: list[tuple[str, str]], pairs: list[list[str]]
) -> None:
    from kvtrace.integrations.module_caches import pair_cache_attrs

    assert [[attr for attr, _ in pair] for pair in pair_cache_attrs(held)] == pairs
