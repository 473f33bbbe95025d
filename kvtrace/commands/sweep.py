"""`kvtrace sweep`: measure a grid of batch x context x cache kind on a random-weights Llama 3 model."""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from analyzers.units import a_or_an
from kvtrace.commands.base import MAKES_FOLDERS, Command, add_gpu_memory, gpu_memory_flag, long_dtype
from kvtrace.commands.output import check_regular_target, page_bytes, print_after_writing, write_replacing
from kvtrace.errors import (
    KvtraceError,
    MissingPart,
    blocked_status,
    cannot_write,
    folder_blocked,
    unnamed_path,
)

_DTYPES = ("float32", "bfloat16", "float16")
# How a sweep names its points' run folders under OUT/runs/ (`b{batch}_c{context}_{cache}`)
_POINT_RUN = re.compile(r"b\d+_c\d+_[a-z0-9_]+")


_MOST = 2**31 - 1  # a batch or context: int32, as the export keeps them


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise KvtraceError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise KvtraceError(f"{flag} values must be at least 1, got {text!r}")
    if any(v > _MOST for v in values):  # 10**20 stopped in torch's seeding, an internal error
        raise KvtraceError(f"{flag} values must be at most {_MOST:,} (no model is run so wide), got {text!r}")
    if len(set(values)) != len(values):  # two points would record into one folder, the second over the first
        raise KvtraceError(f"{flag} lists a value twice: {text!r}")
    return values


def _model_size(args: argparse.Namespace, longest: int) -> tuple[str, Any, int | None]:
    """(name, kvtrace.llama.ModelSize, the model's own sliding window or None) from --size, --preset or
    --config; `longest`: the most tokens a point holds."""
    from kvtrace.llama import SIZES, ModelSize

    if args.size is not None:
        return args.size, SIZES[args.size], None
    from analyzers.planning.hf_config import geometry_from_config
    from analyzers.planning.presets import get_preset

    geom = get_preset(args.preset) if args.preset is not None else geometry_from_config(args.config)
    # An error names the file given, not the config's model name: that is its folder's, which for a config
    # in the current folder is the name of the folder the user is in
    subject = args.config or geom.name
    unlike = _not_llama(geom, longest)
    if unlike:
        # Recorded as a plain Llama, its KV or its weights would be another model's, and so every figure
        raise KvtraceError(
            f"{subject}: {unlike}, which kvtrace sweep's Llama 3 models do not build; "
            f"kvtrace plan --config {args.config or '<config.json>'} sizes it without running"
        )
    if geom.num_attention_heads % geom.num_kv_heads:
        # Llama's attention repeats each KV head over heads / KV heads query heads: a whole number
        raise KvtraceError(
            f"{subject}: {geom.num_attention_heads} attention heads are not a multiple of its "
            f"{geom.num_kv_heads} KV heads; kvtrace.llama's attention shares each KV head among a whole "
            "number of query heads"
        )
    size = ModelSize(
        hidden_size=geom.hidden_size,
        intermediate_size=geom.intermediate_size,
        num_layers=geom.num_layers,
        num_heads=geom.num_attention_heads,
        num_kv_heads=geom.num_kv_heads,
        vocab_size=geom.vocab_size,
        tie_embeddings=geom.tie_word_embeddings,
        head_dim=geom.head_dim,  # may differ from hidden_size / heads (Qwen3, Gemma): llama builds it
    )
    return geom.name, size, geom.sliding_window


def _not_llama(geom: Any, longest: int) -> str:
    """What of a config's shape a random-weights Llama 3 cannot reproduce ("" when nothing): latent
    attention (another KV), routed experts (other weights), layers without KV (linear attention), and an
    attention window that points longer than it would fill (the Llama attends to every token)."""
    if geom.mla is not None:
        return f"it caches a multi-head latent (kv_lora_rank {geom.mla.kv_lora_rank}), not K and V per head"
    if geom.experts:
        return f"{geom.moe_layers} of its layers route over {geom.experts} experts"
    if geom.kv_layers is not None and geom.kv_layers != geom.num_layers:
        return f"only {geom.kv_layers} of its {geom.num_layers} layers hold a KV cache"
    window = geom.sliding_window
    if window is not None and longest > window:
        return (
            f"{geom.windowed_layers} of its layers keep {a_or_an(str(window))}-token window, which points of "
            f"{longest} tokens pass"
        )
    return ""


