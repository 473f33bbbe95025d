"""kvtrace's CUDA paths on one GPU: a Llama 3 8B-shaped model under `kvtrace.record()`, an OOM, the checks.

One command, one output folder (`--out`, default `$OUT` or ./gpu_check_out). Steps, each guarded so that
one failure records its figures and the script goes on:

  1. generate() under kvtrace.record() (profiler on, gzipped trace, few new tokens) with a dynamic,
     static, fp8-quantized (quanto/hqq too when importable) and offloaded cache, one run directory each,
     and `kvtrace report -o timeline.html` for each;
  2. an OOM from KV growth under `torch.cuda.set_per_process_memory_fraction` (the card is untouched):
     the batch grows until generate() raises inside record(); then snapshots/oom.pickle, `kvtrace diagnose
     --json` (failing request, KV share, a batch that fits) and a run at that batch under the same cap;
  3. KV bytes the analyzers attribute (`kvtrace report --json`) against 2 x kv_heads x head_dim x tokens x
     batch x dtype bytes x layers computed here, and the snapshot's live blocks against the KV log's
     addresses;
  4. tokens/s of plain generate(), record(profiler=False, snapshots=False) (KV log + NVTX alone),
     record(profiler=False), bare torch.profiler (CPU+CUDA, profile_memory) and record(profiler=True),
     interleaved, medians;
  5. run directories packed as .tar.gz into the output folder, small enough to copy back from a remote
     machine (at most 8 files, each under 16 MiB), `summary.json` and `summary.md` beside them.

Run directories are written under `--work` (default /tmp/kvtrace_gpu_check), never under `--out`, so
that only the packed files travel back. `summary.json` is rewritten after every check, so a run killed
by its time limit still leaves what it measured. Exit status 0 when no check failed, 1 otherwise.

    python benchmarks/gpu_check.py --out "$OUT"          # one GPU of 80 GB or more, a few minutes
    python benchmarks/gpu_check.py --dry-run             # same code path, CPU, tiny shape, < 2 min
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import re
import statistics
import sys
import tarfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # runs from a checkout without `pip install -e .`

GiB = 1 << 30
MiB = 1 << 20
# What $OUT may hold, so that it copies back from a remote machine quickly: 8 files, 16 MiB each, 64 together.
MAX_FILES_BACK = 8
MAX_FILE_BYTES = 15 * MiB
MAX_TOTAL_BYTES = 56 * MiB
FIXED_FILES = ("log.txt", "summary.json", "summary.md")  # log.txt is written by gpu_check.sh's tee

# The published Llama 3 8B shape, written out here so that the KV arithmetic does not come from kvtrace.
LLAMA3_8B = {
    "num_layers": 32,
    "num_heads": 32,
    "num_kv_heads": 8,
    "head_dim": 128,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}
KV_BYTES_PER_TOKEN_8B = 2 * 8 * 128 * 2 * 32  # K and V x kv heads x head_dim x bf16 x layers = 131,072


# -- results -----------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip | info
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None


class Results:
    """Every check with its figures; summary.json is rewritten after each one."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.meta = meta
        self.checks: list[Check] = []
        self.tables: dict[str, Any] = {}
        self.started = time.perf_counter()

    def add(self, name: str, status: str, detail: str = "", **figures: Any) -> Check:
        check = Check(name, status, detail, _jsonable(figures))
        self.checks.append(check)
        mark = {"pass": "PASS", "fail": "FAIL", "skip": "skip", "info": "info"}[status]
        print(f"[{mark}] {name}: {detail}", flush=True)
        self.write()
        return check

    @contextlib.contextmanager
    def guard(self, name: str) -> Iterator[None]:
        """A step that raises records one failure with its traceback's tail; the script goes on."""
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:
            tail = traceback.format_exc().strip().splitlines()[-12:]
            self.add(name, "fail", f"{type(exc).__name__}: {str(exc)[:400]}", traceback="\n".join(tail))
        finally:
            print(f"  ({name}: {time.perf_counter() - started:.1f} s)", flush=True)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = {
            "meta": self.meta,
            "elapsed_s": round(time.perf_counter() - self.started, 1),
            "counts": {s: sum(c.status == s for c in self.checks) for s in ("pass", "fail", "skip", "info")},
            "checks": [asdict(c) for c in self.checks],
            "tables": self.tables,
        }
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        tmp.replace(self.out / "summary.json")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# -- the plan: what runs, at which size ---------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    batch: int
    prompt: int
    new: int


@dataclass(frozen=True)
class TimingShape:
    """A generate() shape timed in the given modes (keys of MODES)."""

    shape: Shape
    modes: tuple[str, ...]


LIGHT_MODES = ("a", "b", "b+s")
ALL_MODES = ("a", "b", "b+s", "c", "d")


@dataclass(frozen=True)
class Plan:
    size_name: str
    device: str
    cache_shapes: dict[str, Shape]
    oom_prompt: int
    oom_new: int
    oom_kv_budget_bytes: int
    """Memory cap = weights + this: KV growth in decode, not prefill activations, must cross it."""
    timing: tuple[TimingShape, ...]
    timing_reps: int
    archive_prefix: str


def gpu_plan(device_name: str) -> Plan:
    big = Shape(batch=24, prompt=8192, new=8)  # 24 x 8199 x 131,072 B = 24.0 GiB of KV
    prefix = "h200_" if "H200" in device_name.upper() else "gpu_"
    return Plan(
        size_name="llama-3-8b",
        device="cuda",
        cache_shapes={
            "dynamic": big,
            "static": big,
            "fp8": big,
            "quanto": big,
            "hqq": big,
            # Every decode step moves the whole cache over PCIe and back: a smaller batch keeps it short.
            "offloaded": Shape(batch=4, prompt=8192, new=8),
        },
        oom_prompt=128,
        oom_new=192,  # decode longer than the prompt: KV growth, not prefill activations, hits the cap
        oom_kv_budget_bytes=10 * GiB,
        # Batch 1 is where a decode step is shortest (launch-bound), so the KV log's cost shows most there:
        # the light modes only; the profiler modes at batch 16.
        timing=(
            TimingShape(Shape(batch=1, prompt=1024, new=128), LIGHT_MODES),
            TimingShape(Shape(batch=16, prompt=1024, new=32), ALL_MODES),
        ),
        timing_reps=3,
        archive_prefix=prefix,
    )


