"""A model converted inside `record()` (`model.to(torch.bfloat16)`): the report counts the weights the model
held at each moment, the new ones after the conversion and not the old ones, with the profiler on and off,
and says when they changed (kvtrace/model_weights.py, analyzers/readers/weight_changes.py)."""

from __future__ import annotations

import copy
import gzip
import io
import json
import pickle
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import kvtrace
from analyzers.report import build_report
from kvtrace.cli import main
from kvtrace.llama import build_model
from kvtrace.run_reader import read_run
from tests.tiny import HEAD_DIM, HEADS, HIDDEN, stale_free, tiny_size

ROOT = Path(__file__).resolve().parents[2]

LAYERS, KV_HEADS, INTERMEDIATE, VOCAB = 2, 2, 128, 1000
BATCH, PROMPT, NEW = 2, 5, 4
SIZE = tiny_size(LAYERS, KV_HEADS)  # tied embeddings: one vocab x hidden matrix

# Parameters of the tiny Llama 3, by hand: the embedding (lm_head is the same matrix), per layer q/k/v/o,
# the MLP's gate/up/down and two RMSNorms, then the final norm.
PER_LAYER = (
    HIDDEN * HEADS * HEAD_DIM  # q_proj
    + 2 * HIDDEN * KV_HEADS * HEAD_DIM  # k_proj, v_proj
    + HEADS * HEAD_DIM * HIDDEN  # o_proj
    + 3 * HIDDEN * INTERMEDIATE  # gate, up, down
    + 2 * HIDDEN  # input and post-attention norms
)
EMBEDDING = VOCAB * HIDDEN
PARAMETERS = EMBEDDING + LAYERS * PER_LAYER + HIDDEN
# RoPE's buffers: inv_freq and original_inv_freq, head_dim / 2 frequencies each (converted with the rest)
BUFFERS = 2 * (HEAD_DIM // 2)
W32 = (PARAMETERS + BUFFERS) * 4
W16 = (PARAMETERS + BUFFERS) * 2
# The KV cache after generate(): 2 layers x K and V x rows x KV heads x head_dim x tokens x 2 B (bf16)
TOKENS = PROMPT + NEW - 1  # the last token generated is never fed back
KV16 = LAYERS * 2 * BATCH * KV_HEADS * HEAD_DIM * TOKENS * 2


def _record(out: Path, profiler: bool, convert: str = "to") -> tuple[Path, torch.nn.Module, object]:
    """The run, the model, and generate()'s output, which holds the cache (its KV is live at the end)."""
    model = build_model(SIZE, seed=0)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    assert sum(b.numel() for b in model.buffers()) == BUFFERS
    ids = torch.randint(3, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(out, model=model, profiler=profiler):
        if convert == "to":
            model.to(torch.bfloat16)
        else:  # the head's own conversion: not the recorded model's `_apply`
            model.lm_head.to(torch.bfloat16)  # tied: the embedding's storage too
            model.model.to(torch.bfloat16)
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0, return_dict_in_generate=True,
        )  # fmt: skip
    return out, model, generated


def _final(report: object, category: str) -> int:
    timeline = report.timelines[0]  # type: ignore[attr-defined]
    return int(timeline.by_category[category][-1])


@pytest.mark.parametrize("profiler", [False, True], ids=["profiler_off", "profiler_on"])
def test_weights_converted_to_bfloat16_inside_the_block_count_at_their_new_size(
    tmp_path: Path, profiler: bool
) -> None:
    # GIVEN a float32 model converted to bfloat16 inside the block, then generating
    run, model, _generated = _record(tmp_path / "run", profiler)
    tensors = [*model.parameters(), *model.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert sum(storages.values()) == W16  # what torch holds after the conversion
    # WHEN the run is reported
    _source, report = build_report(run)
    device = report.devices[0]
    # THEN the weights at the end are the bfloat16 ones, and the KV cache is bfloat16's
    assert _final(report, "weights") == W16
    assert report.kv.final_bytes == _final(report, "kv") == KV16
    if not profiler:  # the KV log over the weights: nothing else
        assert device.final_allocated_bytes == W16 + KV16
        assert device.peak_allocated_bytes == W32  # the float32 weights, before the conversion
    else:
        # The conversion makes each new storage before it frees the old one, the embedding first: the
        # float32 weights and the embedding's bfloat16 copy were held together.
        assert device.categories_at_peak["weights"] == W32 + EMBEDDING * 2
        assert device.final_allocated_bytes - W16 - KV16 == _final(report, "other")
        assert device.bytes_by_method["weights_table"] == W16  # the new storages' allocations
    # AND the geometry is the model's as it ran, and a note says when its weights changed
    assert report.geometry is not None and report.geometry["dtype"] == "bfloat16"
    changed = [n for n in report.notes if n.startswith("the model's weights changed during the run")]
    assert len(changed) == 1 and "before the first step" in changed[0]
    assert "float32 storages on cpu (" in changed[0] and "bfloat16 storages on cpu (" in changed[0]


def test_weights_jsonl_logs_each_storage_taken_and_freed_after_the_start_lines(tmp_path: Path) -> None:
    # GIVEN a run whose model was converted inside the block
    run, _model, _generated = _record(tmp_path / "run", profiler=False)
    lines = [json.loads(line) for line in (run / "weights.jsonl").read_text().splitlines()]
    # THEN the start lines are as before (no change fields), each storage once
    start = [line for line in lines if "event" not in line]
    assert {tuple(sorted(line)) for line in start} == {
        ("addr", "device", "dtype", "name", "shape", "storage_bytes")
    }
    assert sum(line["storage_bytes"] for line in start) == W32
    # AND every one of them is freed, and the bfloat16 ones added, at step 0 (before the first forward)
    freed = [line for line in lines if line.get("event") == "freed"]
    added = [line for line in lines if line.get("event") == "added"]
    assert sorted(line["name"] for line in freed) == sorted(line["name"] for line in start)
    assert sum(line["storage_bytes"] for line in added) == W16
    assert {line["dtype"] for line in added} == {"bfloat16"}
    assert {line["step"] for line in freed + added} == {0}
    assert lines.index(freed[0]) < lines.index(added[0])  # a new storage may take a freed one's address
    # AND the reader keeps `weights` the start's, the changes apart
    read = read_run(run)
    assert sum(w.storage_bytes for w in read.weights) == W32
    assert len(read.weight_changes) == len(freed) + len(added)


def test_old_weights_still_held_elsewhere_stay_counted_and_a_warning_says_so(tmp_path: Path) -> None:
    # GIVEN a float32 model whose state dict is kept while it is converted inside the block
    model = build_model(SIZE, seed=0)
    ids = torch.randint(3, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        kept = model.state_dict()  # the float32 tensors: their storages outlive the conversion
        model.to(torch.bfloat16)
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    # WHEN the run is reported
    _source, report = build_report(tmp_path / "run")
    # THEN the float32 parameters the state dict holds (RoPE's buffers are not in it: freed) are memory at
    # the end beside the bfloat16 weights, and a warning says why
    assert _final(report, "weights") == PARAMETERS * 4 + W16
    held = len({t.untyped_storage().data_ptr() for t in kept.values()})  # lm_head.weight is the embedding
    assert held == len(list(model.parameters()))
    assert any(
        n.startswith(f"{held} weight storages ({PARAMETERS * 4:,} B) the model let go") for n in report.notes
    )


def test_a_submodule_converted_on_its_own_is_found_at_the_end(tmp_path: Path) -> None:
    # GIVEN a model whose parts are converted one by one (no `.to()` of the recorded model itself)
    run, _model, _generated = _record(tmp_path / "run", profiler=False, convert="parts")
    # WHEN the run is reported
    _source, report = build_report(run)
    # THEN the end state is right, and a warning says the change was found only at the end
    assert _final(report, "weights") == W16
    assert any("kvtrace found the change at the block's end" in n for n in report.notes)
    changes = read_run(run).weight_changes
    assert changes and {c.step for c in changes} == {NEW}  # the steps begun by the end


def test_a_copy_converted_inside_the_block_is_not_the_models_and_nothing_is_left_after(
    tmp_path: Path, watched_models: list[torch.nn.Module]
) -> None:
    # GIVEN a recorded model, and a deep copy of it made and converted inside the block
    model = build_model(SIZE, seed=0)
    watched_models.append(model)  # the leak guard checks its `_apply` after the test
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        twin = copy.deepcopy(model).to(torch.bfloat16)
        pickled = pickle.loads(pickle.dumps(model))  # kvtrace's `_apply` is on the class, not the model
    # THEN the model's weights never changed, and none of them keeps kvtrace's `_apply`
    assert read_run(tmp_path / "run").weight_changes == []
    assert twin.dtype == torch.bfloat16 and model.dtype == torch.float32
    for module in (model, twin, pickled):
        assert "_apply" not in module.__dict__
    assert "_apply" not in type(model).__dict__


def _rewrite(path: Path, lines: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_freed_line_for_a_storage_no_line_holds_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real run whose model was converted inside the block, read as recorded
    run, _model, _generated = _record(tmp_path / "run", profiler=False)
    weights = run / "weights.jsonl"
    lines = [json.loads(line) for line in weights.read_text().splitlines()]
    assert main(["report", str(run), "--no-export"]) == 0
    capsys.readouterr()
    first_freed = next(line for line in lines if line.get("event") == "freed")
    listed = {line["addr"] for line in lines}
    unknown = max(listed) + 4096
    cases = {
        # a `freed` line at an address no line lists: it read as 41 storages freed where 40 were held, the
        # peak 32 MiB higher and the final weights 1.44 MiB where the model held 32.75 MiB
        "unknown address": [*lines, {**first_freed, "addr": unknown}],
        # the same storage freed twice: its bytes taken off twice
        "freed twice": [*lines, first_freed],
    }
    for case, edited in cases.items():
        _rewrite(weights, edited)
        addr = edited[-1]["addr"]
        for argv in (["report", str(run), "--no-export"], ["diagnose", str(run)]):
            # THEN every command refuses the file in one line naming it, the line and the storage, exit 2
            assert main(argv) == 2, case
            said = f"{weights}: line {len(edited)}: 'freed' line for a storage that no line above holds"
            assert f"{said} (addr {addr} on cpu)" in _one_error(capsys), case


@pytest.mark.parametrize("field", ["t_ns", "step"])
def test_a_change_line_without_its_time_or_step_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    # GIVEN a real run whose model was converted inside the block, its weights.jsonl without `field` on every
    # line (the start's lines never have it: they stay valid)
    run, _model, _generated = _record(tmp_path / "run", profiler=False)
    weights = run / "weights.jsonl"
    lines = [json.loads(line) for line in weights.read_text().splitlines()]
    _rewrite(weights, [{k: v for k, v in line.items() if k != field} for line in lines])
    first_change = next(number for number, line in enumerate(lines, start=1) if "event" in line)
    assert first_change > 1
    # THEN the first change line is refused in one line, exit 2 (it read as t_ns 0: a lower peak and a false
    # "peak before the trace" note; or as step 0: "before the first step")
    assert main(["report", str(run), "--no-export"]) == 2
    assert f"{weights}: line {first_change}: 'freed' line without '{field}'" in _one_error(capsys)


def test_a_weights_free_at_a_stale_size_is_read_at_its_own(tmp_path: Path) -> None:
    # GIVEN the float32 model converted inside the block under the profiler, whose CPU trace reports the free
    # of a float32 storage held from the start (the embedding's) at another block's size: torch's CPU reporter
    # keeps the size of each block an earlier profiling session of the process saw allocated at an address,
    # and reports it when a later block there goes (a full test session's earlier runs did: one in a few).
    # Recorded in a process of its own: this session's earlier profiling sessions may leave stale sizes of
    # their own at these addresses, beside the one made here (a full session failed once so)
    run = tmp_path / "run"
    recording = (
        "import sys; from pathlib import Path; from tests.integration.test_weights_change import _record; "
    )
    recording += "_record(Path(sys.argv[1]), profiler=True)"
    done = subprocess.run(
        [sys.executable, "-c", recording, str(run)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = read_run(run)
    old = next(w for w in recorded.weight_changes if w.event == "freed" and w.storage_bytes == EMBEDDING * 4)
    new = next(w for w in recorded.weight_changes if w.event == "added" and w.name == old.name)
    (trace_path,) = (run / "profiler").glob("*.pt.trace.json*")
    opener = gzip.open if trace_path.suffix == ".gz" else open
    with opener(trace_path, "rt") as fh:
        trace = json.load(fh)
    events = trace["traceEvents"]
    stale_free(events, (new.addr, new.storage_bytes), old.addr, old.storage_bytes + 16384)
    with opener(trace_path, "wt") as fh:
        json.dump(trace, fh)
    # WHEN the run is reported
    _source, report = build_report(run)
    device = report.devices[0]
    # THEN that free lets go of the storage's own bytes: the figures are the unaltered run's
    assert _final(report, "weights") == W16
    assert device.categories_at_peak["weights"] == W32 + EMBEDDING * 2
    assert device.final_allocated_bytes - W16 - KV16 == _final(report, "other")
    # AND the export's level at the block's start holds the float32 weights alone
    tables = tmp_path / "tables"
    assert main(["export", str(run), "-o", str(tables), "-q"]) == 0
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["query", str(tables), "--json", "SELECT baseline_bytes FROM devices"]) == 0
    assert json.loads(out.getvalue()) == [{"baseline_bytes": W32}]


def test_a_block_that_frees_an_earlier_cells_output_ends_holding_its_own(tmp_path: Path) -> None:
    # GIVEN a notebook's habit: `out = generate(...)` recorded, then again in the next cell, whose assignment
    # frees the first output inside the second block, after the second's own allocations (a free of a block
    # the second trace never saw allocated)
    model = build_model(SIZE, seed=0)
    ids = torch.randint(3, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))

    def generate() -> torch.Tensor:
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip

    with torch.no_grad():
        with kvtrace.record(tmp_path / "a", model=model):
            out = generate()
        held_before = out.untyped_storage().nbytes()
        with kvtrace.record(tmp_path / "b", model=model):
            out = generate()
    # WHEN the second run is reported
    _source, report = build_report(tmp_path / "b")
    device = report.devices[0]
    # THEN it ends holding the weights and its own output (the cache is gone with generate()), and the first
    # output was held until its free: the level at the block's start holds it beside the weights
    assert device.final_allocated_bytes == W32 + out.untyped_storage().nbytes()
    assert device.peak_allocated_bytes >= W32 + held_before + out.untyped_storage().nbytes()
    assert held_before == BATCH * (PROMPT + NEW) * 8  # int64 ids