def _weights_past_memory(size: Any, dtype: str, device: str, subject: str) -> str | None:
    """Why the model's weights alone cannot be built on `device` (more bytes than a GPU has, or than the
    host has available), None when they may be (or its memory is not known). Said before any is allocated:
    a config of 10**6-wide layers stopped in torch's allocator (an internal error), and one of 32,768 layers
    had the kernel kill the process once it had taken all the host's memory."""
    import torch

    from analyzers.units import human_bytes

    weights = size.parameters * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    where = torch.device(device)
    room, has = None, "has"
    if where.type == "cuda":
        room = torch.cuda.get_device_properties(where.index or 0).total_memory
    elif where.type == "cpu":
        room, has = _host_memory_available(), "has available"
    if room is None or weights <= room:
        return None
    return (
        f"{subject}: its weights alone take {human_bytes(weights)} ({size.parameters:,} parameters in "
        f"{dtype}), more than the {human_bytes(room)} {device} {has}; kvtrace sweep builds and runs the "
        "model, kvtrace plan sizes it without running"
    )


def _host_memory_available() -> int | None:
    """The host memory a new allocation may take: Linux's MemAvailable, else all of it; None: unknown."""
    import os

    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _forget_generate_state(model: Any) -> None:
    """generate() keeps a static cache (`_cache`) and the longest static length seen
    (`_previous_max_cache_length`) on the model across calls: drop both, so no point inherits another's."""
    for name in ("_cache", "_previous_max_cache_length"):
        if name in vars(model):
            delattr(model, name)


def _point_runs(out: Path) -> list[Path]:
    """The point runs a sweep before this one left in OUT/runs/, finished or cut short: replaced whole by
    --overwrite, so that no export or query of OUT mixes them with this sweep's points. Only folders named
    as a sweep names its points and, where the old sweep.json can be read, listed in it: a run of another
    name there is the user's, and a symbolic link's run lies elsewhere; both are kept."""
    from kvtrace.run_layout import is_run_dir

    try:
        children = sorted((out / "runs").iterdir())
    except OSError:  # none yet
        return []
    listed = _listed_points(out / "sweep.json")
    return [
        child
        for child in children
        if _POINT_RUN.fullmatch(child.name)
        and (listed is None or child.name in listed)
        and not child.is_symlink()
        and child.is_dir()
        and is_run_dir(child)
    ]


def _listed_points(table: Path) -> set[str] | None:
    """The run folders a sweep.json lists; None where there is none, or it cannot be read."""
    from kvtrace.json_reads import read_json_file

    try:  # a pipe or device in its place is refused, not read without end
        rows = read_json_file(table, "corrupt sweep table").get("rows")
    except (KvtraceError, AttributeError):
        return None
    if not isinstance(rows, list):
        return None
    runs = [row.get("run") for row in rows if isinstance(row, dict)]
    return {Path(run).name for run in runs if isinstance(run, str)}


@contextlib.contextmanager
def _removed_if_left_empty(folders: list[Path]) -> Iterator[None]:
    """Remove, when the block raises, each of `folders` (deepest first) that it created and left empty:
    a failed sweep left an empty OUT behind. A folder there before, or one that holds a file (a failed
    point's run, which says why it failed), is left as it is."""
    new = [folder for folder in folders if not folder.exists()]
    try:
        yield
    except BaseException:
        for folder in new:
            with contextlib.suppress(OSError):  # not empty: kept
                folder.rmdir()
        raise


def _refuse_a_run_as_out(given: str) -> None:
    """Refuse an OUT that is no sweep's folder, even with --overwrite (which replaces a sweep): "" (the
    current folder), and a run or a run group, whose folder would then mix one recording with a sweep's
    table and point runs; and a file in its place or a parent's (`blocked_status`: 1, 2 for a pipe or a
    device)."""
    from kvtrace.run_layout import holds_export, is_run_dir, rank_dirs

    unnamed = unnamed_path(given)
    if unnamed is not None:
        raise KvtraceError(f"--out: {unnamed}")
    blocked = folder_blocked(Path(given), "the sweep's folder")
    if blocked is not None:
        raise KvtraceError(blocked, exit_code=blocked_status(Path(given), folder=True))
    kind = "run" if is_run_dir(given) else "run group" if rank_dirs(given) else None
    if kind is None and holds_export(given):
        raise KvtraceError(
            f"{given}: an export directory (Parquet tables), not a sweep's folder (sweep.json, runs/); pass "
            "another --out DIR"
        )
    if kind is not None:
        raise KvtraceError(
            f"{given}: a kvtrace {kind}, not a sweep's folder (sweep.json, runs/); pass another --out DIR"
        )


