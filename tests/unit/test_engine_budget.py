"""analyzers.planning.engine_budget on hand-made engine files: the pool that fits a budget, in each engine's
knobs. Expected settings come from the engines' own sizing rules, written out here (transformers'
num_sectors_from_config, by search; vLLM's whole blocks and its utilization share)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from analyzers.planning.engine_budget import engine_budget
from analyzers.readers.engine_files import read_engine
from tests.engine_files import ENGINE_JSON, write_engine_run


def _crossing(budget: int, other: int, pool: int) -> dict[str, Any]:
    """The report's budget for a pool allocated at step 0 on top of `other` bytes."""
    return {
        "bytes": budget,
        "crossed": other + pool > budget,
        "peak_bytes": other + pool,
        "step": 0,
        "before_first_step": True,
        "request_bytes": pool,
        "request_category": "kv",
        "allocated_before_bytes": other,
        "allocated_after_bytes": other + pool,
        "partial": False,
        "unseen_bytes": 0,
    }


def _hf_engine(per_block: int, per_sector: int, num_blocks: int) -> dict[str, Any]:
    engine = json.loads(json.dumps(ENGINE_JSON))
    pool = (num_blocks + 2) * per_sector
    engine.update(
        name="transformers-cb",
        version="5.24.0",
        bytes_per_block=per_block,
        bytes_per_sector=per_sector,
        num_blocks=pool // per_block,
        blocks_reserved=2 * per_sector // per_block,
        kv_cache_bytes=pool,
    )
    engine["config"] = {"block_size": 4, "device": "cpu"}
    return engine


def test_num_blocks_is_the_largest_whose_sectors_fit_when_a_sector_holds_two_blocks(tmp_path: Path) -> None:
    # GIVEN a pool grown by sectors of two blocks (two attention types), 16 data sectors, 20,000 B of room
    per_block, per_sector = 1536, 3072
    engine = _hf_engine(per_block, per_sector, num_blocks=16)
    run = read_engine(write_engine_run(tmp_path / "run", engine=engine))
    assert run is not None
    other, room = 500_000, 20_000
    got = engine_budget(run, _crossing(other + room, other, engine["kv_cache_bytes"]), 10**9)
    assert (got.crossed_by, got.room_bytes) == ("pool", room)

    # THEN num_blocks is the largest whose pool (sectors for it, plus two trash sectors) fits the room
    def pool_of(blocks: int) -> int:  # transformers' num_sectors_from_config, then the two trash sectors
        return (max(1, math.ceil(blocks * per_block / per_sector)) + 2) * per_sector

    best = max(n for n in range(1, 100) if pool_of(n) <= room)
    remedies = {r.knob: r for r in got.remedies}
    assert (remedies["num_blocks"].setting, remedies["num_blocks"].fits) == (best, True) == (8, True)
    # AND max_memory_percent of the memory free after the rest keeps within the room
    percent = remedies["max_memory_percent"].setting
    assert percent * (10**9 - other) <= room < percent * 1.01 * (10**9 - other)


def test_no_num_blocks_fits_when_the_rest_leaves_less_than_a_pool(tmp_path: Path) -> None:
    engine = _hf_engine(2048, 2048, num_blocks=32)
    run = read_engine(write_engine_run(tmp_path / "run", engine=engine))
    assert run is not None
    # two trash sectors and one block need 6,144 B: 6,000 B of room fit none
    got = engine_budget(run, _crossing(100_000 + 6_000, 100_000, engine["kv_cache_bytes"]), None)
    (remedy,) = got.remedies  # no device total: no max_memory_percent
    assert (remedy.knob, remedy.setting, remedy.fits) == ("num_blocks", None, False)


def test_vllm_on_a_gpu_prices_whole_blocks_and_a_utilization_share(tmp_path: Path) -> None:
    # GIVEN the hand-made vLLM pool (640 B, 128 B a block) on a 100,000 B GPU, 10,000 B besides it
    engine = json.loads(json.dumps(ENGINE_JSON))
    engine["config"].update(device="cuda", kv_cache_memory_bytes=None)
    run = read_engine(write_engine_run(tmp_path / "run", engine=engine))
    assert run is not None
    budget, other = 10_600, 10_000
    got = engine_budget(run, _crossing(budget, other, 640), 100_000)
    remedies = {r.knob: r for r in got.remedies}
    # THEN kv_cache_memory_bytes: the whole blocks in the 600 B of room
    assert (remedies["kv_cache_memory_bytes"].setting, remedies["kv_cache_memory_bytes"].fits) == (512, True)
    # AND gpu_memory_utilization: the budget's share of the GPU, rounded down to 2 decimals
    util = remedies["gpu_memory_utilization"]
    assert util.setting == 0.1 and util.setting * 100_000 <= budget
    # 10,000 B of that share are the rest: no pool is left, so vLLM would refuse to start
    assert util.fits is False
    # WHEN the budget leaves 2,000 B beside the rest THEN that share leaves the pool 15 whole blocks
    roomy = {r.knob: r for r in engine_budget(run, _crossing(12_000, other, 640), 100_000).remedies}
    assert (roomy["gpu_memory_utilization"].setting, roomy["gpu_memory_utilization"].fits) == (0.12, True)
    assert "(15 blocks)" in roomy["gpu_memory_utilization"].sentence
