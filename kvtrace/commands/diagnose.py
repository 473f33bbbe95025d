"""`kvtrace diagnose`: why a run ran out of memory, and what each remedy would buy on it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvtrace.commands.base import Command, require_input
from kvtrace.commands.output import print_result
from kvtrace.errors import KvtraceError
from kvtrace.format import is_run_group


class DiagnoseCommand(Command):
    """Explain an OOM (or the peak) and price each remedy on this run.

    PATH is a kvtrace run directory, a CUDA allocator snapshot pickle or a Chrome trace. Finds the OOM
    (the snapshot's `oom` entry, the run's recorded exception) or, without one, the peak; prints the
    failing request, allocated/reserved/free memory, fragmentation, the KV share by layer and step, the
    top stacks, then remedies ranked by the bytes each frees here. For a run group (one run per rank),
    diagnoses the rank that ran out, else the first that failed, else the one that peaked, and says which.
    Exit status: 0, or 2 for bad input.
    """

    name = "diagnose"
    defers_numpy = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("path", help="run directory, run group, snapshot pickle or Chrome trace")
        parser.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
        parser.add_argument(
            "--budget", help="price remedies against this memory budget when there is no OOM, e.g. 80GiB"
        )

    def run(self, args: argparse.Namespace) -> int:
        from analyzers.planning.diagnose import diagnose
        from analyzers.planning.plan import parse_size
        from analyzers.render.diagnosis import diagnosis_to_json, diagnosis_to_text
        from analyzers.report import build_report

        path = Path(args.path)
        require_input(path)
        budget = parse_size(args.budget, "--budget", positive=True) if args.budget is not None else None
        if is_run_group(path):
            return self._run_group(path, args.json, budget)
        if budget is None and path.is_dir() and _diagnose_engine_run(path, args.json):
            return 0
        source, report = build_report(path)
        if not report.devices and not source.ooms:
            raise KvtraceError(
                f"{path}: no memory events to diagnose (profile with torch.profiler(profile_memory=True), or "
                "record the run with kvtrace.record())"
            )
        diagnosis = diagnose(source, report, budget_bytes=budget)
        print_result(args.json, lambda: diagnosis_to_json(diagnosis), lambda: diagnosis_to_text(diagnosis))
        return 0

    @staticmethod
    def _run_group(path: Path, as_json: bool, budget: int | None) -> int:
        """A run group: the rank that ran out, else the first that failed, else the one that peaked."""
        from analyzers.group import build_group_report
        from analyzers.planning.diagnose import diagnose
        from analyzers.render.group import group_diagnosis_to_json, group_diagnosis_to_text

        group = build_group_report(path)
        focus = group.rank(group.focus_rank)
        diagnosis = diagnose(focus.source, focus.report, budget_bytes=budget)
        print_result(
            as_json,
            lambda: group_diagnosis_to_json(group, diagnosis),
            lambda: group_diagnosis_to_text(group, diagnosis),
        )
        return 0


def _diagnose_engine_run(path: Path, as_json: bool) -> bool:
    """A vLLM run that preempted or was refused at start: its engine diagnosis, priced in vLLM's knobs
    (analyzers.planning.vllm_diagnose). False when the run has no engine, or nothing engine-specific."""
    from analyzers.engine import read_engine
    from analyzers.planning.vllm_diagnose import diagnose_engine
    from analyzers.render.vllm_diagnosis import vllm_diagnosis_to_json, vllm_diagnosis_to_text

    run = read_engine(path)
    if run is None:
        return False
    if run.info.name != "vllm" and run.info.status == "ok":
        _other_engine(run, as_json)  # vLLM's remedies are priced in vLLM's knobs
        return True
    diagnosis = diagnose_engine(run)
    if diagnosis is None:  # the pool held every request: transformers' remedies (context, batch) do not apply
        _engine_ran_fine(run, as_json)
        return True
    print_result(
        as_json, lambda: vllm_diagnosis_to_json(diagnosis), lambda: vllm_diagnosis_to_text(diagnosis)
    )
    return True


def _other_engine(run: Any, as_json: bool) -> None:
    """Another engine's paged pool (transformers' continuous batching): what ran out and the requests'
    demand in its blocks, without vLLM's knobs (kv_cache_memory_bytes, max_num_seqs, fp8)."""
    from analyzers.engine import engine_figures
    from analyzers.planning.vllm_diagnose import diagnose_preemptions

    figures = engine_figures(run)
    usable = max((figures.num_blocks or 0) - figures.blocks_reserved, 0)
    name = f"{figures.name} {figures.version}".strip()
    peak = f"peak {figures.peak_blocks_used:,} of {usable:,} usable blocks at step {figures.peak_step}"
    result: dict[str, Any] = {"kind": "no_preemption", "path": run.path, "engine": figures.name}
    result.update(
        num_blocks=figures.num_blocks, usable_blocks=usable, peak_blocks_used=figures.peak_blocks_used
    )
    if figures.first_preemption_step is None:
        sentence = f"{name} took no request out of its pool: nothing ran out ({peak})."
    else:
        demand = diagnose_preemptions(run).demand_bound_blocks
        result.update(kind="preemption", preemptions=figures.preemptions, demand_blocks=demand)
        result.update(first_preemption_step=figures.first_preemption_step)
        sentence = (
            f"{name} took {figures.preemptions} request(s) out of its pool (first at step "
            f"{figures.first_preemption_step}), {figures.preempted_tokens:,} KV tokens dropped, "
            f"{figures.recomputed_tokens:,} recomputed; {peak}. Had none been taken out, the requests would "
            f"have needed at most {demand:,} blocks of {figures.block_size} tokens"
        )
        if figures.name == "transformers-cb":
            sentence += f" (ContinuousBatchingConfig(num_blocks={demand}) counts usable blocks alike)"
        sentence += "."
    result["sentence"] = sentence
    print_result(as_json, lambda: result, lambda: f"kvtrace diagnose: {run.path}: {sentence}")


def _engine_ran_fine(run: Any, as_json: bool) -> None:
    """A vLLM run that neither preempted nor was refused: nothing ran out. Its pool was allocated at start,
    so a shorter context or a smaller batch would not have changed its size."""
    from analyzers.engine import engine_figures
    from analyzers.planning.vllm_diagnose import NULL_BLOCKS

    figures = engine_figures(run)
    usable = max((figures.num_blocks or 0) - NULL_BLOCKS, 0)
    share = f" ({100 * figures.peak_blocks_used / usable:.0f}% of the {usable:,} usable)" if usable else ""
    sentence = (
        f"vLLM preempted nothing and started normally: nothing ran out. Peak {figures.peak_blocks_used:,} "
        f"blocks used{share} at step {figures.peak_step}; the pool is allocated at start, so context and "
        f"batch do not change its size (size one: kvtrace plan --engine vllm --from-run {run.path})."
    )
    print_result(
        as_json,
        lambda: {
            "kind": "no_preemption",
            "path": run.path,
            "num_blocks": figures.num_blocks,
            "usable_blocks": usable,
            "peak_blocks_used": figures.peak_blocks_used,
            "peak_step": figures.peak_step,
            "sentence": sentence,
        },
        lambda: f"kvtrace diagnose: {run.path}: {sentence}",
    )
