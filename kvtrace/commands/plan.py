"""`kvtrace plan`: the capacity planner's command line. The arithmetic lives in `analyzers.planning.plan`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

from kvtrace.commands.base import AsTyped, Command, add_gpu_memory, gpu_memory_flag, shell_arg, short_dtype
from kvtrace.commands.output import print_result
from kvtrace.commands.plan_flags import refuse_unbuildable_kv
from kvtrace.commands.plan_grid import counts
from kvtrace.commands.plan_notes import (
    budget_note,
    config_window_note,
    layout_note,
    limit_note,
    run_prompt_at,
)
from kvtrace.commands.progress import reading
from kvtrace.errors import KvtraceError, UsageError

if TYPE_CHECKING:
    from analyzers.planning.plan_types import PlanResult, RecordedPeak
    from analyzers.planning.run_defaults import RunDefaults
    from analyzers.planning.run_peak import PeakMoment

DTYPES = ("bf16", "fp16", "fp32", "fp8", "int8", "int4")
KV_DTYPES = (*DTYPES, "int2")  # a QuantizedCache of nbits=2; no weights format is planned at 2 bits
# demo's and record's names: sliding a DynamicCache's window, static_sliding a StaticCache's
CACHES = ("dynamic", "static", "sliding", "static_sliding", "quantized")
_SLIDING = ("sliding", "static_sliding")  # the kinds that keep a window (plan_types.SLIDING_CACHES)
# `kvtrace demo --cache` names of a QuantizedCache: its backend, and the KV dtype it holds by default
_DEMO_QUANTIZED = {"fp8": ("fp8", "fp8"), "quanto": ("quanto", "int4"), "hqq": ("hqq", "int4")}


def _demo_cache_name(args: argparse.Namespace) -> str | None:
    """`--cache fp8|quanto|hqq` (demo's names) as the quantized cache they record: `--cache quantized`, the
    KV dtype their backend holds unless typed; returns the backend (None for plan's own names). A typed KV
    dtype that the backend cannot hold, and `offloaded`, whose KV plan does not place, are refused."""
    if args.cache == "offloaded":
        raise KvtraceError(
            "--cache offloaded: plan does not model an offloaded cache (its KV on the CPU, a layer at a time "
            "on the device); --cache dynamic plans all of its KV on the device, an upper bound"
        )
    if args.cache not in _DEMO_QUANTIZED:
        return None
    backend, kv_dtype = _DEMO_QUANTIZED[args.cache]
    typed = getattr(args, "kv_dtype", None)
    if typed is not None and (typed == "fp8") != (backend == "fp8"):
        raise KvtraceError(
            f"--cache {args.cache} holds {kv_dtype} KV, not --kv-dtype {typed}: use --cache quantized "
            f"--kv-dtype {typed}"
        )
    args.cache, args.kv_dtype = "quantized", typed or kv_dtype
    return backend


def parse_reserve(text: str) -> tuple[int | None, float | None]:
    """(bytes, fraction) from --reserve: a plain number below 1 is a fraction of the GPU ("0.1"), anything
    else a size ("2GiB", "1.5e9"). Fractions are the common case, and nobody reserves less than one byte."""
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        number = None
    if number is not None and number.is_nan():  # NaN cannot be compared (it raises): refused as a size
        number = None
    if number is not None and number.is_finite() and 0 <= number < 1:
        return None, float(number)
    if number is not None and number < 0:
        raise KvtraceError(f"--reserve {text.strip()}: cannot be negative (a fraction in [0, 1) or a size)")
    if number is not None and number.is_finite() and (number != number.to_integral_value() or number < 1024):
        # "1.5" or "2": a fraction of 150%, or 1.5 GB without its unit; as bytes it would be a byte or two
        raise KvtraceError(
            f"--reserve {text.strip()}: a fraction must be below 1 (0.15), a size needs its unit (1.5GiB)"
        )
    from analyzers.planning.size_text import parse_size

    return parse_size(text, "--reserve"), None


# The vLLM group's flags (but --engine and --from-run, said apart): a plain plan has no use for them
_VLLM_ONLY = (
    ("gpu_memory_utilization", "--gpu-memory-utilization"),
    ("max_model_len", "--max-model-len"),
    ("kv_cache_dtype", "--kv-cache-dtype"),
    ("tensor_parallel_size", "--tensor-parallel-size"),
    ("pipeline_parallel_size", "--pipeline-parallel-size"),
    ("pp_layer_partition", "--pp-layer-partition"),
    ("kv_cache_memory", "--kv-cache-memory"),
    ("num_gpu_blocks_override", "--num-gpu-blocks-override"),
    ("max_num_batched_tokens", "--max-num-batched-tokens"),
    ("async_scheduling", "--async-scheduling"),
    ("weights_bytes", "--weights-bytes"),
    ("activation_peak", "--activation-peak"),
    ("non_torch", "--non-torch"),
)


def _quantized_settings(run: RunDefaults | None, cache: str) -> tuple[int, int]:
    """(q_group_size, residual_length): the run's QuantizedCache's, where the log shows them and the plan is
    of a quantized cache too, else transformers' defaults."""
    from analyzers.planning.quantized_cache import DEFAULT_GROUP_SIZE, DEFAULT_RESIDUAL_LENGTH

    if run is None or cache != "quantized" or run.cache != "quantized":
        return DEFAULT_GROUP_SIZE, DEFAULT_RESIDUAL_LENGTH
    return run.quant_group_size or DEFAULT_GROUP_SIZE, run.residual_length or DEFAULT_RESIDUAL_LENGTH


def _recorded(run: RunDefaults, moment: PeakMoment) -> RecordedPeak:
    """The run's peak with the settings it ran with: those a plan with no flag but --from-run repeats."""
    from dataclasses import fields

    from analyzers.planning.plan_types import MeasuredPeak, RecordedPeak

    weights_dtype = run.weights_dtype or "bf16"
    default_kv = weights_dtype if weights_dtype in ("bf16", "fp16", "fp32") else "bf16"
    group_size, residual_length = _quantized_settings(run, run.cache)
    assert run.context is not None
    measured = {field.name: getattr(moment, field.name) for field in fields(MeasuredPeak)}
    if moment.batch != (run.batch or 1):
        # diagnose's rows are the moment's; a moment of another row count than the run's cache (a module's
        # buffers planned at their capacity) leaves the activations as measured
        measured.update(dict.fromkeys(_TOLD_BY_THE_ROWS))
    return RecordedPeak(
        **measured,
        weights_bytes=run.weights_bytes,
        batch=run.batch or 1,
        context=run.context,
        prompt=run.prompt,
        cache=run.cache,
        kv_dtype=run.kv_dtype or ("int4" if run.cache == "quantized" else default_kv),
        window=run.window if run.cache in ("sliding", "static_sliding") else None,
        beams=run.beams,
        quant_group_size=group_size,
        residual_length=residual_length,
        compute_dtype=run.weights_dtype,  # a float dtype, the model's, where the run says
        encoder_tokens=run.encoder_tokens,
        padded=run.padded,
        transformers_version=run.transformers_version,
        device=run.device,
    )


# The measured figures told by the moment's rows (diagnose's split of them), which a plan takes only where
# those are the run's
_TOLD_BY_THE_ROWS = (
    "row_activation_bytes",
    "prefill_prompt_bytes",
    "prefill_moments",
    "prefill_held_bytes",
    "prefill_peak_moment",
    "decode_row_bytes",
    "batch_fixed_bytes",
    "prefill_batch_fixed_bytes",
    "update_batch_fixed_bytes",
)


_FILE_KINDS = {
    "snapshot": "a CUDA snapshot",
    "chrome_trace": "a Chrome trace",
    "memory_timeline": "a memory timeline",
}


def _refuse_a_file_as_run(path: Path) -> None:
    """--from-run handed a file (a snapshot or a trace, which `report` and `diagnose` read): one line saying
    what --from-run takes and what plans such a file's model instead, where the run reader said only "not a
    directory". A snapshot or trace names no model: no geometry to plan from. A run's own file (its
    manifest, its trace in profiler/) names the run to pass."""
    if not path.exists() or path.is_dir():
        return  # missing: `require_input` says so; a folder: the run reader says what it lacks
    from kvtrace.format import is_run_dir

    run = next((folder for folder in (path.parent, path.parent.parent) if is_run_dir(folder)), None)
    if run is not None:
        raise KvtraceError(
            f"{path}: a file of the kvtrace run {run}: --from-run takes the run's folder, {run}"
        )
    from analyzers.readers.sources import sniff

    try:
        what = _FILE_KINDS.get(sniff(path), "a file")
    except (KvtraceError, OSError):
        what = "a file"
    raise KvtraceError(
        f"{path}: {what}, not a run: --from-run takes a run directory recorded with kvtrace (kvtrace.record "
        "or `kvtrace run`); a snapshot or trace holds no model geometry: plan with --preset NAME or --config "
        f"PATH instead (`kvtrace report {shell_arg(path)}` reads the file)"
    )


def _engine_of(run: str) -> str:
    """The planner a run asks for when --engine is not given: "vllm" for a vLLM run (engine.json naming
    vLLM, or no name: the first engine kvtrace wrote), else "hf", whose run reading refuses another engine's
    pool in its own words. Only the name is read here; the planner reads the run and says what is wrong."""
    from kvtrace.json_reads import read_json_file

    engine = Path(run) / "engine.json"
    try:
        present = engine.is_file()
    except OSError:  # a run folder that cannot be read: the planner's reading names it, not engine.json
        return "hf"
    if not present:
        return "hf"
    try:
        said = read_json_file(engine, "corrupt engine.json")
    except Exception:  # damaged: the vLLM planner's reading names the file and the problem
        return "vllm"
    name = said.get("name", "") if isinstance(said, dict) else ""
    return "vllm" if name in ("vllm", "") else "hf"


def _typed_layout(text: str) -> tuple[int, int]:
    """(major, minor) of a --transformers release ("5.17", "5.17.0", "5.25.0.dev0"); one line otherwise."""
    import re

    from kvtrace.geometry import major_minor

    version = major_minor(text) if re.fullmatch(r"\d+\.\d+(\.\d+)?(\.?(dev|rc)\d+)?", text) else None
    if version is None:
        raise KvtraceError(f"--transformers {text!r}: not a transformers release; give one as 5.17 or 5.17.0")
    return version


class PlanCommand(Command):
    """Plan GPU memory: will a model's weights and KV cache fit at this batch and context?

    Pure arithmetic from the model geometry (a --preset or a local config.json): nothing is loaded, no GPU
    is needed. The peak counts the prefill's activations (transformers runs the whole prompt through the
    model at once: at a long prompt they rival the KV), estimated for sdpa attention and unpadded prompts;
    --from-run RUN measures them, and the weights, on a recorded run instead.
    Exit status: 0 when the plan fits, 1 when it does not (or when standard output cannot be written: a full
    disk, said on stderr), 2 for bad input (like grep and diff), so a launch script can run
    `kvtrace plan ... && serve ...`; the plan is printed either way.
    """

    name = "plan"
    examples = (
        "kvtrace plan --preset llama-3.1-8b --batch 8 --context 32768 --gpu-memory L4",
        "kvtrace plan --preset llama-3.1-8b --batch 1,8,32 --context 8192,131072 --json",
        "kvtrace plan --from-run runs/demo-dynamic --batch 64 && python serve.py",
    )
    defers_numpy = True  # a plan from a preset or a config is arithmetic: it never needs an array

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        model = parser.add_mutually_exclusive_group()
        model.add_argument("--preset", metavar="NAME", help="built-in model, e.g. llama-3-8b, llama-3.1-70b")
        model.add_argument(
            "--config", metavar="PATH", help="a local Hugging Face config.json (or its folder)"
        )
        parser.add_argument(
            "--dtype",
            type=short_dtype,
            choices=DTYPES,
            help="weights dtype (default bf16; with --from-run, the run's)",
        )
        parser.add_argument(
            "--kv-dtype",
            type=short_dtype,
            choices=KV_DTYPES,
            help="KV cache dtype (default: --dtype for bf16/fp16/fp32 weights, bf16 for quantized weights, "
            "which compute in bf16; int4 with --cache quantized, as transformers' default; int2 and int8 too "
            "(nbits), or fp8 for its fp8 backend). A dynamic or static cache holds the compute dtype, bf16, "
            "fp16 or fp32: int2/int4/int8/fp8 without --cache quantized is refused",
        )
        parser.add_argument(
            "--batch",
            type=counts("--batch"),
            help="sequences decoded together (default 1, or the run's); under beam search prompts x beams, "
            "the rows. With --engine vllm: requests running at once (max_num_seqs), each of --max-model-len "
            "tokens, checked against the pool (none by default). A comma list (1,4,8) plans each, beside "
            "each --context listed, as one table",
        )
        parser.add_argument(
            "--beams",
            type=int,
            help="generate()'s num_beams (default 1, or the run's): each step's beam reorder copies every "
            "layer's K and V beside the old ones, and a dynamic cache's sliding layers then hold window - 1 "
            "tokens; --batch must be a multiple of it",
        )
        parser.add_argument(
            "--context",
            type=counts("--context"),
            help="tokens per sequence as generate() counts them, the prompt plus the new tokens, at least 2 "
            "(default 8192, Llama 3's native length, or the model's max_position_embeddings when fewer; with "
            "--from-run, the run's, and a --context typed keeps the run's prompt, changing the new tokens "
            "alone, unless it leaves no room for it); the cache holds one fewer: generate() never writes its "
            "last new token. With --engine vllm: max_model_len (refused beside another --max-model-len). A "
            "comma list (8192,32768,131072) plans each, beside each --batch listed, as one table",
        )
        parser.add_argument(
            "--prompt",
            type=int,
            help="the prompt's tokens, below --context (default: the worst prompt for the context; with "
            "--from-run, the run's, unless --context is too short for it). A "
            "dynamic cache's sliding layers (Mistral, Gemma) hold the whole prompt until the first decode "
            "step, so the worst prompt, the context less one or two tokens, gets no help from the window",
        )
        parser.add_argument(
            "--encoder-tokens",
            type=int,
            metavar="N",
            help="an encoder-decoder model's (T5, BART, Whisper) encoder input length, tokens a row: its "
            "cross-attention KV, every decoder layer's K and V of the encoder's output, grows with it and "
            "the batch, not with --context (default: the run's; Whisper's max_source_positions; else "
            "--context, an input as long as the decoder's sequence); refused with --engine vllm",
        )
        add_gpu_memory(
            parser,
            "memory of one GPU, e.g. 80GiB, 24GB, or a GPU's name (H100, A100-40GB, L4, RTX-4090: the total "
            "nvidia-smi shows for it; a note says it); a number without a unit is bytes, refused below 1 MiB "
            "(default 80GiB; with --from-run, the budget the run was recorded with, else its GPU's); "
            "--budget is another name for it",
        )
        parser.add_argument(
            "--reserve",
            help="memory kept out of the plan for CUDA context, a decode step's activations and "
            "fragmentation (the prefill's activations are estimated: the plan's 'prefill activations'): a "
            "fraction of the GPU below 1 (default 0.1, as vLLM's 0.9 utilization before 0.32) or a size such "
            "as 2GiB; with "
            "--from-run of a run recorded with allocator events, default 0: the run's measured activations "
            "replace the guess, and a typed reserve is kept on top of them",
        )
        parser.add_argument(
            "--cache",
            choices=(*CACHES, *_DEMO_QUANTIZED, "offloaded"),
            help="transformers cache kind (default dynamic, or the run's), named as `kvtrace demo --cache` "
            "names them (fp8, quanto and hqq: --cache quantized with that backend and its KV dtype): sliding "
            "is a DynamicCache whose every layer keeps a window (it holds the whole "
            "prompt until the first decode step, and grows by copies), static_sliding a StaticCache whose "
            "every layer does (the window allocated at the start, no growth copy; what plan called sliding "
            "until the names were made demo's). Refused with --engine vllm, whose pool is paged",
        )
        parser.add_argument(
            "--window",
            type=int,
            help="tokens a sliding or static_sliding cache keeps on every layer (default the model's, or the "
            "run's); refused with --engine vllm, which slides as the model's config does",
        )
        parser.add_argument(
            "--block-size",
            type=int,
            help="tokens per paged KV block (default 16; with --engine vllm --from-run, the run's)",
        )
        parser.add_argument(
            "--transformers",
            metavar="VERSION",
            help="lay caches and weights out as this transformers release does where releases differ (5.17 "
            "caches DeepSeek-V3.2's K and V per head and keeps MoE routers in the model's dtype, 5.25 the "
            "latent and float32 routers), e.g. 5.17 or 5.17.0: plan for the GPU box's release from a laptop "
            "with another (default: with --from-run the run's, else the installed one)",
        )
        parser.add_argument("--json", action="store_true", help="print the plan as JSON")
        parser.add_argument(
            "-q", "--quiet", action="store_true", help="no progress bar (--from-run: while the run is read)"
        )
        vllm = parser.add_argument_group(
            "vLLM (--engine vllm)",
            "KV blocks and maximum concurrency as vLLM computes them at start. transformers' own flags are "
            "refused there, each naming vLLM's: --reserve (--gpu-memory-utilization), --cache, --window, "
            "--encoder-tokens, --kv-dtype (--kv-cache-dtype), --prompt, --beams, --transformers",
        )
        vllm.add_argument(
            "--engine",
            choices=("hf", "vllm"),
            help="hf: transformers caches; vllm (default: the --from-run run's engine, else hf)",
        )
        vllm.add_argument(
            "--gpu-memory-utilization", type=float, help="vLLM's (default 0.92, vLLM 0.32's; or the run's)"
        )
        vllm.add_argument(
            "--max-model-len",
            type=int,
            help="tokens per request (default --context, else the run's, else vLLM's default: the model's "
            "whole length as vLLM derives it, e.g. 131072 for Llama 3.1); above max_position_embeddings vLLM "
            "refuses to start",
        )
        vllm.add_argument("--kv-cache-dtype", help="auto (the weights dtype, default) or fp8; or the run's")
        vllm.add_argument(
            "--tensor-parallel-size", type=int, help="GPUs the model is split over (default 1, or the run's)"
        )
        vllm.add_argument(
            "--pipeline-parallel-size",
            type=int,
            help="pipeline stages, each a worker (of --tensor-parallel-size GPUs) holding the KV and weights "
            "of its own layers; vLLM keeps the fewest blocks of any stage (default 1, or the run's)",
        )
        vllm.add_argument(
            "--pp-layer-partition",
            metavar="N,N,...",
            help="layers of each stage, as vLLM's VLLM_PP_LAYER_PARTITION (default: vLLM's even split, the "
            "remainder to the stages before the last; or the run's)",
        )
        # also by vLLM's own name, which a refused start's remedy gives ("--kv-cache-memory-bytes N", as
        # `vllm serve` takes it): typed here, it plans that remedy
        vllm.add_argument(
            "--kv-cache-memory",
            "--kv-cache-memory-bytes",
            action=AsTyped,
            help="vLLM's kv_cache_memory_bytes, e.g. 1MiB or 1048576 (skips the profile arithmetic; default: "
            "the run's)",
        )
        vllm.add_argument(
            "--num-gpu-blocks-override",
            type=int,
            metavar="N",
            help="vLLM's num_gpu_blocks_override: the pool is N blocks whatever the memory (default: the "
            "run's; 0 plans without the run's override)",
        )
        vllm.add_argument(
            "--max-num-batched-tokens",
            type=int,
            metavar="N",
            help="vLLM's max_num_batched_tokens: with a sliding window, a request holds the window and the "
            "tokens in flight (default: the run's, else vLLM 0.32's default for LLM(): 16384 on a GPU of "
            "70 GiB or more, 8192 below, 4096 on CPU)",
        )
        vllm.add_argument(
            "--async-scheduling",
            action=argparse.BooleanOptionalAction,
            help="vLLM's async scheduling, two batches in flight (default: the run's, else on, as vLLM on "
            "GPU; off on CPU)",
        )
        vllm.add_argument(
            "--weights-bytes",
            help="weights per GPU, every pipeline stage's alike (default: from the geometry, each stage its "
            "own; with --from-run, the run's)",
        )
        vllm.add_argument("--activation-peak", help="activation peak of vLLM's profile run (default 0)")
        vllm.add_argument("--non-torch", help="memory outside torch: CUDA context, NCCL (default 0)")
        vllm.add_argument(
            "--from-run",
            metavar="RUN",
            help="a recorded run, without --preset/--config. A transformers run: its model, measured "
            "weights and activations (at its peak, its prefill and its decode steps, moved to the plan's "
            "rows, tokens and cache; they replace the reserve), device memory, dtypes, cache kind, batch, "
            "beams, context and prompt (a flag you type wins): with no other flag, the plan of the run "
            "itself. A vLLM run (vLLM's rules, no --engine "
            "needed): its measured weights, activations, non-torch memory and device total, its settings "
            "(block size, max_model_len, kv_cache_dtype, kv_cache_memory_bytes, num_gpu_blocks_override, "
            "utilization, tensor parallel size, max_num_batched_tokens, async scheduling) and its model. A "
            "transformers continuous-batching run (generate_batch) is not planned: `kvtrace diagnose RUN "
            "--gpu-memory SIZE` prices its pool",
        )

    def run(self, args: argparse.Namespace) -> int:
        if isinstance(args.batch, tuple) or isinstance(args.context, tuple):  # a comma list: every point
            from kvtrace.commands.plan_grid import run_grid

            return run_grid(args, self._result)
        from analyzers.planning.plan import format_text, to_json

        result = self._result(args)
        if isinstance(result, int):  # vLLM's plan, printed by its own path
            return result
        print_result(args.json, lambda: to_json(result), lambda: format_text(result))
        return 0 if result.fits else 1

    def _result(self, args: argparse.Namespace) -> PlanResult | int:
        """The plan of one batch and context (analyzers.planning.plan's `PlanResult`), or the exit status
        of `--engine vllm`'s plan, which prints itself."""
        from analyzers.planning.hf_config import NEWEST_LAYOUT, geometry_from_config
        from analyzers.planning.plan import PlanRequest, parse_size, plan
        from analyzers.planning.presets import get_preset
        from kvtrace.geometry import installed_transformers_version, major_minor

        typed = getattr(args, "transformers", None)
        layout = _typed_layout(typed) if typed is not None else None
        if getattr(args, "from_run", None) is not None:
            _refuse_a_file_as_run(Path(args.from_run))
        if getattr(args, "engine", None) is None:
            args.engine = _engine_of(args.from_run) if getattr(args, "from_run", None) is not None else "hf"
        if args.engine == "vllm":
            if args.beams not in (None, 1):  # vLLM's pool is sized per token, whatever samples it
                raise KvtraceError("--beams plans transformers' caches: it has no meaning with --engine vllm")
            if typed is not None:  # vLLM lays its pool out its own way, whatever transformers is installed
                raise KvtraceError(
                    "--transformers lays out transformers' caches: it has no meaning with --engine vllm"
                )
            from kvtrace.commands.plan_vllm import run_vllm_plan

            return run_vllm_plan(args)
        typed_backend = _demo_cache_name(args)
        given = [
            getattr(args, f"{dest}_flag", None) or flag  # the name typed, where a flag has two
            for dest, flag in _VLLM_ONLY
            if getattr(args, dest, None) is not None
        ]
        if given:  # silently ignored, a --tensor-parallel-size 2 plan read as per GPU while it was for one
            what = "is a vLLM setting" if len(given) == 1 else "are vLLM settings"
            raise KvtraceError(f"{', '.join(given)} {what}: add --engine vllm (a plain plan is one GPU's)")
        run = None
        if getattr(args, "from_run", None) is not None:
            if args.preset is not None or args.config is not None:
                raise KvtraceError("--from-run plans the run's own model: drop --preset/--config")
            from analyzers.planning.run_defaults import run_defaults
            from kvtrace.commands.base import require_input

            require_input(Path(args.from_run))
            # A long run's KV log is read (and replayed) for a minute or more: the bar `report` draws
            with reading(f"reading {Path(args.from_run).name}", getattr(args, "quiet", False)) as update:
                run = run_defaults(args.from_run, layout, progress=update)
            geometry = run.geometry
            used = layout or major_minor(run.transformers_version)
        elif args.preset is None and args.config is None:
            raise UsageError("give a model: --preset NAME, --config PATH or --from-run RUN")
        elif args.preset is not None:
            geometry, used = get_preset(args.preset), layout  # Llama 3: every release lays it out alike
        else:
            used = layout or installed_transformers_version()
            geometry = geometry_from_config(args.config, used)
        unnamed = used is None and args.preset is None
        if unnamed:  # no release known: the planner's newest layouts
            used = NEWEST_LAYOUT
        layout_name = f"{used[0]}.{used[1]}" if used is not None else None
        # A flag typed wins; else the run's setting; else the flag's default
        batch = args.batch if args.batch is not None else (run.batch if run and run.batch else 1)
        beams = args.beams if args.beams is not None else (run.beams if run else 1)
        cache = args.cache or (run.cache if run else "dynamic")
        refuse_unbuildable_kv(args.kv_dtype, cache)  # int4 KV typed for a DynamicCache, which keeps bf16
        if (
            run is not None
            and run.config_geometry is not None
            and args.cache not in (None, run.cache, *_SLIDING)
        ):
            # The window was the run's cache's, not the model's: another kind typed is built from the config
            geometry = run.config_geometry
            run = replace(
                run,
                notes=tuple(
                    config_window_note(run, cache) if note == run.window_note else note for note in run.notes
                ),
            )
        # Weight-only quantization (int4/int8 GPTQ/AWQ, fp8 weights) computes in bf16, and the KV cache holds
        # what attention computes: its dtype follows the weights only when they are a float dtype.
        weights_dtype = args.dtype or (run.weights_dtype if run and run.weights_dtype else "bf16")
        default_kv = weights_dtype if weights_dtype in ("bf16", "fp16", "fp32") else "bf16"
        # The run's KV dtype, where the cache planned is as quantized as the run's was, and its weights, both
        # as the run had them only while the weights dtype is the run's: a typed --dtype plans other weights
        redtyped = run is not None and args.dtype is not None and args.dtype != run.weights_dtype
        same_kind = run is not None and (cache == "quantized") == (run.cache == "quantized")
        # A QuantizedCache's KV dtype is its own setting (nbits, or the fp8 backend), not the weights': it
        # stays under another --dtype
        kept_kv = not redtyped or cache == "quantized"
        run_kv = run.kv_dtype if run and same_kind and kept_kv else None
        measured = run.weights_bytes if run is not None and not redtyped else None
        if run is not None and layout is not None and layout != major_minor(run.transformers_version):
            # another release's routers and tables: the geometry's weights, unless only the measured shard
            # of a tensor-parallel rank says them
            if run.rank_shards is None:
                measured = None
            run = replace(
                run,
                notes=(*run.notes, layout_note(run, str(typed), layout, measured is not None)),
            )
        if run is not None and redtyped:
            from analyzers.planning.rank_share import rank_weights_at

            # a tensor-parallel rank's geometry is cut to its heads alone, and one read from a model's cache
            # buffers has no MLP nor vocabulary: their weights are the measured ones, re-stored
            restored = (
                rank_weights_at(
                    run.weights_bytes, run.geometry, run.weights_dtype, args.dtype, run.fp32_weights_bytes
                )
                if run.rank_shards is not None or run.measured_weights_only
                else None
            )
            measured = restored
            whose = "the rank's" if run.rank_shards is not None else "the"
            weighed = (
                f"are {whose} measured {run.weights_bytes:,} B re-stored at {args.dtype}, {restored:,} B "
                "(its parameters re-stored, and its buffers: those the run recorded at fp32 kept so)"
                if restored is not None
                else f"are the geometry's at {args.dtype}, not the {run.weights_bytes:,} B measured"
            )
            if restored is None and run.measured_weights_only:
                raise KvtraceError(
                    f"{args.from_run}: its weights ({run.weights_dtype or 'of an unknown dtype'}) cannot be "
                    f"re-stored at --dtype {args.dtype}, and its model's geometry (its cache buffers') does "
                    "not say them: drop --dtype"
                )
            run = replace(
                run,
                notes=(
                    *run.notes,
                    f"--dtype {args.dtype} is not the run's ({run.weights_dtype or 'unknown'}): the weights "
                    f"{weighed}, and the "
                    + (
                        f"quantized cache keeps the run's {run_kv} KV unless --kv-dtype says"
                        if run_kv is not None
                        else "KV follows --dtype unless --kv-dtype says"
                    ),
                ),
            )
        if run is not None and measured is None and run.rank_shards is None:
            from analyzers.planning.param_count import buffers_as_recorded

            # the geometry weighs the weights: its rotary tables as the run held them, in its dtype where
            # the model was cast whole by `.to()` (a rank's are, by `rank_weights_at`)
            geometry = buffers_as_recorded(geometry, run.weights_dtype, run.fp32_weights_bytes)
        kv_dtype = args.kv_dtype or run_kv or ("int4" if cache == "quantized" else default_kv)
        moment = None
        if run is not None and run.context is not None:
            from analyzers.planning.run_peak import peak_moment

            # its trace read as `report` reads it, with the bar report draws on a terminal for a big one
            with reading(f"reading {Path(args.from_run).name}", getattr(args, "quiet", False)) as update:
                found = peak_moment(args.from_run, run.prompt, run.context, run.encoder_tokens, update)
            if isinstance(found, str):
                run = replace(run, notes=(*run.notes, found))
            else:
                moment = found
        # A run's measured activations replace the reserve's guess at them; a typed reserve goes on top (a
        # CUDA run without allocator events: what its samples' peaks exceed the arithmetic by,
        # `plan_reserve.sampled_reserve_plan`)
        reserve_text = args.reserve if args.reserve is not None else ("0" if moment is not None else "0.1")
        reserve_bytes, reserve_fraction = parse_reserve(reserve_text)
        prompt = args.prompt
        defaults: list[str] = []  # the settings taken as defaults, which the output names
        if args.context is not None:
            context = args.context
            if run is not None and prompt is None:
                prompt, said = run_prompt_at(run, context)
                if said:
                    run = replace(run, notes=(*run.notes, said))
        elif run is not None and run.context is not None:
            context = run.context  # the run's, and its prompt unless one is typed
            prompt = prompt if prompt is not None else run.prompt
        else:  # 8192, Llama 3's native length, unless the model takes fewer positions (Llama 2: 4096)
            context = min(8192, geometry.max_position_embeddings or 8192)
            defaults.append("context")
        if batch < 1:
            raise KvtraceError("--batch must be at least 1")
        if beams < 1:
            raise KvtraceError("--beams must be at least 1")
        if batch % beams:
            if args.batch is not None:
                said = f"--batch {batch}"
            elif run is not None:
                said = f"the run's batch ({batch} rows)"
            else:  # no run: the default batch, which --batch changes
                said = f"the default batch ({batch} row{'s' if batch != 1 else ''}, no --batch given)"
            raise KvtraceError(
                f"{said} is not a multiple of --beams {beams}: --batch counts the rows "
                f"decoded together, prompts x beams (2 prompts of {beams} beams: "
                f"--batch {2 * beams})"
            )
        if context < 2:
            raise KvtraceError(
                "--context must be at least 2: a prompt of at least 1 token plus one new token"
            )
        if args.gpu_memory is not None:
            from analyzers.planning.size_text import parse_device_memory

            gpu_memory = parse_device_memory(args.gpu_memory, gpu_memory_flag(args))
        elif run is not None and run.budget_bytes is not None:
            # The memory the run was meant to fit, which report and diagnose check it against
            gpu_memory = run.budget_bytes
            run = replace(run, notes=(*run.notes, budget_note(run.budget_bytes, run)))
        elif run is not None and run.limit_bytes is not None:
            # The cap the run ran out under: planned on the whole device, the run that died "fits"
            gpu_memory = run.limit_bytes
            run = replace(run, notes=(*run.notes, limit_note(run.limit_bytes, run)))
        elif run is not None and run.gpu_memory_bytes is not None:
            gpu_memory = run.gpu_memory_bytes
        else:
            gpu_memory = parse_size("80GiB", "--gpu-memory", positive=True)
            defaults.append("gpu_memory")
            if run is not None:
                run = replace(
                    run,
                    notes=(
                        *run.notes,
                        f"the run was on {run.device}: planned for an 80 GiB GPU (--gpu-memory)",
                    ),
                )
        group_size, residual_length = _quantized_settings(run, cache)
        encoder_tokens = args.encoder_tokens
        if encoder_tokens is None and run is not None:
            encoder_tokens = run.encoder_tokens
        window = args.window
        if window is None and run is not None and cache in ("sliding", "static_sliding"):
            window = run.window  # the window the run's sliding cache kept, where the log shows it
        request = PlanRequest(
            geometry=geometry,
            weights_dtype=weights_dtype,
            kv_dtype=kv_dtype,
            batch=batch,
            context=context,
            gpu_memory_bytes=gpu_memory,
            reserve_bytes=reserve_bytes,
            reserve_fraction=reserve_fraction,
            cache=cache,
            window=window,
            prompt=prompt,
            beams=beams,
            encoder_tokens=encoder_tokens,
            block_size=args.block_size if args.block_size is not None else 16,
            measured_weights_bytes=measured,
            quant_group_size=group_size,
            residual_length=residual_length,
            # the run's backend where the plan keeps its quantized cache; else quanto's packing, the larger
            quant_backend=typed_backend
            or (run.quant_backend if run is not None and cache == "quantized" else None),
            transformers_layout=layout_name,
            defaults=tuple(defaults),
        )
        if run is not None and moment is not None:
            recorded = _recorded(run, moment)
            request = replace(request, recorded=recorded)
            from analyzers.planning.recorded_run import same_cache_as_run
            from analyzers.planning.run_peak import recorded_note

            rows_told = recorded.row_activation_bytes is not None
            note = recorded_note(moment, same_cache_as_run(request), args.reserve is not None, rows_told)
            run = replace(run, notes=(*run.notes, note))
        if run is not None and moment is None and run.device == "cuda":
            from kvtrace.commands.plan_reserve import sampled_reserve_plan

            request, run = sampled_reserve_plan(args.from_run, args.reserve is not None, request, run)
        result = plan(request)
        if encoder_tokens is None and geometry.cross_kv_layers and not geometry.encoder_length:
            said = (
                f"the encoder's input length is not given: its cross-attention KV is planned for "
                f"{request.effective_encoder_tokens:,} tokens a row, the context (--encoder-tokens)"
            )
            result = replace(result, notes=(*result.notes, said))
        if unnamed:
            said = (
                "the run does not name its transformers"
                if run is not None
                else "no transformers is installed"
            )
            result = replace(
                result,
                notes=(
                    *result.notes,
                    f"{said}: caches and weights are laid out as transformers {layout_name}, the "
                    "newest kvtrace knows, does (--transformers names the release that will run it)",
                ),
            )
        if run is not None:
            result = replace(result, notes=(*run.notes, *result.notes))
        if args.gpu_memory is not None:
            from kvtrace.gpu_names import gpu_note

            named = gpu_note(args.gpu_memory, "--gpu-memory")
            if named is not None:
                result = replace(result, notes=(*result.notes, named))
        return result
