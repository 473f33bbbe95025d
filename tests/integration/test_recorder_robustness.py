"""The recorder when things go wrong: exceptions, Ctrl-C, SIGKILL, misuse, and caches it has never seen."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kvlog_math import assert_well_ordered, kv_bytes, replay_live_bytes

import kvtrace
from kvtrace.format import KV_EVENTS, MANIFEST, MEMORY_SAMPLES
from kvtrace.recorder import RecordingError
from kvtrace.run_reader import read_run
from tests.cli_json import report_json

REPO_ROOT = Path(__file__).resolve().parents[2]
FAIL_AT_FORWARD = 3  # the decode forward in which the failure strikes


class Boom(RuntimeError):
    pass


def _jsonl_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _generate_failing(model: Any, batch: Any, out_dir: Path, error: BaseException) -> None:
    """Generate under record(), raising `error` from the last decoder layer of forward FAIL_AT_FORWARD:
    after that forward's KV updates, before its step ends."""
    calls = 0

    def fail(module: Any, args: Any, output: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == FAIL_AT_FORWARD:
            raise error

    handle = model.model.layers[-1].register_forward_hook(fail)
    try:
        with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=False):
            model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=8,
                min_new_tokens=8,
                do_sample=False,
            )
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("error", "status"),
    [(Boom("layer 1 exploded"), "exception"), (KeyboardInterrupt("stop it"), "interrupted")],
    ids=["exception", "keyboard-interrupt"],
)
def test_exception_in_block_propagates_and_closes_the_run(tiny_model, prompt_batch, tmp_path, error, status):
    out_dir = tmp_path / "run"
    # WHEN the block raises in the middle of a forward
    with pytest.raises(type(error)) as raised:
        _generate_failing(tiny_model, prompt_batch, out_dir, error)

    # THEN the very same exception object comes out (hooks removed: checked by the autouse fixture) ...
    assert raised.value is error
    # ... the manifest says how the run ended ...
    run = read_run(out_dir)
    ended = run.manifest["ended"]
    assert ended["status"] == status
    assert ended["type"] == type(error).__name__
    assert ended["message"] == str(error)
    # ... and every event written is read back, complete, up to the failing step.
    assert not run.truncated
    assert len(run.kv_events) == _jsonl_lines(out_dir / KV_EVENTS) == run.manifest["kv_events"]
    assert_well_ordered(run.kv_events)
    assert {e.step for e in run.kv_events} == set(range(1, FAIL_AT_FORWARD + 1))
    # Forward 3 updated both layers before failing: its storages are in the log.
    step3 = {(e.layer, e.kv) for e in run.kv_events if e.step == FAIL_AT_FORWARD and e.event == "grown"}
    assert step3 == {(0, "k"), (0, "v"), (1, "k"), (1, "v")}


