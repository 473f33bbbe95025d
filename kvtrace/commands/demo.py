"""Record a Llama 3 architecture model (random weights, real tokenizer) and report on it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from kvtrace.commands.base import (
    MAKES_FOLDERS,
    Command,
    add_gpu_memory,
    gpu_memory_flag,
    long_dtype,
    shell_arg,
)
from kvtrace.commands.output import check_html_target
from kvtrace.errors import KvtraceError, MissingPart

_DTYPES = ("float32", "bfloat16", "float16")
# The demo's story: weights 44 MiB, KV 64 KiB per token and sequence (41.5 MiB for 8 x 83 tokens), a
# peak of ~110 MiB; a 96 MiB device runs out about halfway through decoding, and the report says where.
DEMO_GPU_MEMORY = "96MiB"


def refuse_occupied(out: Path, overwrite: bool) -> None:
    """Refuse, before a model is built, a folder that holds a recording (a run, or a run group's ranks):
    only `--overwrite` replaces one, as `kvtrace.record` would say after the build; and with it, a run
    whose files cannot all be removed safely (a link in place of its profiler/), which it would refuse."""
    from kvtrace.run_layout import is_run_dir, rank_dirs

    if overwrite:
        if is_run_dir(out):
            from kvtrace.run_removal import check_run_removal

            check_run_removal(out, with_manifest=False)  # looked at only: the recording removes them
        return
    if is_run_dir(out):
        raise KvtraceError(f"{out}: already holds a run; pass --overwrite to replace it, or --out DIR")
    if rank_dirs(out):
        raise KvtraceError(f"{out}: already holds a run group; pass --overwrite to replace it, or --out DIR")


def refuse_not_a_run_folder(out: Path) -> None:
    """A file in --out's place, or in a parent's, leaves no folder to record into: refused (status 1, as
    `kvtrace.record` would refuse it) before a model is built or a script run. A sweep's folder (its
    sweep.json) or an export's (Parquet tables) is no run's, even with --overwrite: a run there would mix one
    recording with the sweep's table and point runs, or with the tables, as `kvtrace sweep` refuses a run's
    folder."""
    from kvtrace.errors import blocked_status, folder_blocked
    from kvtrace.run_layout import holds_export

    blocked = folder_blocked(out, "the run folder")
    if blocked is not None:
        raise KvtraceError(blocked, exit_code=blocked_status(out, folder=True))
    if (out / "sweep.json").exists():
        said = "a sweep's folder (sweep.json, runs/), not a run's; pass another --out DIR"
        raise KvtraceError(f"{out}: {said}")
    if holds_export(out):
        raise KvtraceError(
            f"{out}: an export directory (Parquet tables), not a run's folder; pass another --out DIR"
        )


def default_out(cache: str, press: str | None) -> str:
    """Each kind of demo its own folder, so that a second demo leaves the first to `kvtrace compare`."""
    return f"runs/demo-{cache}" + (f"-{press}" if press else "")


class DemoCommand(Command):
    """Record a Llama 3 architecture model (random weights, real tokenizer) and report on it.

    Builds a Llama 3 model (GQA, llama3 RoPE) of the chosen size with random weights, tokenizes real
    prompts with the Llama 3 tokenizer that `llama-models` ships, runs `generate()` under
    `kvtrace.record()`, then writes the report. Memory does not depend on weight values.
    Exit status: 0 on success; 1 when the run or its report cannot be written, or a part it needs is not
    installed (a --cache or --press package, vLLM); 2 for bad flags, an --out that holds a run
    (--overwrite replaces it), or an --out (or its timeline.html) that is a named pipe or a device
    (/dev/null included), refused before anything is recorded.
    """

    name = "demo"
    examples = (
        "kvtrace demo --size tiny -o runs/tiny",
        "kvtrace demo --cache static --gpu-memory T4 --no-profiler",
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from kvtrace.llama import CACHE_KINDS, SIZES

        parser.add_argument(
            "-o",
            "--out",
            "--output",
            metavar="DIR",
            help="run directory (default: runs/demo-<cache>, with -<press> when there is one; "
            f"{MAKES_FOLDERS})",
        )
        parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
        parser.add_argument(
            "--size",
            choices=sorted(SIZES),
            default="demo",
            help="model shape (default: demo, a Llama 3 shape whose KV cache is a large share of memory)",
        )
        parser.add_argument("--batch", type=int, default=8, help="sequences per batch (default: 8)")
        parser.add_argument(
            "--prompt", action="append", help="a prompt (repeat for several; default: built-in)"
        )
        parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
        add_gpu_memory(
            parser,
            f"mark where the run would run out on a device of SIZE, e.g. 8GiB, or a GPU's name (T4) "
            f"(default with --size demo: {DEMO_GPU_MEMORY}; 'none' for no budget); --budget is another name "
            "for it",
        )
        parser.add_argument(
            "--dtype",
            type=long_dtype,
            choices=_DTYPES,
            default="float32",
            help="weights and KV dtype (default: float32)",
        )
        parser.add_argument(
            "--cache", choices=CACHE_KINDS, default="dynamic", help="KV cache kind (default: dynamic)"
        )
        parser.add_argument(
            "--window", type=int, help="sliding window length (sliding caches only; default: 16)"
        )
        parser.add_argument("--beams", type=int, default=1, help="beam search width (default: greedy)")
        parser.add_argument("--no-profiler", action="store_true", help="KV log, NVTX and samples only")
        parser.add_argument("--with-stack", action="store_true", help="Python stacks in the profiler trace")
        parser.add_argument(
            "--device", default="cpu", help="cpu or cuda[:N] (default: cpu, also where CUDA is available)"
        )
        parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
        parser.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            help="no progress bars (generate()'s steps, the report's reading)",
        )
        parser.add_argument("--press", help="a kvpress eviction press (needs kvpress, transformers<5.3)")
        parser.add_argument(
            "--compression", type=float, help="press compression ratio in [0, 1) (with --press; default 0.5)"
        )
        parser.add_argument(
            "--engine",
            choices=("hf", "vllm"),
            default="hf",
            help="hf: transformers generate() (default); vllm: a tiny Llama 3 shape served by vLLM (needs "
            "vLLM installed) in a KV pool small enough to preempt (8 requests x 100 tokens; of the other "
            "flags only --out, --overwrite, --no-profiler, --no-report and -q apply, the others are "
            "refused)",
        )

    def run(self, args: argparse.Namespace) -> int:
        if getattr(args, "engine", "hf") == "vllm":
            from kvtrace.commands.demo_vllm import run_vllm_demo

            return run_vllm_demo(args)
        _check_flags(args)
        from analyzers.planning.size_text import parse_device_memory

        gpu_memory = args.gpu_memory  # flags first: a bad value is named whatever --out holds
        if gpu_memory is None and args.size == "demo":
            gpu_memory = DEMO_GPU_MEMORY
        budget = (
            None if gpu_memory in (None, "none") else parse_device_memory(gpu_memory, gpu_memory_flag(args))
        )
        # --out before torch is imported: a file in its place is refused at once, as `kvtrace run` does
        out = Path(args.out or default_out(args.cache, args.press))
        refuse_not_a_run_folder(out)
        refuse_occupied(out, args.overwrite)
        if not args.no_report:  # the page the report ends with: a pipe there is refused before recording
            check_html_target(str(out / "timeline.html"))
        import contextlib

        import torch

        import kvtrace
        from kvtrace.llama import cache_package_missing, cache_unavailable, device_unavailable

        problem = device_unavailable(args.device) or cache_unavailable(args.cache, args.device)
        if problem is not None:
            raise KvtraceError(problem)
        missing = cache_package_missing(args.cache)
        if missing is not None:
            raise MissingPart(missing)
        press = None
        if args.press:  # before the model is built: kvpress not installed is said at once
            from kvtrace.integrations.presses import make_press

            press = make_press(args.press, args.compression if args.compression is not None else 0.5)
        from kvtrace.commands.generate_bar import generate_bar
        from kvtrace.llama import (
            DEFAULT_PROMPTS,
            build_model,
            cache_keyword,
            encode_batch,
            llama3_tokenizer,
            make_cache,
        )

        tokenizer = llama3_tokenizer()
        prompts, prompt_note = _prompts(args, press, tokenizer, DEFAULT_PROMPTS)
        prompts = [prompts[i % len(prompts)] for i in range(args.batch)]
        model = build_model(args.size, dtype=getattr(torch, args.dtype), device=args.device)
        pad_id = model.config.pad_token_id
        input_ids, mask = encode_batch(tokenizer, prompts, pad_id)
        input_ids, mask = input_ids.to(args.device), mask.to(args.device)
        max_len = input_ids.shape[1] + args.new_tokens
        window = args.window if args.window is not None else 16
        cache, extra = make_cache(args.cache, model, args.batch * args.beams, max_len, window=window)
        if cache is not None:
            extra[cache_keyword()] = cache
        press_context: Any = contextlib.nullcontext() if press is None else press(model)
        budget_text = f", budget {gpu_memory}" if budget is not None else ""
        print(
            f"kvtrace demo: Llama 3 '{args.size}' ({sum(p.numel() for p in model.parameters()):,} params, "
            f"{args.dtype}), batch {args.batch}, prompt {input_ids.shape[1]} tokens, "
            f"{args.new_tokens} new, {args.cache} cache{budget_text}"
        )
        if prompt_note:
            print(f"  note: {prompt_note}")
        started = time.perf_counter()
        with (
            torch.no_grad(),
            kvtrace.record(
                out,
                model=model,
                profiler=not args.no_profiler,
                with_stack=args.with_stack,
                overwrite=args.overwrite,  # checked above; record() checks again, under its lock
                gpu_memory=budget,
            ) as recording,
            press_context,
        ):
            bar = generate_bar(args.new_tokens, args.beams, getattr(args, "quiet", False))
            if bar is not None:
                extra["streamer"] = bar
            generating = time.perf_counter()
            try:
                generated = model.generate(
                    input_ids,
                    attention_mask=mask,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    num_beams=args.beams,
                    pad_token_id=pad_id,
                    **extra,
                )
            finally:
                if bar is not None:
                    bar.close()
            generate_s = time.perf_counter() - generating
        elapsed = time.perf_counter() - started
        new_tokens = (generated.shape[1] - input_ids.shape[1]) * generated.shape[0]
        for note in recording.notes:
            print(f"  note: {note}")
        # The rate is generate()'s alone: the recording's start-up and the trace's writing, in the elapsed
        # time, are no part of generating. Under beam search every beam's tokens, as `kvtrace compare` counts
        # its rows (the returned sequences are fewer)
        beams = args.beams if args.beams > 1 else 1
        rows = f"all {generated.shape[0] * beams} rows, {beams} beams a prompt" if beams > 1 else "all rows"
        # The time base said: `kvtrace compare` times the same run from the recorder's start sample to its
        # last step's end, so its tokens/s differs a little (96.4 where this said 96.3)
        print(
            f"recorded {recording.event_count} KV events in {elapsed:.2f} s (generate() {generate_s:.2f} s, "
            f"{new_tokens * beams / generate_s:.1f} tokens/s over the whole generate() call, {rows}) -> "
            f"{out}/"
        )
        print(f"  sample output: {tokenizer.decode(generated[0, input_ids.shape[1] :].tolist())[:60]!r}")
        if args.no_report:
            return 0
        from kvtrace.commands.report import ReportCommand

        html = out / "timeline.html"
        report = ReportCommand()
        status = report.run(
            argparse.Namespace(
                path=str(out),
                output=str(html),
                json=False,
                quiet=getattr(args, "quiet", False),
                no_export=False,
            )
        )
        print(f"open: {html}   |   tensorboard --logdir {shell_arg(out)}")
        crossing = getattr(report, "last_report", None)
        if crossing is not None and crossing.budget is not None and crossing.budget["crossed"]:
            print(
                f"why it would run out on {gpu_memory}, and what each remedy buys: "
                f"kvtrace diagnose {shell_arg(out)}"
            )
        return status


def _prompts(
    args: argparse.Namespace, press: Any, tokenizer: Any, built_in: tuple[str, ...]
) -> tuple[list[str], str]:
    """The prompts, and a note when the built-in ones were lengthened. A press that scores with the last
    tokens of its prefill's query (kvpress's SnapKV: 64) asserts the query is longer, which the built-in
    prompts (about 20 tokens) are not: each is followed by the next ones until it is; a --prompt too short
    is refused, naming the length it needs, before the model is built."""
    if press is None:
        return list(args.prompt or built_in), ""
    from kvtrace.integrations.presses import query_window

    window = query_window(press)
    if window is None:
        return list(args.prompt or built_in), ""
    needed = window + 1  # the query: the ids generate() feeds at prefill, the BOS token included

    def length(prompt: str) -> int:
        return len(tokenizer.encode(prompt, bos=True, eos=False))

    if args.prompt:
        longest = max(map(length, args.prompt))
        if longest < needed:
            raise KvtraceError(
                f"--press {args.press} scores with the prompt's last {window} tokens, so it needs a prompt "
                f"of at least {needed} tokens (the BOS token included); the longest --prompt has {longest}: "
                "pass a longer --prompt, or none for built-in ones long enough"
            )
        return list(args.prompt), ""
    prompts = []
    for first in range(len(built_in)):
        prompt, following = built_in[first], first + 1
        while length(prompt) < needed:
            prompt += " " + built_in[following % len(built_in)]
            following += 1
        prompts.append(prompt)
    note = (
        f"--press {args.press} scores with the prompt's last {window} tokens: each built-in prompt is "
        f"followed by the next ones until it has at least {needed} tokens"
    )
    return prompts, note


def window_refusal(window: int) -> str:
    """Why `--window` is refused below `MIN_WINDOW` (transformers' sliding cache would keep every token)."""
    from kvtrace.llama import MIN_WINDOW

    return (
        f"--window must be at least {MIN_WINDOW}, got {window}: transformers' sliding cache keeps every "
        "token at a window of 1"
    )


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse values out of range and flags that would do nothing with the others given (a window without
    a sliding cache, a compression without a press, stacks without the profiler, more prompts than rows)."""
    from kvtrace.llama import MIN_WINDOW

    for flag in ("batch", "new_tokens", "beams"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise KvtraceError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.window is not None and args.window < MIN_WINDOW:
        raise KvtraceError(window_refusal(args.window))
    if args.window is not None and args.cache not in ("sliding", "static_sliding"):
        raise KvtraceError(f"--window applies to --cache sliding or static_sliding, not {args.cache}")
    if args.compression is not None:
        if args.press is None:
            raise KvtraceError("--compression applies with --press")
        if not 0 <= args.compression < 1:
            raise KvtraceError(f"--compression must be in [0, 1), got {args.compression}")
    if args.with_stack and args.no_profiler:
        raise KvtraceError("--with-stack adds stacks to the profiler trace: drop --no-profiler")
    if args.prompt and len(args.prompt) > args.batch:
        raise KvtraceError(
            f"{len(args.prompt)} prompts for --batch {args.batch}: one row per prompt, give --batch "
            f"{len(args.prompt)}"
        )
