"""`kvtrace plan --from-run` on the two real OOMs recorded on an H200 under a per-process cap
(sample_traces/h200, 24.96 GiB allowed of a 139.80 GiB device). A plan of the run with no other flag is the
run itself, so it must plan within the memory the run had, the cap its OOM message names: planned on the
whole device, both runs "fit" with about 100 GiB to spare, though both ran out. Every figure is computed
here from the run's own files (its manifest, weights table and model shape); the reserve, which its samples
measure, is checked in tests/integration/test_plan_sampled_reserve.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.cli_json import plan_json

H200 = Path(__file__).resolve().parents[2] / "sample_traces" / "h200"
PROMPT, NEW = 128, 192  # the runs' generate(): a 128-token prompt, max_new_tokens=192 (the h200 README)


def _cap(manifest: dict[str, Any]) -> int:
    """The per-process cap PyTorch's OOM message names ("24.96 GiB allowed;"), in bytes."""
    found = re.search(r"(\d+\.\d\d) GiB allowed;", manifest["ended"]["message"])
    assert found, manifest["ended"]["message"]
    return int(float(found.group(1)) * 2**30)


@pytest.mark.parametrize(("name", "batch"), [("oom_b266", 266), ("oom_b261_fit", 261)])
def test_a_plan_of_a_run_that_ran_out_under_a_cap_is_planned_within_the_cap(
    name: str, batch: int, tmp_path: Path, capsys: Any
) -> None:
    # GIVEN a copy of a real OOM recorded under torch.cuda.set_per_process_memory_fraction
    run = tmp_path / name
    shutil.copytree(H200 / name, run)
    manifest = json.loads((run / "manifest.json").read_text())
    cap = _cap(manifest)
    assert cap == 26_800_595_927  # 24.96 GiB
    assert manifest["device"]["total_memory_bytes"] == 150_109_880_320  # 139.80 GiB: not what it could use
    model = manifest["model"]
    token_layer_k = model["num_kv_heads"] * model["head_dim"] * 2  # one token's K in one layer, bf16
    kv_per_token = model["num_layers"] * 2 * token_layer_k
    assert kv_per_token == 131_072
    weights = sum(json.loads(line)["storage_bytes"] for line in (run / "weights.jsonl").open())
    # WHEN it is planned with no flag but --from-run
    plan = plan_json(run, capsys)
    # THEN the GPU memory is the cap, and the run does not fit, as it did not; its reserve is what its
    # samples' allocator peaks exceed the arithmetic by (tests/integration/test_plan_sampled_reserve.py), not
    # 10% of the cap (2,680,059,592 B: peaks 30,035,802,056 and 29,823,485,896 B)
    held = PROMPT + NEW - 1  # generate() never feeds back its last token
    kv = batch * held * kv_per_token
    transient = batch * (held - 1) * token_layer_k  # torch.cat's new K of one layer beside the old one
    reserve = plan["reserve_bytes"]
    assert 0 < reserve < cap // 10
    peak = weights + kv + transient + reserve
    assert plan["request"]["gpu_memory_bytes"] == cap
    assert (plan["kv_bytes"], plan["weights_bytes"]) == (kv, weights)
    assert plan["peak_bytes"] == peak == {266: 27_992_097_280, 261: 27_765_949_440}[batch]
    assert plan["headroom_bytes"] == cap - peak < 0
    assert plan["fits"] is False
    assert any("per-process limit the run ran out under, 24.96 GiB" in note for note in plan["notes"])
    # AND a --gpu-memory typed still wins over the cap
    typed = plan_json(run, capsys, "--gpu-memory", "80GiB")
    assert typed["request"]["gpu_memory_bytes"] == 80 * 2**30
    assert not any("per-process limit" in note for note in typed["notes"])