KILLED_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import torch
    import kvtrace
    from kvtrace.llama import ModelSize, build_model

    out_dir, batch_file, sizes, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = build_model(ModelSize(**json.loads(sizes)))
    batch = torch.load(batch_file)
    calls = 0

    def kill_after_step(module, args, output):
        global calls
        calls += 1
        # The writer thread flushes the logs every 0.1 s: 0.25 s after a step's end, the step is on disk.
        time.sleep(0.25)
        if calls == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=False):
        # Registered after the recorder's own hook, so the recorder ends (and may flush) the step first.
        model.register_forward_hook(kill_after_step)
        model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    print("not killed")
    """
)


def _record_in_child(
    source: str, tmp_path: Path, prompt_batch: Any, size: Any, extra: str
) -> subprocess.CompletedProcess[str]:
    """Run `source` in a fresh interpreter with (run folder, saved batch, model size, `extra`) as argv."""
    batch_file = tmp_path / "batch.pt"
    torch.save(
        {"input_ids": prompt_batch.input_ids, "attention_mask": prompt_batch.attention_mask}, batch_file
    )
    script = tmp_path / "child.py"
    script.write_text(source, encoding="utf-8")
    sizes = json.dumps(dataclasses.asdict(size))
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), str(batch_file), sizes, extra],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


@pytest.mark.slow
def test_sigkill_midway_leaves_a_readable_run(tiny_size, prompt_batch, tmp_path):
    # GIVEN a process that records a generation and SIGKILLs itself after its third forward
    size = tiny_size
    out_dir = tmp_path / "run"
    kill_after = 3
    child = _record_in_child(KILLED_CHILD, tmp_path, prompt_batch, size, str(kill_after))
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert "not killed" not in child.stdout

    # WHEN the directory is read
    run = read_run(out_dir)

    # THEN it reads without error, says the run never ended, and holds every flushed step.
    assert run.manifest["ended"] == {"status": "running"}
    assert not run.complete
    assert json.loads((out_dir / MANIFEST).read_text())["ended"]["status"] == "running"
    assert_well_ordered(run.kv_events)
    assert {e.step for e in run.kv_events} == set(range(1, kill_after + 1))
    replay = replay_live_bytes(run.kv_events)
    for step in range(1, kill_after + 1):
        tokens = prompt_batch.prompt_len + step - 1
        want = 2 * kv_bytes(
            size.num_kv_heads, size.hidden_size // size.num_heads, tokens, prompt_batch.rows, 4
        )
        assert replay.per_step[step] == {0: want, 1: want}


@pytest.mark.parametrize("gzip_trace", [False, True], ids=["json", "gzip"])
def test_ctrl_c_while_the_profiler_writes_its_trace_still_ends_the_run(
    tiny_model, tiny_size, prompt_batch, tmp_path, monkeypatch, gzip_trace
):
    # GIVEN Ctrl-C (a real SIGINT) arriving as torch.profiler's trace export returns, at the block's end:
    # the step that takes seconds on a long run, when a notebook user presses "interrupt kernel"
    export = torch.profiler.profile.export_chrome_trace

    def export_then_ctrl_c(prof: Any, path: str, *args: Any, **kwargs: Any) -> None:
        export(prof, path, *args, **kwargs)
        assert Path(path).is_file()
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", export_then_ctrl_c)
    # (Python's own handler: a background job, `pytest &`, inherits SIGINT ignored from its shell, and the
    # raised signal would then be dropped)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    forward_before = type(tiny_model).__dict__.get("forward")
    out_dir = tmp_path / "run"
    new_tokens = 4
    # WHEN a generate() ends its block normally, and the block's end is interrupted
    try:
        with (
            pytest.raises(KeyboardInterrupt),
            torch.no_grad(),
            kvtrace.record(out_dir, model=tiny_model, gzip_trace=gzip_trace),
        ):
            out = tiny_model.generate(
                input_ids=prompt_batch.input_ids,
                attention_mask=prompt_batch.attention_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
            )
    finally:
        signal.signal(signal.SIGINT, handler)
    monkeypatch.undo()

    # THEN the Ctrl-C reached the caller, and every hook came off (the autouse fixture checks them all) ...
    assert type(tiny_model).__dict__.get("forward") is forward_before
    assert kvtrace.recorder._ACTIVE is None
    # ... the manifest says the run was interrupted, and that its trace is lost: none is left, not even cut
    run = read_run(out_dir)
    ended = run.manifest["ended"]
    assert (ended["status"], ended["type"]) == ("interrupted", "KeyboardInterrupt")
    assert "profiler trace not written: the block's end was interrupted (KeyboardInterrupt)" in "".join(
        run.manifest["notes"]
    )
    assert not list((out_dir / "profiler").glob("*.pt.trace.json*"))
    assert not any(name.startswith("profiler/") for name in run.manifest["files"])
    # ... and the KV log is whole: the cache the caller holds is prompt + 3 decoded tokens per row
    # (the last token is not fed back), K and V in each of the 2 layers, float32.
    assert len(run.kv_events) == _jsonl_lines(out_dir / KV_EVENTS) == run.manifest["kv_events"]
    tokens = prompt_batch.prompt_len + new_tokens - 1
    head_dim = tiny_size.hidden_size // tiny_size.num_heads
    want = 2 * kv_bytes(tiny_size.num_kv_heads, head_dim, tokens, prompt_batch.rows, 4)
    assert replay_live_bytes(run.kv_events).final == {0: want, 1: want}
    del out

    # AND a later recording in the same process records on the originals (nothing of the first is left)
    with torch.no_grad(), kvtrace.record(tmp_path / "again", model=tiny_model, profiler=False):
        tiny_model.generate(
            input_ids=prompt_batch.input_ids,
            attention_mask=prompt_batch.attention_mask,
            max_new_tokens=2,
            do_sample=False,
        )
    assert read_run(tmp_path / "again").manifest["ended"]["status"] == "ok"


def test_nested_record_is_refused(tmp_path):
    with kvtrace.record(tmp_path / "outer", profiler=False):
        with (
            pytest.raises(RecordingError, match="nested"),
            kvtrace.record(tmp_path / "inner", profiler=False),
        ):
            pass  # pragma: no cover - never entered
        # The refused recording left nothing behind, and the outer one still records.
        assert not (tmp_path / "inner" / MANIFEST).exists()
        kvtrace.track(torch.zeros(1, 2, 4, 8), layer=0, kind="k")
    run = read_run(tmp_path / "outer")
    assert run.manifest["ended"]["status"] == "ok"
    assert [e.event for e in run.kv_events][:1] == ["created"]


def test_track_outside_record_is_refused():
    with pytest.raises(RecordingError, match=r"outside a kvtrace\.record\(\) block"):
        kvtrace.track(torch.zeros(2, 4), layer=0, kind="k")


def test_existing_run_is_not_overwritten_by_default(tmp_path):
    out_dir = tmp_path / "run"
    with kvtrace.record(out_dir, profiler=False):
        pass
    manifest_before = (out_dir / MANIFEST).read_bytes()

    with pytest.raises(RecordingError, match="overwrite=True"), kvtrace.record(out_dir, profiler=False):
        pass  # pragma: no cover - never entered
    assert (out_dir / MANIFEST).read_bytes() == manifest_before

    with kvtrace.record(out_dir, profiler=False, overwrite=True):
        pass
    assert read_run(out_dir).manifest["started_ns"] > json.loads(manifest_before)["started_ns"]


class HandWrittenAttention(torch.nn.Module):
    """A decoder-style module with a preallocated cache written in place, as Meta's reference code does."""

    def __init__(self, batch: int, max_seq: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.wk = torch.nn.Linear(8, kv_heads * head_dim, bias=False)
        self.cache_k = torch.zeros(batch, max_seq, kv_heads, head_dim)
        self.cache_v = torch.zeros(batch, max_seq, kv_heads, head_dim)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, tokens, _ = x.shape
        k = self.wk(x).view(rows, tokens, self.kv_heads, self.head_dim)
        self.cache_k[:rows, start_pos : start_pos + tokens] = k
        self.cache_v[:rows, start_pos : start_pos + tokens] = -k
        return self.cache_k[:rows, : start_pos + tokens].sum()


def test_hand_written_module_cache_is_created_then_written(tmp_path, watched_models):
    batch, max_seq, kv_heads, head_dim = 2, 16, 2, 4
    model = HandWrittenAttention(batch, max_seq, kv_heads, head_dim).eval()
    watched_models.append(model)
    prompt = torch.randn(batch, 5, 8)
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        model(prompt, 0)
        for pos in range(5, 8):
            model(torch.randn(batch, 1, 8), pos)

    run = read_run(tmp_path / "run")
    assert_well_ordered(run.kv_events)
    buffer_bytes = batch * max_seq * kv_heads * head_dim * 4
    for kv, tensor in (("k", model.cache_k), ("v", model.cache_v)):
        events = [e for e in run.kv_events if e.kv == kv and e.source == "module"]
        assert [e.event for e in events] == ["created"] + ["written"] * 4, events
        assert {e.addr for e in events} == {tensor.untyped_storage().data_ptr()}
        assert {e.storage_bytes for e in events} == {buffer_bytes}
        assert [e.phase for e in events[1:]] == ["prefill", "decode", "decode", "decode"]
        assert [e.step for e in events[1:]] == [1, 2, 3, 4]
        assert all(e.shape == [batch, max_seq, kv_heads, head_dim] for e in events)


class CountingAttention(torch.nn.Module):
    """A preallocated cache whose forward takes no `start_pos`: it keeps its own position count."""

    def __init__(self, batch: int, max_seq: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.cache_k = torch.zeros(batch, max_seq, kv_heads, head_dim)
        self.cache_v = torch.zeros(batch, max_seq, kv_heads, head_dim)
        self.pos = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, seq, kv_heads, head_dim]
        seq = x.shape[1]
        self.cache_k[:, self.pos : self.pos + seq] = x
        self.cache_v[:, self.pos : self.pos + seq] = -x
        self.pos += seq
        return x[:, -1:]


def test_a_module_cache_whose_forward_says_no_position_has_unknown_tokens_not_its_capacity(
    tmp_path, watched_models, capsys
):
    # GIVEN a preallocated module cache of 16 positions whose forward does not say where it writes
    from kvtrace.cli import main

    batch, max_seq, kv_heads, head_dim = 2, 16, 2, 4
    model = CountingAttention(batch, max_seq, kv_heads, head_dim)
    watched_models.append(model)
    # WHEN a prefill of 5 positions and 3 decode steps run
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        x = model(torch.randn(batch, 5, kv_heads, head_dim))
        for _ in range(3):
            x = model(x)
    run = read_run(tmp_path / "run")
    module_events = [e for e in run.kv_events if e.source == "module" and e.event != "freed"]
    # THEN its events say no tokens (unknown), never the 16 the buffer has room for, and the bytes are right
    assert [(e.step, e.phase, e.event) for e in module_events if e.kv == "k"] == [
        (0, "", "created"), (1, "prefill", "written"), (2, "decode", "written"), (3, "decode", "written"),
        (4, "decode", "written"),
    ]  # fmt: skip
    assert {e.tokens for e in module_events} == {0}
    (warning,) = run.manifest["warnings"]
    assert "(cache_k, cache_v) were written 4 times without saying where" in warning
    # AND the report leaves the tokens out rather than take the capacity for them, and counts 4 forwards
    assert main(["report", str(tmp_path / "run"), "--json", "--no-export"]) == 0
    report = json.loads(capsys.readouterr().out)
    kv = report["kv"]
    assert kv["final_bytes"] == 2 * batch * max_seq * kv_heads * head_dim * 4
    assert (kv["tokens_held"], kv["token_rows"]) == (None, None)
    # ... while a byte per token is a slot's of the buffers (batch x max_seq), which needs no token count
    assert kv["bytes_per_token_measured"] == 2 * kv_heads * head_dim * 4
    assert (kv["capacity_rows"], kv["capacity_tokens"]) == (batch, max_seq)
    assert (report["steps"], kv["batch"]) == (4, batch)
    assert warning in report["notes"]
    assert main(["compare", str(tmp_path / "run"), str(tmp_path / "run"), "--json"]) == 0
    (figures, _) = json.loads(capsys.readouterr().out)["runs"]
    assert (figures["generated_tokens_per_row"], figures["tokens_per_second"]) == (None, None)


class HiddenStatesDecoder(torch.nn.Module):
    """A forward that takes hidden states [batch, seq, hidden] (no token ids) and grows a tracked K."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden, 2 * 16, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        k = self.proj(h).view(h.shape[0], h.shape[1], 2, 16).transpose(1, 2)  # [batch, heads, seq, dim]
        self.k = torch.cat([self.k, k], 2) if hasattr(self, "k") else k
        kvtrace.track(self.k, layer=0, kind="k")
        return h[:, -1:]


def test_hidden_states_forwards_are_prefill_when_the_cache_is_empty_else_decode(tmp_path, watched_models):
    # GIVEN a model fed hidden states of 32: the last dim is the hidden size, never the positions
    hidden = 32
    model = HiddenStatesDecoder(hidden)
    watched_models.append(model)
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        # WHEN a prompt of 6 positions and 3 decode steps of 1 run, then the cache is dropped and a second
        # sequence starts from a prompt of 1 position, with one decode step
        h = model(torch.randn(1, 6, hidden))
        for _ in range(3):
            h = model(h)
        del model.k
        h = model(torch.randn(1, 1, hidden))
        model(h)
    # THEN a forward is a prefill when the tracked cache held nothing before it, else a decode step
    events = [e for e in read_run(tmp_path / "run").kv_events if e.event != "freed"]
    assert [(e.step, e.phase, e.tokens) for e in events] == [
        (1, "prefill", 6), (2, "decode", 7), (3, "decode", 8), (4, "decode", 9),
        (5, "prefill", 1), (6, "decode", 2),
    ]  # fmt: skip


def test_track_loose_tensor_is_created_then_written(tmp_path):
    loose_k = torch.zeros(2, 2, 8, 4)
    with kvtrace.record(tmp_path / "run", profiler=False):
        kvtrace.track(loose_k, layer=0, kind="k")
        loose_k[:, :, :3] = 1.0  # written in place, seen when the recording ends
    events = [e for e in read_run(tmp_path / "run").kv_events if e.event != "freed"]
    assert [(e.event, e.source, e.layer, e.kv) for e in events] == [
        ("created", "track", 0, "k"),
        ("written", "track", 0, "k"),
    ]
    assert {e.addr for e in events} == {loose_k.untyped_storage().data_ptr()}
    assert {e.storage_bytes for e in events} == {2 * 2 * 8 * 4 * 4}


def test_two_generate_calls_free_the_first_cache_before_the_second_begins(tiny_model, tiny_size, tmp_path):
    # GIVEN two generate() calls in one block: the first call's cache is dropped when it returns
    ids = torch.randint(3, 1000, (1, 5))
    runs = ((1, 4), (2, 3))  # (rows, new tokens)
    with kvtrace.record(tmp_path / "run", model=tiny_model, profiler=False):
        for rows, new in runs:
            batch = ids.repeat(rows, 1)
            tiny_model.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
    events = read_run(tmp_path / "run").kv_events
    assert_well_ordered(events)
    # THEN every storage of the first cache is freed before the second cache's first storage appears
    first = [e for e in events if e.cache == 1]
    second_start = min(e.seq for e in events if e.cache == 2)
    assert [e for e in first if e.event == "freed" and e.seq > second_start] == []
    made = [e for e in first if e.event in ("created", "grown", "replaced")]
    assert len(made) == sum(e.event == "freed" for e in first)
    # AND the KV held at the end of the last step is the second cache's, by arithmetic, K and V alike
    head_dim = tiny_size.hidden_size // tiny_size.num_heads
    tokens = 5 + runs[1][1] - 1  # the last token is sampled, not cached
    one = kv_bytes(tiny_size.num_kv_heads, head_dim, tokens, runs[1][0], 4)
    last_step = max(e.step for e in events)
    assert replay_live_bytes(events).per_step[last_step] == {layer: 2 * one for layer in range(2)}


def test_a_re_tracked_custom_cache_is_not_kept_alive(tmp_path):
    # GIVEN a hand-written cache regrown by torch.cat and handed to track() after every step
    with kvtrace.record(tmp_path / "run", profiler=False):
        cache = torch.zeros(1, 2, 0, 8)
        for _ in range(20):
            cache = torch.cat([cache, torch.randn(1, 2, 4, 8)], dim=2)
            kvtrace.track(cache, layer=0, kind="k")
        held = cache.untyped_storage().nbytes()
        first = torch.zeros(1, 2, 4, 8)
        kvtrace.track(first, layer=1, kind="v")
        ref = __import__("weakref").ref(first)
        del first
        assert ref() is None  # THEN a tracked tensor dies when its owner drops it, inside the block
    events = read_run(tmp_path / "run").kv_events
    assert_well_ordered(events)
    layer0 = [e.event for e in events if e.layer == 0 and e.phase != "end"]
    # AND each regrowth is logged grown, with the free of the storage it replaced
    assert layer0 == ["created"] + ["grown", "freed"] * 19
    assert replay_live_bytes(events).per_step[0] == {0: held}
    assert [e.event for e in events if e.layer == 1] == ["created", "freed"]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (([1, 2], 0, "k"), "tensor=...): a torch.Tensor, got list"),
        ((None, 0, "k"), "tensor=...): a torch.Tensor, got NoneType"),
        (("t", -1, "k"), "layer=...): a layer index (an int from 0 to 32767), got -1"),
        (("t", "a", "k"), "layer=...): a layer index (an int from 0 to 32767), got 'a'"),
        # past the readers' int16 layer columns: the run would be unreadable, so refused before it is logged
        (("t", 40000, "k"), "layer=...): a layer index (an int from 0 to 32767), got 40000"),
        (("t", 2**15, "k"), "layer=...): a layer index (an int from 0 to 32767), got 32768"),
        (("t", 0, "key"), "kind=...): 'k' or 'v', got 'key'"),
        # not 4-D: the tokens, rows and KV heads read from the layout's dims would be another axis's
        (
            ("2-D", 0, "k"),
            "tensor=...): a 4-D K or V tensor [batch, kv_heads, seq, head_dim] (layout='bhsd'), "
            "got shape (4, 8)",
        ),
        (("3-D", 0, "k"), "got shape (2, 3, 4); an unbatched cache is tracked as tensor.unsqueeze(0)"),
    ],
)
def test_track_names_a_bad_argument_and_logs_nothing(tmp_path, args, said):
    tensor = torch.zeros(1, 2, 4, 8)
    with kvtrace.record(tmp_path / "run", profiler=False):
        kvtrace.track(tensor, layer=0, kind="k")
        shaped = {"t": tensor, "2-D": torch.zeros(4, 8), "3-D": torch.zeros(2, 3, 4)}
        bad = tuple(shaped.get(a, a) if isinstance(a, str) else a for a in args)
        with pytest.raises(RecordingError) as raised:
            kvtrace.track(bad[0], layer=bad[1], kind=bad[2])
        assert said in str(raised.value)
        kvtrace.track(tensor, layer=1, kind="v")
    seqs = [e.seq for e in read_run(tmp_path / "run").kv_events]
    assert seqs == list(range(1, len(seqs) + 1))  # no number used up by the refused call


def test_track_takes_the_last_layer_the_readers_take(tmp_path, capsys):
    # GIVEN a tensor tracked at the largest layer an int16 column holds
    last = int(np.iinfo(np.int16).max)
    with kvtrace.record(tmp_path / "run", profiler=False):
        kvtrace.track(torch.zeros(1, 2, 4, 8), layer=last, kind="k")
    # WHEN the run is reported THEN it reads: that layer held the tensor's 4 tokens, its fp32 bytes the peak
    data = report_json(tmp_path / "run", capsys)
    assert [(row["layer"], row["tokens"]) for row in data["kv"]["per_layer"]] == [(last, 4)]
    assert data["kv"]["peak_bytes"] == 1 * 2 * 4 * 8 * 4


def test_record_into_a_folder_that_is_not_a_run_keeps_the_users_files(tmp_path):
    # GIVEN a folder with files of the user's own under names a run writes
    folder = tmp_path / "work"
    (folder / "profiler").mkdir(parents=True)
    (folder / "profiler" / "old.pt.trace.json").write_text("{}")
    (folder / "timeline.html").write_text("<html></html>")
    # WHEN it is recorded into, THEN it is refused, naming the files, and they are intact
    with pytest.raises(RecordingError, match=r"not a kvtrace run, but it holds timeline.html, profiler"):
        kvtrace.record(folder, profiler=False).__enter__()
    assert sorted(p.name for p in folder.rglob("*")) == ["old.pt.trace.json", "profiler", "timeline.html"]
    # AND a folder holding other files records beside them
    (folder / "profiler" / "old.pt.trace.json").unlink()
    (folder / "profiler").rmdir()
    (folder / "timeline.html").unlink()
    (folder / "notes.txt").write_text("mine")
    with kvtrace.record(folder, profiler=False):
        kvtrace.track(torch.zeros(1, 2, 4, 8), layer=0, kind="k")
    assert (folder / "notes.txt").read_text() == "mine" and (folder / MANIFEST).is_file()


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (
            lambda p: kvtrace.record(p, model=print),
            'a torch.nn.Module (or a vllm.LLM, or "auto") is needed, got',
        ),
        (lambda p: kvtrace.record(p, model="m"), "is needed, got str"),
        (lambda p: kvtrace.record(None), "the run folder must be a path, got NoneType"),
        (lambda p: kvtrace.record(p, profiler="no"), "record(profiler=...): True or False, got 'no'"),
        (lambda p: kvtrace.record(p, gpu_memory=1.5), "a size in bytes must be a whole number, got 1.5"),
        (lambda p: kvtrace.record(p, gpu_memory=float("nan")), "gpu_memory=...): not a number of bytes: nan"),
        (lambda p: kvtrace.record(p, gpu_memory=float("inf")), "gpu_memory=...): not a number of bytes: inf"),
        (lambda p: kvtrace.record(p, gpu_memory=-float("inf")), "...): not a number of bytes: -inf"),
        (lambda p: kvtrace.record(p, gpu_memory=-1), "a memory size must be positive, got -1"),
        (lambda p: kvtrace.record(p, gpu_memory=10**400), "gpu_memory=...): size too large: 1000"),
        (lambda p: kvtrace.record(p, cache_attrs=["foo"]), "record(cache_attrs=...): a dict of attribute"),
        (lambda p: kvtrace.record(p, cache_attrs={"kc": ("k", "hsbd")}), "('k', 'bhsd') with a layout"),
        (lambda p: kvtrace.record(p, max_snapshot_entries=0), "max_snapshot_entries=...): a positive"),
        (lambda p: kvtrace.record(p, profilr=False), "unknown option 'profilr' (did you mean 'profiler'?)"),
        (lambda p: kvtrace.record(p, zzz=1), "record(): unknown option 'zzz'; it takes cache_attrs, clock, "),
    ],
    ids=[
        "model-function",
        "model-str",
        "no-path",
        "profiler-str",
        "fraction",
        "nan",
        "inf",
        "minus-inf",
        "negative",
        "int-past-float",
        "cache-attrs",
        "cache-attrs-layout",
        "entries",
        "misspelt-option",
        "unknown-option",
    ],
)
def test_record_refuses_a_bad_argument_before_writing_anything(tmp_path, call, said):
    with pytest.raises(RecordingError) as raised, call(tmp_path / "run"):
        pass  # pragma: no cover - never entered
    assert said in str(raised.value)
    assert not (tmp_path / "run").exists()  # so the corrected call is not refused as "already a run"
    with kvtrace.record(tmp_path / "run", profiler=False):
        pass


FULL_DISK_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    import torch
    import kvtrace
    from kvtrace.llama import ModelSize, build_model
    from kvtrace.recorder import RecordingError

    out_dir, batch_file, sizes, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = build_model(ModelSize(**json.loads(sizes)))
    batch = torch.load(batch_file)
    # Files may not grow past `limit` bytes: a write beyond it fails with EFBIG, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=False):
            out = model.generate(**batch, max_new_tokens=48, min_new_tokens=48, do_sample=False)
            print("generated", out.shape[1])
    except RecordingError as exc:
        print("error:", exc)
    """
)