def _remove_sweep(out: Path, points: list[Path]) -> None:
    """What --overwrite replaces, before any point is recorded: the old table and page (a sweep cut short
    must not list points that are gone), then each old point's run files (a user's own files stay). Every
    point is looked at first: one whose files cannot all go safely refuses the overwrite, nothing removed."""
    from kvtrace.distributed import remove_runs

    def remove_table() -> None:
        for name in ("sweep.json", "sweep.html"):
            try:
                (out / name).unlink(missing_ok=True)
            except OSError as exc:
                raise cannot_write(out / name, exc, verb="remove") from None

    remove_runs(points, before=remove_table)


def _point_row(run_dir: Path, budget: int | None, status: str) -> dict[str, Any]:
    """Measured figures of one recorded point (an OOM point is diagnosed too)."""
    from analyzers.compare import tokens_per_second
    from analyzers.report import build_report

    source, report = build_report(run_dir)
    main = report.main_device
    peak = main.peak_allocated_bytes if main else 0
    row: dict[str, Any] = {
        "status": status,
        "run": str(run_dir),
        "peak_bytes": peak,
        "kv_final_bytes": report.kv.final_bytes,
        "kv_peak_bytes": report.kv.peak_bytes,
        "tokens_per_second": tokens_per_second(source, report) if status == "ok" else None,
        "fits_budget": None if budget is None else (status == "ok" and peak <= budget),
    }
    if budget is not None and report.budget is not None and report.budget["crossed"]:
        keys = ("step", "phase", "layer", "request_bytes", "before_first_step")
        row["runs_out_at"] = {key: report.budget[key] for key in keys}
    if status == "oom":
        from analyzers.planning.diagnose import diagnose
        from analyzers.render.diagnosis import diagnosis_to_json

        row["diagnosis"] = diagnosis_to_json(diagnose(source, report, budget_bytes=budget))
    return row