def dry_plan() -> Plan:
    small = Shape(batch=2, prompt=32, new=4)
    return Plan(
        size_name="tiny",
        device="cpu",
        cache_shapes={k: small for k in ("dynamic", "static", "fp8", "quanto", "hqq", "offloaded")},
        oom_prompt=8,
        oom_new=24,
        oom_kv_budget_bytes=64 * 1024,
        timing=(
            TimingShape(Shape(batch=1, prompt=16, new=8), LIGHT_MODES),
            TimingShape(Shape(batch=2, prompt=16, new=8), ALL_MODES),
        ),
        timing_reps=2,
        archive_prefix="cpu_",
    )


# -- torch / transformers helpers ---------------------------------------------------------------------
def oom_error_type() -> type[BaseException]:
    """torch.OutOfMemoryError from torch 2.5; torch.cuda.OutOfMemoryError before."""
    import torch

    found = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return found if isinstance(found, type) else RuntimeError


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_cuda() -> int | None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return None


@dataclass
class Workload:
    model: Any
    plan: Plan
    geometry: dict[str, int]
    dtype_bytes: int
    weights_bytes: int
    pad_id: int

    def kv_bytes(self, batch: int, tokens: int) -> int:
        g = self.geometry
        return 2 * g["num_kv_heads"] * g["head_dim"] * tokens * batch * self.dtype_bytes * g["num_layers"]

    def inputs(self, shape: Shape, seed: int = 0) -> tuple[Any, Any]:
        import torch

        generator = torch.Generator(device="cpu").manual_seed(seed)
        high = min(self.geometry["vocab_size"], 100_000)
        ids = torch.randint(3, high, (shape.batch, shape.prompt), generator=generator)
        ids = ids.to(self.plan.device)
        return ids, torch.ones_like(ids)


def build_workload(plan: Plan) -> Workload:
    import torch

    from kvtrace.llama import SIZES, build_model

    size = SIZES[plan.size_name]
    model = build_model(size, dtype=torch.bfloat16, device=plan.device)
    geometry = {
        "num_layers": size.num_layers,
        "num_heads": size.num_heads,
        "num_kv_heads": size.num_kv_heads,
        "head_dim": size.hidden_size // size.num_heads,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "vocab_size": size.vocab_size,
    }
    seen: set[int] = set()
    weights = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            weights += storage.nbytes()
    return Workload(model, plan, geometry, 2, weights, int(model.config.pad_token_id))


def cache_kwargs(kind: str, work: Workload, shape: Shape) -> dict[str, Any]:
    """generate() kwargs for a cache kind; the cache keyword follows the installed transformers."""
    from kvtrace.llama import cache_keyword, make_cache

    cache, extra = make_cache(kind, work.model, shape.batch, shape.prompt + shape.new)
    if cache is not None:
        extra[cache_keyword()] = cache
    return extra


def generate(
    work: Workload, shape: Shape, extra: dict[str, Any] | None = None, allow_compile: bool = False
) -> Any:
    """Greedy generate() of exactly `shape.new` tokens; returns the output (which holds the cache).

    transformers compiles the forward by itself on CUDA when the cache is static (`disable_compile` turns
    that off): minutes for an 8B model, so every run but `static_compiled`'s switches it off.
    """
    import torch
    from transformers import GenerationConfig

    ids, mask = work.inputs(shape)
    extra = dict(extra or {})
    if not allow_compile and hasattr(GenerationConfig(), "disable_compile"):
        extra.setdefault("disable_compile", True)
    with torch.no_grad():
        out = work.model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=shape.new,
            min_new_tokens=shape.new,
            do_sample=False,
            pad_token_id=work.pad_id,
            return_dict_in_generate=True,
            **extra,
        )
    _sync()
    made = int(out.sequences.shape[1]) - shape.prompt
    if made != shape.new:
        raise RuntimeError(f"generated {made} tokens, not {shape.new}")
    return out


# -- kvtrace CLI, in process ---------------------------------------------------------------------------
def kvtrace_cli(argv: list[str]) -> tuple[int, str, str]:
    """`kvtrace ARGV` in this process: (exit status, stdout, stderr)."""
    from kvtrace.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def report_json(run_dir: Path) -> dict[str, Any]:
    code, out, err = kvtrace_cli(["report", str(run_dir), "--json", "--quiet"])
    if code != 0:
        raise RuntimeError(f"kvtrace report --json exited {code}: {err.strip()[-300:]}")
    return json.loads(out)


def report_html(results: Results, name: str, run_dir: Path) -> None:
    html = run_dir / "timeline.html"
    code, _, err = kvtrace_cli(["report", str(run_dir), "-o", str(html), "--quiet"])
    if code == 0 and html.exists():
        results.add(f"html.{name}", "pass", f"{html.stat().st_size / 1e6:.1f} MB", bytes=html.stat().st_size)
    else:
        results.add(f"html.{name}", "fail", f"kvtrace report -o exited {code}: {err.strip()[-300:]}")


def diagnose_json(target: Path, budget: int | None = None) -> dict[str, Any]:
    argv = ["diagnose", str(target), "--json"] + ([] if budget is None else ["--budget", f"{budget}B"])
    code, out, err = kvtrace_cli(argv)
    if code != 0:
        raise RuntimeError(f"kvtrace {' '.join(argv[:1])} exited {code}: {err.strip()[-300:]}")
    return json.loads(out)