def test_a_failed_log_write_ends_the_block_with_an_error_naming_the_file(tiny_size, prompt_batch, tmp_path):
    # GIVEN a process whose files cannot grow past 48 KiB, recording 48 new tokens (~6 KiB of KV log each)
    out_dir = tmp_path / "run"
    limit = 48 * 1024
    child = _record_in_child(FULL_DISK_CHILD, tmp_path, prompt_batch, tiny_size, str(limit))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    # THEN the generation ran to its end, and the block ended with one error naming the log and the cause
    # (the KV log, or on a slow machine the host samples taken every 100 ms, reaches the limit first)
    assert child.returncode == 0, child.stderr[-3000:]
    assert f"generated {prompt_batch.prompt_len + 48}" in child.stdout
    said = [line for line in child.stdout.splitlines() if line.startswith("error:")]
    logs = [out_dir / name for name in (KV_EVENTS, MEMORY_SAMPLES)]
    full = next(log for log in logs if said and said[0].startswith(f"error: {log}:"))
    assert said == [f"error: {full}: cannot write (File too large): the run is incomplete"]
    assert "Traceback" not in child.stderr
    # AND the manifest says what was lost; the log stopped at the limit
    manifest = json.loads((out_dir / MANIFEST).read_text())
    assert manifest["ended"]["write_error"] == f"{full}: cannot write (File too large)"
    assert manifest["ended"]["kv_events_lost"] > 0
    assert full.stat().st_size <= limit
    # AND reading it says so in one line, naming the file and the problem
    report = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "report", "--no-export", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert report.returncode == 2
    assert report.stderr.strip().splitlines() == [
        f"kvtrace report: error: {out_dir}: incomplete run: the recorder failed to write "
        f"{full}: cannot write (File too large); "
        f"{manifest['ended']['kv_events_lost']} KV events were lost"
    ]