class SweepCommand(Command):
    """Record a grid of batch x context x cache kind and tabulate measured peak, KV bytes and tokens/s.

    Each point runs generate() on a random-weights Llama 3 model (--size, a --preset or a --config
    shape) under kvtrace.record with the profiler on; context is the prompt length in random tokens.
    Every point is recorded with a cache of its own, so each equals a standalone run of its settings.
    The sliding caches keep --window tokens: by default the model's own sliding_window where its --config
    or --preset has one, else 16; each point's manifest gives the window its cache kept.
    Prints the table, and writes OUT/sweep.json (one row per point; fields: docs/format.md), OUT/sweep.html
    and each point's run directory under OUT/runs/. tokens/s counts every batch row's tokens. With
    --gpu-memory (or --budget), rows say whether the measured peak fits and, when not, the step and layer
    where a device of that size would run out. On CUDA an OOM inside a
    point is caught, recorded, diagnosed and the sweep goes on. A progress bar is drawn on stderr when it
    is a terminal (-q: none). A model whose weights alone take more than the device has (a GPU's memory,
    the host's available memory on the CPU) is refused before it is built: kvtrace plan sizes it.
    Exit status: 0 on success; 1 when OUT cannot be created, a --cache's package is not installed, or
    standard output cannot be written (OUT is then written all the same, and the line says so); 2 for bad
    input or flags, for a model too large to build, and for an OUT (or its sweep.json, sweep.html) that is
    a named pipe or a device (/dev/null included), refused before any point is recorded. A sweep that
    fails removes the folders it created and left empty (never a folder that was there before).
    """

    name = "sweep"
    examples = (
        "kvtrace sweep --size tiny --batch 1,4 --context 64,256 --cache dynamic,static -o runs/sweep",
        "kvtrace sweep --size tiny --cache sliding,static_sliding --window 32 --gpu-memory 80MiB -o runs/sw",
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from kvtrace.llama import CACHE_KINDS, DEFAULT_WINDOW, SIZES

        model = parser.add_mutually_exclusive_group()
        model.add_argument("--size", choices=sorted(SIZES), help="kvtrace.llama model shape (default: tiny)")
        model.add_argument("--preset", metavar="NAME", help="a planner preset shape, e.g. llama-3.2-1b")
        model.add_argument("--config", metavar="PATH", help="shape from a local Hugging Face config.json")
        parser.add_argument("--batch", default="1,2", help="comma-separated batch sizes (default 1,2)")
        parser.add_argument(
            "--context", default="32,64", help="comma-separated prompt lengths (default 32,64)"
        )
        parser.add_argument(
            "--cache",
            default="dynamic,static",
            help=f"comma-separated, of {', '.join(CACHE_KINDS)} (default dynamic,static)",
        )
        parser.add_argument(
            "--window",
            type=int,
            help=f"tokens a sliding or static_sliding cache keeps (default: the model's sliding_window "
            f"from --config or --preset, else {DEFAULT_WINDOW})",
        )
        parser.add_argument(
            "--new-tokens", type=int, default=8, help="tokens generated per point (default 8)"
        )
        parser.add_argument(
            "--dtype",
            type=long_dtype,
            choices=_DTYPES,
            default="float32",
            help="weights and KV dtype (default float32)",
        )
        parser.add_argument(
            "--device", default="auto", help="cpu, cuda[:N] or auto: cuda when available (default auto)"
        )
        add_gpu_memory(
            parser,
            "device memory budget, e.g. 80GiB or a GPU's name (H100, L4): rows say whether each point fits, "
            "and where it runs out; --budget is another name for it",
            dest="budget",
        )
        parser.add_argument(
            "-o",
            "--out",
            "--output",
            required=True,
            metavar="DIR",
            help=f"output directory ({MAKES_FOLDERS})",
        )
        parser.add_argument("--overwrite", action="store_true", help="replace the sweep already in --out")
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        from kvtrace.commands.demo import window_refusal
        from kvtrace.llama import CACHE_KINDS, DEFAULT_WINDOW, MIN_WINDOW, SLIDING_KINDS

        batches = _int_list(args.batch, "--batch")
        contexts = _int_list(args.context, "--context")
        caches = [c.strip() for c in args.cache.split(",") if c.strip()]
        unknown = [c for c in caches if c not in CACHE_KINDS]
        if unknown or not caches:
            named = ", ".join(unknown) if unknown else repr(args.cache)
            raise KvtraceError(f"--cache: unknown cache kind {named}; choose from {', '.join(CACHE_KINDS)}")
        if len(set(caches)) != len(caches):
            raise KvtraceError(f"--cache lists a kind twice: {args.cache!r}")
        if args.new_tokens < 1:
            raise KvtraceError("--new-tokens must be at least 1")
        if args.window is not None:  # as `kvtrace demo --window`
            if args.window < MIN_WINDOW:
                raise KvtraceError(window_refusal(args.window))
            if not set(caches) & set(SLIDING_KINDS):
                raise KvtraceError(f"--window applies to --cache sliding or static_sliding, not {args.cache}")
        budget = None
        if args.budget is not None:
            from analyzers.planning.size_text import parse_device_memory

            budget = parse_device_memory(args.budget, gpu_memory_flag(args, "budget"))
        if args.size is None and args.preset is None and args.config is None:
            args.size = "tiny"
        model_name, size, model_window = _model_size(args, max(contexts) + args.new_tokens)
        # The model's own window, as `kvtrace plan` keeps it: a 16-token one shrank a Mistral's 4096
        window = args.window or model_window or DEFAULT_WINDOW
        _refuse_a_run_as_out(args.out)  # before torch is imported: a wrong --out is said at once
        import torch
        from tqdm import tqdm

        import kvtrace
        from kvtrace.llama import (
            build_model,
            cache_keyword,
            cache_package_missing,
            cache_unavailable,
            device_unavailable,
            llama3_config,
            make_cache,
            window_on_config,
        )

        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        limit = int(llama3_config(size).max_position_embeddings)
        longest = max(contexts) + args.new_tokens
        problem = device_unavailable(device)
        if longest > limit:
            problem = (
                f"--context {max(contexts)} + --new-tokens {args.new_tokens} = {longest} tokens passes the "
                f"model's max_position_embeddings ({limit}); kvtrace plan answers such sizes without running"
            )
        problem = problem or _weights_past_memory(size, args.dtype, device, args.config or model_name)
        for kind in caches:
            problem = problem or cache_unavailable(kind, device)
        if problem is not None:
            raise KvtraceError(problem)
        missing = next(filter(None, map(cache_package_missing, caches)), None)
        if missing is not None:
            raise MissingPart(missing)
        out = Path(args.out)
        for name in ("sweep.json", "sweep.html"):  # before the points are recorded, not after
            check_regular_target(out / name)
        old_points = _point_runs(out)
        if ((out / "sweep.json").exists() or old_points) and not args.overwrite:  # as `demo`: no silent loss
            raise KvtraceError(f"{out}: already holds a sweep; pass --overwrite to replace it, or --out DIR")
        # A sweep that fails (out of memory at its first point, a refusal) leaves no empty folder of its own
        with _removed_if_left_empty([out / "runs", out, *out.parents]):
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise cannot_write(out, exc, verb="create", folder=True) from None
            if args.overwrite:
                _remove_sweep(out, old_points)
            on_cuda = device.startswith("cuda") and torch.cuda.is_available()
            model = build_model(size, dtype=getattr(torch, args.dtype), device=device)
            pad_id = model.config.pad_token_id
            # Prompt ids below 128,000 (Llama 3's regular tokens), and within a smaller config's vocabulary.
            vocab = min(128_000, int(model.config.vocab_size))
            rows: list[dict[str, Any]] = []
            grid = list(itertools.product(batches, contexts, caches))
            # A bar on a terminal only, as report and export draw theirs: in a file or a pipe its \r-redrawn
            # lines are noise around the errors and notes.
            show_bar = not args.quiet and sys.stderr.isatty()
            points = tqdm(grid, desc="sweep", unit="point", file=sys.stderr, disable=not show_bar)
            for batch, context, cache_kind in points:
                run_dir = out / "runs" / f"b{batch}_c{context}_{cache_kind}"
                generator = torch.Generator().manual_seed(batch * 100_003 + context)
                ids = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
                _forget_generate_state(model)
                cache, extra = make_cache(cache_kind, model, batch, context + args.new_tokens, window=window)
                if cache is not None:
                    extra[cache_keyword()] = cache
                status = "ok"
                mask = None
                try:
                    with torch.no_grad(), contextlib.ExitStack() as block:
                        with window_on_config(
                            model, cache_kind, window
                        ):  # the manifest's: the cache's window
                            block.enter_context(
                                kvtrace.record(run_dir, model=model, overwrite=True, gpu_memory=budget)
                            )
                        # Held until the block ends, as a user's inputs are: the recorder reads whether the
                        # prompts were padded from it then (a mask gone by then is unknown, and `plan --cache
                        # static` prices such a run's prefill as padded)
                        mask = torch.ones_like(ids)
                        model.generate(
                            ids,
                            attention_mask=mask,
                            max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens,
                            do_sample=False,
                            pad_token_id=pad_id,
                            **extra,
                        )
                except torch.OutOfMemoryError:
                    if not on_cuda:
                        raise
                    status = "oom"  # the recorder wrote the exception and an OOM snapshot; go on
                finally:
                    del cache, extra, mask
                    _forget_generate_state(model)
                    gc.collect()
                    if on_cuda:
                        torch.cuda.empty_cache()
                row = {"batch": batch, "context": context, "cache": cache_kind}
                row.update(_point_row(run_dir, budget, status))
                rows.append(row)
            slid = window if set(caches) & set(SLIDING_KINDS) else None
            self._write(out, rows, budget, model_name, args, device, slid)
            return 0

    @staticmethod
    def _write(
        out: Path,
        rows: list[dict[str, Any]],
        budget: int | None,
        model_name: str,
        args: Any,
        device: str,
        window: int | None,
    ) -> None:
        """sweep.json, sweep.html and the table; `window`: the sliding caches' (None: no sliding kind)."""
        from analyzers.render.sweep import sweep_to_html, sweep_to_text

        summary = {
            "version": 1,
            "model": model_name,
            "dtype": args.dtype,
            "device": device,
            "new_tokens": args.new_tokens,
            "budget_bytes": budget,
            "tokens_per_second": (
                "tokens generated over every batch row (the KV log's: 1 per prefill, then each step's "
                "appended tokens net of crops) / recording wall time (profiler on)"
            ),
            "rows": rows,
        }
        write_replacing(out / "sweep.json", json.dumps(summary, indent=2).encode("utf-8"))
        slides = "" if window is None else f", {a_or_an(str(window))}-token window"
        title = f"kvtrace sweep: {model_name} ({args.dtype}, {device}, {args.new_tokens} new tokens{slides})"
        write_replacing(out / "sweep.html", page_bytes(sweep_to_html(rows, budget, title)))
        files = f"{out / 'sweep.json'} and {out / 'sweep.html'}"

        def show() -> None:
            print(sweep_to_text(rows, budget, title))
            print(f"wrote {files} ({len(rows)} points)")

        print_after_writing(show, f"the sweep is written all the same ({files})")
