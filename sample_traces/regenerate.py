"""Regenerates kvtrace's own sample runs and the report screenshot in this folder.

    python sample_traces/regenerate.py                  # ~1 minute on 2 CPU cores
    python sample_traces/regenerate.py static_b2        # one run; --no-screenshot: leave the PNG alone

Each run: the tiny Llama 3 demo model (random weights, real Llama 3 tokenizer), batch 2 left-padded,
16 new tokens, float32, torch.profiler with memory events (trace gzipped). The screenshot is the
`kvtrace report -o` HTML of the sliding-window run, taken by headless Chromium.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {"dynamic_b2": "dynamic", "sliding_b2": "sliding", "static_b2": "static"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Arguments are read before anything is recorded: `--help` or a typo must not re-record the runs."""
    parser = argparse.ArgumentParser(
        prog="regenerate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", metavar="RUN", help=f"of {', '.join(RUNS)} (default: all)")
    parser.add_argument("--no-screenshot", action="store_true", help="do not retake report_screenshot.png")
    args = parser.parse_args(argv)
    unknown = [run for run in args.runs if run not in RUNS]
    if unknown:
        parser.error(f"unknown run {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch

    import kvtrace
    from kvtrace.cli import main as cli
    from kvtrace.llama import DEFAULT_PROMPTS, build_model, encode_batch, llama3_tokenizer, make_cache

    tokenizer = llama3_tokenizer()
    for name, kind in RUNS.items():
        if args.runs and name not in args.runs:
            continue
        model = build_model("tiny")
        ids, mask = encode_batch(tokenizer, list(DEFAULT_PROMPTS[:2]), model.config.pad_token_id)
        cache, extra = make_cache(kind, model, 2, ids.shape[1] + 16, window=16)
        if cache is not None:
            extra["cache"] = cache
        out = HERE / name
        with torch.no_grad(), kvtrace.record(out, model=model, gzip_trace=True, overwrite=True):
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=16,
                min_new_tokens=16,
                do_sample=False,
                pad_token_id=model.config.pad_token_id,
                **extra,
            )
        traces = sorted((out / "profiler").glob("*.pt.trace.json.gz"))
        for old in traces[:-1]:
            old.unlink()
        print(f"recorded {out}")
    if shutil.which("chromium") and not args.no_screenshot:
        with tempfile.TemporaryDirectory() as tmp:
            html = Path(tmp) / "timeline.html"
            cli(["report", str(HERE / "sliding_b2"), "-o", str(html), "-q", "--no-export"])
            subprocess.run(
                [
                    "chromium",
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--window-size=1400,1100",
                    "--virtual-time-budget=5000",
                    f"--screenshot={HERE / 'report_screenshot.png'}",
                    html.as_uri(),
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        print(f"wrote {HERE / 'report_screenshot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