def test_a_process_forked_inside_a_recording_does_not_inherit_its_locks(tmp_path):
    # GIVEN a recording whose tracker lock another thread holds (as the writer does while it drains) when
    # the process forks
    import threading

    from transformers import DynamicCache

    cache = DynamicCache()
    token = torch.randn(1, 1, 4, 8)
    held, release = threading.Event(), threading.Event()
    with torch.no_grad(), kvtrace.record(tmp_path / "run", profiler=False) as recording:
        cache.update(token, token, 0)

        def hold() -> None:
            with recording.tracker.lock:
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(30)
        pid = os.fork()
        if pid == 0:  # THEN the child updates a new layer (which takes the lock) and exits
            try:
                cache.update(token, token, 1)
            finally:
                os._exit(0)
        deadline = time.monotonic() + 20
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        release.set()
        holder.join()
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the child hung on an inherited lock"
    # AND the parent's run holds the parent's events only
    events = [json.loads(line) for line in (tmp_path / "run" / KV_EVENTS).read_text().splitlines()]
    assert {e["layer"] for e in events} == {0}


def test_a_plan_of_a_run_still_being_recorded_says_so_not_that_it_stopped(tiny_model, tmp_path, capsys):
    """`plan --from-run` on a run whose generate() call is still going (planned as launched, at the
    length the call asked for) says the recording goes on, not that the run was cut short."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from kvtrace.cli import main

    ids = torch.randint(3, 1000, (2, 5))
    run = tmp_path / "run"
    planned: list[dict[str, Any]] = []
    diagnosed: list[dict[str, Any]] = []

    class PlanMidway(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if input_ids.shape[1] == 5 + 3:  # 3 new tokens of 12
                rec._flush()  # what the writer thread does every 0.1 s
                capsys.readouterr()
                assert main(["plan", "--from-run", str(run), "--json"]) == 0
                planned.append(json.loads(capsys.readouterr().out))
                assert main(["diagnose", str(run), "--json"]) == 0
                diagnosed.append(json.loads(capsys.readouterr().out))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with kvtrace.record(run, model=tiny_model, profiler=False) as rec:
        tiny_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([PlanMidway()]),
        )
    (plan,) = planned
    # THEN it is planned as launched (5 + 12 tokens), saying the recording goes on and how far it has got:
    # a context of 8 as plan counts it (the prompt and 3 new tokens; the cache holds one fewer)
    assert plan["request"]["context"] == 5 + 12
    said = [note for note in plan["notes"] if "still being recorded" in note]
    assert said and said[0].startswith(
        f"the run is still being recorded by pid {os.getpid()}: planned as launched"
    )
    assert said[0].endswith("; it has reached 8 so far"), said
    assert not any("cut short" in note or "when it stopped" in note for note in plan["notes"]), plan["notes"]
    # AND diagnose names a shorter context against that length, saying the run goes on, not that it stopped
    ((context,),) = [[r["sentence"] for r in d["remedies"] if r["kind"] == "context"] for d in diagnosed]
    assert context.endswith(
        " The run, still being recorded, has reached 7 tokens a row so far, of the 16 its call asked for, "
        "which the context is named against (as `kvtrace plan --from-run` plans it)."
    ), context


def test_a_run_still_being_recorded_is_reported_as_such(tiny_model, tiny_size, tmp_path, capsys):
    """A report on a run whose recording is still going says so (not "the process died"), and writes
    nothing into it; once the block ends, the same run reads as finished."""
    from kvtrace.cli import main
    from kvtrace.format import LOCK_FILE

    ids = torch.randint(3, 1000, (2, 5))
    run = tmp_path / "run"
    with kvtrace.record(run, model=tiny_model, profiler=False) as rec:
        tiny_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
        rec._flush()  # what the writer thread does every 0.1 s
        capsys.readouterr()
        assert main(["report", str(run), "--json", "-q"]) == 0
        captured = capsys.readouterr()
        live = json.loads(captured.out)
        assert (run / LOCK_FILE).read_text() == str(os.getpid())
    assert (
        f"the run is still being recorded by pid {os.getpid()}: figures cover what it has written so far"
        in (live["notes"])
    )
    assert not any("process died" in note for note in live["notes"])
    assert "still being recorded" in captured.err
    assert not (run / "kv_counters.trace.json.gz").exists() and not (run / "tb_scalars").exists()
    # AND the KV written so far is there: 4 new tokens on 5, batch 2, the last token not cached
    assert live["kv"]["tokens_held"] == 5 + 4 - 1
    assert main(["report", str(run), "--json", "-q"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert not any("still being recorded" in note or "process died" in note for note in done["notes"])
    assert (run / "kv_counters.trace.json.gz").exists()