# -- step 1 and 3: one recorded run per cache kind ------------------------------------------------------
def live_kv_storages(run_dir: Path) -> dict[int, tuple[int, str, int, str]]:
    """KV storages live after the last event before teardown, read from the raw log (not the analyzers):
    addr -> (storage_bytes, device, layer, kv)."""
    live: dict[int, tuple[int, str, int, str]] = {}
    with open(run_dir / "kv_events.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("phase") == "end":
                break
            addr = int(event.get("addr") or 0)
            if event["event"] == "freed":
                live.pop(addr, None)
            elif addr and addr not in live and event["event"] != "written":
                live[addr] = (
                    int(event["storage_bytes"]),
                    str(event.get("device")),
                    event["layer"],
                    event["kv"],
                )
    return live


def check_snapshot_blocks(results: Results, name: str, run_dir: Path, pickle_name: str) -> None:
    """Every live CUDA KV storage of the log is an allocated block of the snapshot, of at least its size."""
    from analyzers.readers.safe_pickle import load_pickle

    path = run_dir / "snapshots" / pickle_name
    if not path.exists():
        results.add(f"snapshot_vs_kvlog.{name}", "fail", f"{path.name} missing")
        return
    data = load_pickle(path)
    blocks: dict[int, int] = {}
    for segment in data.get("segments", []) if isinstance(data, dict) else []:
        for block in segment.get("blocks", []):
            if str(block.get("state", "")).startswith("active"):
                blocks[int(block["address"])] = int(block.get("requested_size") or block.get("size", 0))
    live = {a: v for a, v in live_kv_storages(run_dir).items() if v[1].startswith("cuda")}
    matched = [a for a, (nbytes, *_rest) in live.items() if blocks.get(a, -1) >= nbytes]
    missing = [
        {"addr": hex(a), "bytes": live[a][0], "layer": live[a][2], "kv": live[a][3], "block": blocks.get(a)}
        for a in live
        if a not in set(matched)
    ][:8]
    ok = bool(live) and len(matched) == len(live)
    results.add(
        f"snapshot_vs_kvlog.{name}",
        "pass" if ok else ("info" if not live else "fail"),
        f"{len(matched)}/{len(live)} live CUDA KV storages are allocated blocks of {pickle_name}",
        live_kv_storages=len(live),
        matched=len(matched),
        snapshot_blocks=len(blocks),
        missing=missing,
    )


def check_peak_split(results: Results, name: str, rep: dict[str, Any], torch_peak: int) -> None:
    """The report's peak against torch's own (`max_memory_allocated`, reset before the run: the weights
    loaded before the trace counted once), and the KV share of it: the caching allocator's blocks of the
    KV log's storages (rounded to 512 B, a large block up to 1 MiB over) must be found as KV."""
    peak = rep.get("peak_allocated_bytes") or 0
    ratio = peak / torch_peak if torch_peak else 0.0
    results.add(
        f"peak_vs_torch.{name}",
        "pass" if 0.98 <= ratio <= 1.02 else "fail",
        f"report peak {peak:,} B vs torch.cuda.max_memory_allocated {torch_peak:,} B ({ratio:.3f}x)",
        report_peak_allocated_bytes=peak,
        torch_peak_allocated_bytes=torch_peak,
    )
    kv_at_peak = (rep.get("categories_at_peak") or {}).get("kv", 0)
    kv_final = (rep.get("kv") or {}).get("final_bytes") or 0
    if name.endswith("offloaded"):
        # The KV log's final counts the host copies too: on the device, the layer computing and at most the
        # one being prefetched (the H200 run: 134,217,728 B = one layer's K and V of 4,298,637,312 / 32).
        layers = len((rep.get("kv") or {}).get("per_layer") or []) or 1
        one_layer = kv_final / layers
        ok = bool(kv_final) and 0.9 * one_layer <= kv_at_peak <= 2.1 * one_layer
        detail = f"KV on the device at the peak {kv_at_peak:,} B vs one layer's K and V {one_layer:,.0f} B"
    else:
        ok = bool(kv_final) and kv_at_peak >= 0.9 * kv_final
        detail = f"KV at the peak {kv_at_peak:,} B (allocator blocks) vs the KV log's final {kv_final:,} B"
    results.add(
        f"kv_at_peak.{name}",
        "pass" if ok else "fail",
        detail,
        kv_at_peak_bytes=kv_at_peak,
        kv_final_bytes=kv_final,
    )


def check_kv_arithmetic(
    results: Results, work: Workload, name: str, shape: Shape, rep: dict[str, Any]
) -> None:
    kv = rep.get("kv", {})
    tokens_held = shape.prompt + shape.new - 1  # the last generated token is never fed back
    expected = work.kv_bytes(shape.batch, tokens_held)
    # A static cache is allocated for its max_cache_len, which transformers sets to one of these two.
    allowed = {expected}
    if name == "static":
        allowed.add(work.kv_bytes(shape.batch, shape.prompt + shape.new))
    per_layer = kv.get("per_layer") or []
    layer_expected = {b // work.geometry["num_layers"] // 2 for b in allowed}
    bad_layers = [
        row["layer"]
        for row in per_layer
        if row.get("k_bytes") not in layer_expected or row.get("v_bytes") != row.get("k_bytes")
    ]
    final = kv.get("final_bytes")
    ok = final in allowed and len(per_layer) == work.geometry["num_layers"] and not bad_layers
    results.add(
        f"kv_bytes.{name}",
        "pass" if ok else "fail",
        f"analyzers {final:,} B vs arithmetic {expected:,} B "
        f"(2 x {work.geometry['num_kv_heads']} x {work.geometry['head_dim']} x {tokens_held} tokens x "
        f"batch {shape.batch} x 2 B x {work.geometry['num_layers']} layers); "
        f"{len(per_layer)} layers, {len(bad_layers)} off"
        if isinstance(final, int)
        else f"no kv.final_bytes in the report ({final!r})",
        final_bytes=final,
        expected_bytes=sorted(allowed),
        per_layer_rows=len(per_layer),
        bad_layers=bad_layers[:8],
        bytes_per_token_measured=kv.get("bytes_per_token_measured"),
        bytes_per_token_expected=kv.get("bytes_per_token_expected"),
    )


def cache_run(results: Results, work: Workload, kind: str, run_dir: Path) -> dict[str, Any] | None:
    """Step 1 for one cache kind; returns the row of the cache table, or None when skipped."""
    import torch

    import kvtrace

    shape = work.plan.cache_shapes[kind]
    if kind == "offloaded" and work.plan.device != "cuda":
        results.add(f"run.{kind}", "skip", "skipped: needs CUDA (offloading moves the cache to host memory)")
        return None
    if kind in ("quanto", "hqq"):
        module = {"quanto": "optimum.quanto", "hqq": "hqq"}[kind]
        try:
            __import__(module)
        except ImportError:
            results.add(f"run.{kind}", "skip", f"skipped: {module} is not installed")
            return None
    try:
        extra = cache_kwargs(kind, work, shape)
    except (ImportError, ValueError, TypeError) as exc:
        results.add(f"run.{kind}", "skip", f"skipped: this transformers cannot make it: {exc}"[:300])
        return None
    _free_memory()
    started = time.perf_counter()
    with kvtrace.record(run_dir, model=work.model, profiler=True, gzip_trace=True, overwrite=True):
        out = generate(work, shape, extra)
    seconds = time.perf_counter() - started
    peak = _peak_cuda()
    results.add(
        f"run.{kind}",
        "pass",
        f"batch {shape.batch} x prompt {shape.prompt} + {shape.new} new in {seconds:.1f} s"
        + (f", torch peak {peak / GiB:.2f} GiB" if peak else ""),
        seconds=round(seconds, 2),
        torch_peak_allocated_bytes=peak,
        cache_class=type(getattr(out, "cache", None) or getattr(out, "past_key_values", None)).__name__,
    )
    row: dict[str, Any] = {"kind": kind, **asdict(shape), "seconds": round(seconds, 2)}
    row["torch_peak_allocated_bytes"] = peak
    with results.guard(f"report.{kind}"):
        rep = report_json(run_dir)
        kv = rep.get("kv", {})
        row.update(
            report_peak_allocated_bytes=rep.get("peak_allocated_bytes"),
            categories_at_peak=rep.get("categories_at_peak"),
            kv_final_bytes=kv.get("final_bytes"),
            kv_peak_bytes=kv.get("peak_bytes"),
            kv_measured_from=kv.get("measured_from"),
        )
        results.add(
            f"report.{kind}",
            "pass" if kv.get("final_bytes") else "fail",
            f"peak {rep.get('peak_allocated_bytes') or 0:,} B, KV final {kv.get('final_bytes') or 0:,} B, "
            f"KV peak {kv.get('peak_bytes') or 0:,} B",
            **{k: v for k, v in row.items() if k.startswith(("report", "kv", "categories"))},
        )
        if kind in ("dynamic", "static"):
            check_kv_arithmetic(results, work, kind, shape, rep)
        if peak:
            check_peak_split(results, kind, rep, peak)
    if torch.cuda.is_available() and work.plan.device == "cuda":
        with results.guard(f"snapshot_vs_kvlog.{kind}"):
            check_snapshot_blocks(results, kind, run_dir, "exit.pickle")
    else:
        results.add(
            f"snapshot_vs_kvlog.{kind}", "skip", "skipped: needs CUDA (no allocator snapshots on CPU)"
        )
    del out, extra
    _free_memory()
    with results.guard(f"html.{kind}"):
        report_html(results, kind, run_dir)
    return row


# -- step 2: OOM from KV growth ------------------------------------------------------------------------
class MemoryCap:
    """The per-process cap: `set_per_process_memory_fraction` on CUDA (the card's settings untouched);
    on CPU a simulation that raises the OOM error type when weights + KV would cross the cap."""

    def __init__(self, work: Workload, cap_bytes: int) -> None:
        self.work = work
        self.cap_bytes = cap_bytes
        self.simulated = work.plan.device != "cuda"
        self._handle: Any = None
        self.fraction: float | None = None

    def __enter__(self) -> MemoryCap:
        import torch

        if self.simulated:
            return self
        _free_memory()
        total = torch.cuda.get_device_properties(0).total_memory
        self.fraction = self.cap_bytes / total
        torch.cuda.set_per_process_memory_fraction(self.fraction)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if not self.simulated:
            _free_memory()
            torch.cuda.set_per_process_memory_fraction(1.0)

    @contextlib.contextmanager
    def simulate(self, shape: Shape) -> Iterator[None]:
        """CPU only: raise the OOM error when the next forward's KV would cross the cap."""
        if not self.simulated:
            yield
            return
        error = oom_error_type()
        calls = {"n": 0}

        def pre_forward(module: Any, args: Any) -> None:
            calls["n"] += 1
            tokens = shape.prompt + calls["n"] - 1  # tokens held after this forward
            # A dynamic cache grows by torch.cat: the new K of one layer is requested while the old lives.
            request = self.work.kv_bytes(shape.batch, tokens) // self.work.geometry["num_layers"] // 2
            held = self.work.weights_bytes + self.work.kv_bytes(shape.batch, tokens - 1)
            if held + request > self.cap_bytes:
                raise error(
                    "CPU out of memory (simulated by gpu_check --dry-run). "
                    f"Tried to allocate {request} bytes; "
                    f"{held:,} B held, {self.cap_bytes:,} B allowed"
                )

        handle = self.work.model.register_forward_pre_hook(pre_forward)
        try:
            yield
        finally:
            handle.remove()


def _requested_from_message(message: str) -> int | None:
    match = re.search(r"Tried to allocate ([\d.]+) ?(bytes|B|KiB|MiB|GiB|TiB)", message or "")
    if not match:
        return None
    scale = {"bytes": 1, "B": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": GiB, "TiB": 1 << 40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _batch_remedy(diagnosis: dict[str, Any], failing_batch: int) -> tuple[int | None, dict[str, Any] | None]:
    for remedy in diagnosis.get("remedies", []):
        if remedy.get("kind") == "batch":
            setting = remedy.get("setting")
            if remedy.get("fits") is True and isinstance(setting, int) and 1 <= setting < failing_batch:
                return setting, remedy
            return None, remedy
    return None, None


def oom_step(results: Results, work: Workload, work_dir: Path) -> dict[str, Any]:
    import kvtrace

    plan = work.plan
    prefix = "oom" if plan.device == "cuda" else "oom(simulated)"
    oom_type = oom_error_type()
    cap_bytes = work.weights_bytes + plan.oom_kv_budget_bytes
    seq_kv_end = work.kv_bytes(1, plan.oom_prompt + plan.oom_new - 1)
    # The batch whose final KV just fills the cap (less ~10% for activations and allocator rounding).
    fits_estimate = max(int(plan.oom_kv_budget_bytes * 0.9 // seq_kv_end), 1)
    summary: dict[str, Any] = {"cap_bytes": cap_bytes, "fits_estimate": fits_estimate, "attempts": []}
    failing: tuple[int, Path, str] | None = None
    with MemoryCap(work, cap_bytes) as cap:
        summary["fraction"] = cap.fraction
        batch = math.ceil(fits_estimate * 1.15)
        for attempt in range(5):
            shape = Shape(batch, plan.oom_prompt, plan.oom_new)
            run_dir = work_dir / f"oom_b{batch}"
            started = time.perf_counter()
            try:
                with (
                    cap.simulate(shape),
                    kvtrace.record(
                        run_dir, model=work.model, profiler=False, max_snapshot_entries=12_000, overwrite=True
                    ),
                ):
                    out = generate(work, shape)
                del out
                summary["attempts"].append({"batch": batch, "oom": False, "s": time.perf_counter() - started})
                print(f"  batch {batch}: no OOM, growing", flush=True)
                batch = math.ceil(batch * 1.3)
            except oom_type as exc:
                summary["attempts"].append({"batch": batch, "oom": True, "s": time.perf_counter() - started})
                failing = (batch, run_dir, str(exc))
                del exc
                break
            finally:
                _free_memory()
            if attempt == 4:
                break
        if failing is None:
            results.add(f"{prefix}.raised", "fail", "generate() never ran out of memory", **summary)
            return summary
        batch, run_dir, message = failing
        summary.update(failing_batch=batch, run_dir=run_dir.name, message=message[:600])
        results.add(
            f"{prefix}.raised",
            "pass",
            f"{oom_type.__name__} at batch {batch} (prompt {plan.oom_prompt} + {plan.oom_new} new) under a "
            f"{cap_bytes / GiB:.2f} GiB cap, caught outside record()",
            **summary,
        )
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        ended = manifest.get("ended", {})
        results.add(
            f"{prefix}.manifest",
            "pass"
            if ended.get("status") == "exception" and "OutOfMemory" in str(ended.get("type"))
            else "fail",
            f"ended {ended.get('status')} {ended.get('type')}, oom_snapshot {ended.get('oom_snapshot')!r}",
            ended={k: v for k, v in ended.items() if k != "message"},
        )
        snapshot_diag: dict[str, Any] = {}
        if cap.simulated:
            results.add(f"{prefix}.oom_pickle", "skip", "skipped: needs CUDA (no allocator snapshot on CPU)")
        else:
            oom_pickle = run_dir / "snapshots" / "oom.pickle"
            ok = oom_pickle.exists() and oom_pickle.stat().st_size > 0
            results.add(
                f"{prefix}.oom_pickle",
                "pass" if ok else "fail",
                f"snapshots/oom.pickle {'%.1f MB' % (oom_pickle.stat().st_size / 1e6) if ok else 'missing'}",
            )
            if ok:
                with results.guard(f"{prefix}.snapshot_vs_kvlog"):
                    check_snapshot_blocks(results, "oom", run_dir, "oom.pickle")
                with results.guard(f"{prefix}.diagnose_pickle"):
                    snapshot_diag = diagnose_json(oom_pickle)
                    results.add(
                        f"{prefix}.diagnose_pickle",
                        "info",
                        f"request {snapshot_diag.get('requested_bytes')}, "
                        f"free {snapshot_diag.get('free_bytes')}, "
                        f"shortfall {snapshot_diag.get('shortfall_bytes')}, "
                        f"fragmented {snapshot_diag.get('fragmented')}",
                        **{k: snapshot_diag.get(k) for k in _DIAG_FIELDS},
                    )
        diagnosis = diagnose_json(run_dir)
        summary["diagnosis"] = {k: diagnosis.get(k) for k in _DIAG_FIELDS}
        summary["diagnosis_remedies"] = diagnosis.get("remedies")
        requested = (
            diagnosis.get("requested_bytes")
            or snapshot_diag.get("requested_bytes")
            or _requested_from_message(message)
        )
        cuda_only = "skip" if cap.simulated else None
        results.add(
            f"{prefix}.diagnose_request",
            cuda_only or ("pass" if diagnosis.get("requested_bytes") else "fail"),
            f"run-dir diagnosis requested_bytes {diagnosis.get('requested_bytes')!r} (message says "
            f"{_requested_from_message(message)!r}); event {diagnosis.get('event')!r}",
        )
        share = diagnosis.get("kv_share")
        results.add(
            f"{prefix}.diagnose_kv_share",
            "pass" if isinstance(share, float) and share > 0 else "fail",
            f"KV {diagnosis.get('kv_bytes')!r} B = {share!r} "
            f"of allocated {diagnosis.get('allocated_bytes')!r} B",
        )
        fit_batch, remedy = _batch_remedy(diagnosis, batch)
        results.add(
            f"{prefix}.diagnose_batch",
            ("pass" if fit_batch else (cuda_only or "fail")),
            f"batch remedy: {remedy.get('sentence') if remedy else 'none'} (setting {fit_batch!r})",
            remedy=remedy,
        )
        source = "diagnose"
        if fit_batch is None and requested:
            # What diagnose would need: the shortfall as weights + KV + the failed request - the cap.
            budget = cap_bytes - int(requested)
            with results.guard(f"{prefix}.diagnose_budget"):
                fit_batch, remedy = _batch_remedy(diagnose_json(run_dir, budget=budget), batch)
                source = f"diagnose --budget {budget} (cap - request)"
                results.add(
                    f"{prefix}.diagnose_budget",
                    "info",
                    f"with --budget cap-request: {remedy.get('sentence') if remedy else 'none'}",
                    setting=fit_batch,
                )
        if fit_batch is None:
            fit_batch, source = max(batch // 2, 1), "fallback: half the failing batch"
        summary.update(fit_batch=fit_batch, fit_batch_source=source)
        shape = Shape(fit_batch, plan.oom_prompt, plan.oom_new)
        fit_dir = work_dir / "oom_fit"
        started = time.perf_counter()
        try:
            with (
                cap.simulate(shape),
                kvtrace.record(
                    fit_dir, model=work.model, profiler=False, max_snapshot_entries=12_000, overwrite=True
                ),
            ):
                out = generate(work, shape)
            del out
            results.add(
                f"{prefix}.fit_batch_runs",
                "pass",
                f"batch {fit_batch} ({source}) ran under the same cap "
                f"in {time.perf_counter() - started:.1f} s",
                fit_batch=fit_batch,
                source=source,
            )
        except oom_type as exc:
            results.add(
                f"{prefix}.fit_batch_runs", "fail", f"batch {fit_batch} ({source}) still OOM: {exc}"[:500]
            )
        finally:
            _free_memory()
    summary["run_dirs"] = [run_dir.name, fit_dir.name]
    for name, path in (("oom", run_dir), ("oom_fit", fit_dir)):
        if path.is_dir():
            with results.guard(f"html.{name}"):
                report_html(results, name, path)
    return summary


_DIAG_FIELDS = (
    "event",
    "requested_bytes",
    "allocated_bytes",
    "reserved_bytes",
    "free_bytes",
    "capacity_bytes",
    "shortfall_bytes",
    "fragmented",
    "kv_bytes",
    "kv_share",
    "batch",
    "tokens_held",
    "step",
    "step_phase",
    "message",
)


# -- transformers' auto-compile of static caches, under record() -----------------------------------------
def static_compiled_step(results: Results, plan: Plan, work_dir: Path) -> None:
    """A static cache on CUDA makes transformers torch.compile the forward, hooks included: does kvtrace's
    recording survive it and still log the exact KV? On the tiny shape, so compiling costs seconds."""
    import dataclasses

    import kvtrace

    if plan.device != "cuda":
        results.add(
            "static_compiled", "skip", "skipped: needs CUDA (transformers auto-compiles on CUDA only)"
        )
        return
    tiny = build_workload(dataclasses.replace(plan, size_name="tiny"))
    shape = Shape(batch=2, prompt=64, new=16)
    run_dir = work_dir / "static_compiled"
    started = time.perf_counter()
    try:
        with kvtrace.record(run_dir, model=tiny.model, profiler=False, overwrite=True):
            generate(tiny, shape, {"cache_implementation": "static"}, allow_compile=True)
    except Exception as exc:
        results.add(
            "static_compiled",
            "fail",
            f"static cache + auto-compile under record(): {type(exc).__name__}: {str(exc)[:400]}",
            traceback="\n".join(traceback.format_exc().strip().splitlines()[-12:]),
        )
        return
    seconds = time.perf_counter() - started
    rep = report_json(run_dir)
    final = rep.get("kv", {}).get("final_bytes")
    allowed = {tiny.kv_bytes(shape.batch, shape.prompt + shape.new - k) for k in (0, 1)}
    results.add(
        "static_compiled",
        "pass" if final in allowed else "fail",
        f"generated in {seconds:.1f} s (compile included); "
        f"KV final {final!r} B vs arithmetic {sorted(allowed)}",
        seconds=round(seconds, 1),
        kv_events=len((run_dir / "kv_events.jsonl").read_text(encoding="utf-8").splitlines()),
    )


# -- step 4: tokens/s ----------------------------------------------------------------------------------
MODES = {
    "a": "plain generate()",
    "b": "record(profiler=False, snapshots=False): KV log + NVTX",
    "b+s": "record(profiler=False): + CUDA allocator history",
    "c": "bare torch.profiler (CPU+CUDA, profile_memory)",
    "d": "record(profiler=True): full recording",
}


@contextlib.contextmanager
def _mode(mode: str, work: Workload, out_dir: Path) -> Iterator[None]:
    import torch
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    import kvtrace

    if mode == "a":
        yield
    elif mode in ("b", "b+s"):
        with kvtrace.record(
            out_dir, model=work.model, profiler=False, snapshots=mode == "b+s", overwrite=True
        ):
            yield
    elif mode == "c":
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(
            activities=activities,
            profile_memory=True,
            on_trace_ready=tensorboard_trace_handler(str(out_dir / "profiler")),
        ):
            yield
    else:
        with kvtrace.record(out_dir, model=work.model, profiler=True, overwrite=True):
            yield


def timing_step(results: Results, work: Workload, work_dir: Path) -> list[dict[str, Any]]:
    """tokens/s of each mode per timing shape, interleaved, and kvtrace's µs per KV layer update:
    (median generate() time with the KV log - without) / (layers x forwards), issue 11's measure."""
    return [_time_shape(results, work, work_dir, timed) for timed in work.plan.timing]


def _time_shape(results: Results, work: Workload, work_dir: Path, timed: TimingShape) -> dict[str, Any]:
    import shutil

    shape, order = timed.shape, list(timed.modes)
    tokens = shape.batch * shape.new
    updates = work.geometry["num_layers"] * shape.new  # one update per layer per forward (prefill + decode)
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in order}

    def once(mode: str) -> tuple[float, float]:
        out_dir = work_dir / f"timing_{mode.replace('+', '_')}"
        shutil.rmtree(out_dir, ignore_errors=True)
        _free_memory()
        started = time.perf_counter()
        with _mode(mode, work, out_dir):
            gen_started = time.perf_counter()
            out = generate(work, shape)
            gen_s = time.perf_counter() - gen_started
        block_s = time.perf_counter() - started
        del out
        shutil.rmtree(out_dir, ignore_errors=True)
        return gen_s, block_s

    for mode in order:  # warm-up: first profiler session, first hook install, this shape's kernels
        once(mode)
    for rep in range(work.plan.timing_reps):
        for offset in range(len(order)):
            mode = order[(rep + offset) % len(order)]
            times[mode].append(once(mode))
    rows: list[dict[str, Any]] = []
    median_gen = {m: statistics.median(g for g, _ in times[m]) for m in order}
    for mode in order:
        gen = statistics.median(tokens / g for g, _ in times[mode])
        block = statistics.median(tokens / b for _, b in times[mode])
        row = {
            "mode": mode,
            "label": MODES[mode],
            "generate_tok_s": round(gen, 1),
            "block_tok_s": round(block, 1),
            "generate_s": [round(g, 4) for g, _ in times[mode]],
        }
        if mode in ("b", "b+s"):
            row["us_per_kv_update"] = round((median_gen[mode] - median_gen["a"]) / updates * 1e6, 2)
        rows.append(row)
    by = {r["mode"]: r for r in rows}
    pairs = [("b", "a"), ("b+s", "a"), ("d", "c"), ("c", "a"), ("d", "a")]
    ratios = {
        f"{x}/{y}": by[x]["generate_tok_s"] / by[y]["generate_tok_s"] for x, y in pairs if x in by and y in by
    }
    step_ms = median_gen["a"] / shape.new * 1e3
    table = {
        "shape": asdict(shape),
        "reps": work.plan.timing_reps,
        "kv_updates": updates,
        "plain_ms_per_forward": round(step_ms, 3),
        "rows": rows,
        "ratios": ratios,
    }
    verdict = (
        f"batch {shape.batch} x {shape.prompt} + {shape.new}: plain {step_ms:.2f} ms per forward; "
        f"KV log {by['b']['us_per_kv_update']:.1f} µs per update (goal <= 10), b/a {ratios['b/a']:.3f}"
        + (f", d/c {ratios['d/c']:.3f} (goal >= 0.95)" if "d/c" in ratios else "")
        + f"; median of {work.plan.timing_reps} interleaved runs"
    )
    results.add(f"timing.b{shape.batch}", "info", verdict, **table)
    return table


# -- step 5: packing ------------------------------------------------------------------------------------
def pack(results: Results, out: Path, work_dir: Path, groups: list[tuple[str, list[str]]]) -> None:
    """One .tar.gz per group of run directories, within the limits on $OUT (MAX_FILES_BACK, ...)."""
    budget_files = MAX_FILES_BACK - len(FIXED_FILES)
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file() and p.suffix != ".gz")
    for archive_name, dirs in groups:
        dirs = [d for d in dirs if (work_dir / d).is_dir()]
        if not dirs:
            continue
        if budget_files <= 0:
            results.add(f"pack.{archive_name}", "skip", "skipped: no file left of the 8 that come back")
            continue
        target = out / f"{archive_name}.tar.gz"
        excluded: list[str] = []
        # Drop what is biggest and least needed until it fits: the exit snapshot, then every pickle, then
        # the profiler trace (the KV log, manifest and HTML stay).
        for exclude in (
            (),
            ("exit.pickle",),
            ("exit.pickle", "oom.pickle"),
            ("exit.pickle", "oom.pickle", ".json.gz"),
        ):
            excluded = list(exclude)

            def keep(info: tarfile.TarInfo, exclude: tuple[str, ...] = exclude) -> tarfile.TarInfo | None:
                return None if info.isfile() and info.name.endswith(exclude) and exclude else info

            with tarfile.open(target, "w:gz", compresslevel=6) as tar:
                for d in dirs:
                    tar.add(
                        work_dir / d,
                        arcname=d if dirs == [archive_name] else f"{archive_name}/{d}",
                        filter=keep,
                    )
            size = target.stat().st_size
            if size <= MAX_FILE_BYTES and total + size <= MAX_TOTAL_BYTES:
                break
        else:
            target.unlink()
            results.add(f"pack.{archive_name}", "fail", "too large even without pickles and trace")
            continue
        total += size
        budget_files -= 1
        results.add(
            f"pack.{archive_name}",
            "pass",
            f"{target.name} {size / MiB:.1f} MiB"
            + (f" (left out: {', '.join(excluded)})" if excluded else ""),
            bytes=size,
            excluded=excluded,
            dirs=dirs,
        )


def write_markdown(results: Results, out: Path) -> str:
    lines = [f"# kvtrace GPU check: {results.meta.get('device_name')}", ""]
    meta = results.meta
    lines.append(
        f"torch {meta.get('torch')}, transformers {meta.get('transformers')}, python {meta.get('python')}, "
        f"model {meta.get('size')} bf16 random weights ({meta.get('weights_bytes', 0) / GiB:.2f} GiB)"
    )
    cache_rows = results.tables.get("caches", [])
    if cache_rows:
        lines += [
            "",
            "| cache | batch x prompt + new | torch peak | report peak | KV final | KV peak | s |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in cache_rows:

            def gib(key: str, row: dict[str, Any] = row) -> str:
                value = row.get(key)
                if not isinstance(value, int):
                    return "-"
                return f"{value / GiB:.2f} GiB" if value >= GiB // 10 else f"{value / 1024:,.1f} KiB"

            lines.append(
                f"| {row['kind']} | {row['batch']} x {row['prompt']} + {row['new']} | "
                f"{gib('torch_peak_allocated_bytes')} | {gib('report_peak_allocated_bytes')} | "
                f"{gib('kv_final_bytes')} | {gib('kv_peak_bytes')} | {row['seconds']} |"
            )
    for timing in results.tables.get("timing") or []:
        shape = timing["shape"]
        lines += [
            "",
            f"batch {shape['batch']} x prompt {shape['prompt']} + {shape['new']} new "
            f"(plain {timing['plain_ms_per_forward']} ms per forward, {timing['kv_updates']} KV updates):",
            "",
            "| mode | generate() tok/s | whole block tok/s | µs per KV update |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| ({r['mode']}) {r['label']} | {r['generate_tok_s']} | {r['block_tok_s']} | "
            f"{r.get('us_per_kv_update', '-')} |"
            for r in timing["rows"]
        ]
        lines.append("")
        lines.append("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in timing["ratios"].items()))
    oom = results.tables.get("oom")
    if oom:
        lines += [
            "",
            "OOM: "
            + json.dumps(
                {
                    k: oom.get(k)
                    for k in ("cap_bytes", "failing_batch", "fit_batch", "fit_batch_source", "diagnosis")
                },
                default=str,
            ),
        ]
    lines += ["", "| check | status | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {c.status} | {c.detail.replace('|', '/')} |" for c in results.checks]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    return text


# -- main ------------------------------------------------------------------------------------------------
STEPS = ("dynamic", "timing", "OOM", "static", "fp8", "quanto", "hqq", "offloaded", "static_compiled")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="results folder")
    parser.add_argument("--work", default="/tmp/kvtrace_gpu_check", help="run directories (not sent back)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny Llama 3 shape, tiny sizes")
    parser.add_argument(
        "--budget-s", type=float, default=440.0, help="skip later steps past this (default 440)"
    )
    parser.add_argument(
        "--steps",
        default="",
        help=f"comma-separated steps to run, in this order (default all: {','.join(STEPS)})",
    )
    args = parser.parse_args(argv)
    order = [s for s in args.steps.split(",") if s] or list(STEPS)
    unknown = sorted(set(order) - set(STEPS))
    if unknown:
        parser.error(f"--steps: unknown {', '.join(unknown)} (known: {', '.join(STEPS)})")

    wall = time.perf_counter()
    out, work_dir = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers

    has_cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if has_cuda else "cpu"
    meta: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "device_name": device_name,
        "cuda": torch.version.cuda,
        "dry_run": args.dry_run,
    }
    results = Results(out, meta)
    print(
        f"gpu_check: torch {torch.__version__}, transformers {transformers.__version__}, {device_name}",
        flush=True,
    )
    if not args.dry_run and not has_cuda:
        results.add("cuda", "fail", "CUDA is not available: run with --dry-run on a CPU machine")
        return 1
    plan = dry_plan() if args.dry_run else gpu_plan(device_name)
    meta["size"] = plan.size_name

    def time_left() -> float:
        return args.budget_s - (time.perf_counter() - wall)

    def step(name: str, needs_s: float) -> bool:
        if time_left() < needs_s:
            results.add(
                name, "skip", f"skipped: time budget ({time_left():.0f} s left, needs ~{needs_s:.0f})"
            )
            return False
        return True

    work: Workload | None = None
    with results.guard("build"):
        started = time.perf_counter()
        work = build_workload(plan)
        meta["weights_bytes"] = work.weights_bytes
        meta["geometry"] = work.geometry
        if plan.size_name == "llama-3-8b":
            same = all(work.geometry[k] == v for k, v in LLAMA3_8B.items())
            per_token = work.kv_bytes(1, 1)
            results.add(
                "geometry",
                "pass" if same and per_token == KV_BYTES_PER_TOKEN_8B else "fail",
                f"{work.geometry} vs published; KV {per_token:,} B per token",
            )
        generate(work, Shape(1, 8, 2))  # warm-up: kernels, cuBLAS handles
        results.add(
            "build",
            "pass",
            f"{work.weights_bytes / GiB:.2f} GiB of weights in {time.perf_counter() - started:.1f} s",
        )
    if work is None:
        write_markdown(results, out)
        return 1

    prefix = plan.archive_prefix
    cache_rows: list[dict[str, Any]] = []
    results.tables["caches"] = cache_rows
    needs = {
        "dynamic": 60,
        "OOM": 90,
        "timing": 150,
        "static": 60,
        "fp8": 60,
        "quanto": 60,
        "hqq": 60,
        "offloaded": 60,
        "static_compiled": 90,
    }
    reserve = 30.0  # packing and the summary
    for item in order:
        if not step(f"step.{item}", needs[item] + reserve):
            continue
        if item == "OOM":
            with results.guard("oom"):
                results.tables["oom"] = oom_step(results, work, work_dir)
        elif item == "static_compiled":
            with results.guard("static_compiled"):
                static_compiled_step(results, plan, work_dir)
        elif item == "timing":
            with results.guard("timing"):
                results.tables["timing"] = timing_step(results, work, work_dir)
        else:
            with results.guard(f"run.{item}"):
                row = cache_run(results, work, item, work_dir / f"{prefix}{item}")
                if row is not None:
                    cache_rows.append(row)
        results.write()

    with results.guard("pack"):
        oom_dirs = list((results.tables.get("oom") or {}).get("run_dirs", []))
        groups = [(f"{prefix}oom", oom_dirs)] + [
            (f"{prefix}{row['kind']}", [f"{prefix}{row['kind']}"]) for row in cache_rows
        ]
        write_markdown(results, out)
        pack(results, out, work_dir, groups)

    text = write_markdown(results, out)
    results.write()
    failed = results.failed()
    print("\n" + "=" * 100)
    print(text)
    counts = {s: sum(c.status == s for c in results.checks) for s in ("pass", "fail", "skip", "info")}
    print(f"gpu_check: {counts} in {time.perf_counter() - wall:.0f} s; results in {out}")
    for check in failed:
        print(f"FAILED {check.name}: {check.detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
