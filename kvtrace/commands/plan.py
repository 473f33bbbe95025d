"""`kvtrace plan`: the capacity planner's command line. The arithmetic lives in `analyzers.planning.plan`."""

from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation

from kvtrace.commands.base import Command
from kvtrace.commands.output import print_result
from kvtrace.errors import KvtraceError

DTYPES = ("bf16", "fp16", "fp32", "fp8", "int8", "int4")
CACHES = ("dynamic", "static", "sliding", "quantized")


def parse_reserve(text: str) -> tuple[int | None, float | None]:
    """(bytes, fraction) from --reserve: a plain number below 1 is a fraction of the GPU ("0.1"), anything
    else a size ("2GiB", "1.5e9"). Fractions are the common case, and nobody reserves less than one byte."""
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        number = None
    if number is not None and number.is_finite() and 0 <= number < 1:
        return None, float(number)
    from analyzers.planning.plan import parse_size

    return parse_size(text), None


class PlanCommand(Command):
    """Plan GPU memory: will a model's weights and KV cache fit at this batch and context?

    Pure arithmetic from the model geometry (a --preset or a local config.json): nothing is loaded, no GPU
    is needed. Exit status: 0 when the plan fits, 1 when it does not, 2 for bad input (like grep and diff),
    so a launch script can run `kvtrace plan ... && serve ...`; the plan is printed either way.
    """

    name = "plan"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        model = parser.add_mutually_exclusive_group(required=True)
        model.add_argument("--preset", metavar="NAME", help="built-in model, e.g. llama-3-8b, llama-3.1-70b")
        model.add_argument(
            "--config", metavar="PATH", help="a local Hugging Face config.json (or its folder)"
        )
        parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="weights dtype (default bf16)")
        parser.add_argument(
            "--kv-dtype",
            choices=DTYPES,
            help="KV cache dtype (default: --dtype; int4 with --cache quantized, as transformers' default)",
        )
        parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
        parser.add_argument(
            "--context",
            type=int,
            default=8192,
            help="tokens per sequence, prompt plus output (default 8192, Llama 3's native length)",
        )
        parser.add_argument(
            "--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 24GB (default 80GiB)"
        )
        parser.add_argument(
            "--reserve",
            default="0.1",
            help="memory kept out of the plan for CUDA context, activations and fragmentation: a fraction "
            "of the GPU below 1 (default 0.1, like vLLM's 0.9 utilization) or a size such as 2GiB",
        )
        parser.add_argument(
            "--cache", default="dynamic", choices=CACHES, help="transformers cache kind (default dynamic)"
        )
        parser.add_argument("--window", type=int, help="tokens a sliding cache keeps (sliding only)")
        parser.add_argument(
            "--block-size", type=int, default=16, help="tokens per paged KV block (default 16)"
        )
        parser.add_argument("--json", action="store_true", help="print the plan as JSON")

    def run(self, args: argparse.Namespace) -> int:
        from analyzers.planning.plan import PlanRequest, format_text, parse_size, plan, to_json
        from analyzers.planning.presets import geometry_from_config, get_preset

        geometry = get_preset(args.preset) if args.preset is not None else geometry_from_config(args.config)
        kv_dtype = args.kv_dtype or ("int4" if args.cache == "quantized" else args.dtype)
        reserve_bytes, reserve_fraction = parse_reserve(args.reserve)
        if args.batch < 1 or args.context < 1:
            raise KvtraceError("--batch and --context must be at least 1")
        request = PlanRequest(
            geometry=geometry,
            weights_dtype=args.dtype,
            kv_dtype=kv_dtype,
            batch=args.batch,
            context=args.context,
            gpu_memory_bytes=parse_size(args.gpu_memory),
            reserve_bytes=reserve_bytes,
            reserve_fraction=reserve_fraction,
            cache=args.cache,
            window=args.window,
            block_size=args.block_size,
        )
        result = plan(request)
        print_result(args.json, lambda: to_json(result), lambda: format_text(result))
        return 0 if result.fits else 1
