"""`kvtrace diagnose`: why a run ran out of memory, and what each remedy would buy on it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtrace.commands.base import Command, add_gpu_memory, gpu_memory_flag, require_input
from kvtrace.commands.output import print_result, said_unreadable
from kvtrace.commands.progress import reading
from kvtrace.errors import KvtraceError, printable, short_error
from kvtrace.run_layout import is_run_group

if TYPE_CHECKING:
    from analyzers.planning.engine_run_diagnosis import EngineRunDiagnosis


class DiagnoseCommand(Command):
    """Explain an OOM (or the peak) and price each remedy on this run.

    PATH is a kvtrace run directory, a CUDA allocator snapshot pickle or a Chrome trace. Finds the OOM
    (the snapshot's `oom` entry, the run's recorded exception) or, without one, the peak; prints the
    failing request, allocated/reserved/free memory, fragmentation, the KV share by layer and step, the
    top stacks, then remedies ranked by the bytes each frees here. For a run group (one run per rank),
    diagnoses the rank that ran out, else the first that failed, else the one that peaked, and says which.
    Exit status: 0; 1 when standard output cannot be written (a full disk); 2 for bad input, a run group's
    unreadable rank included (the others are diagnosed, and its error follows on stderr).
    """

    name = "diagnose"
    examples = (
        "kvtrace diagnose runs/oom",
        "kvtrace diagnose runs/demo-dynamic --gpu-memory 24GiB --json",
    )
    defers_numpy = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "path", metavar="PATH", help="run directory, run group, snapshot pickle or Chrome trace"
        )
        parser.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        add_gpu_memory(
            parser,
            "price remedies against this memory budget when there is no OOM, e.g. 80GiB, or a GPU's name "
            "(H100, A100-40GB, L4: the total nvidia-smi shows for it); --budget is another name for it",
            dest="budget",
        )

    def run(self, args: argparse.Namespace) -> int:
        from analyzers.planning.diagnose import diagnose
        from analyzers.planning.size_text import parse_device_memory
        from analyzers.render.diagnosis import diagnosis_to_json, diagnosis_to_text
        from analyzers.report import build_report

        path = Path(args.path)
        require_input(path)
        budget = (
            parse_device_memory(args.budget, gpu_memory_flag(args, "budget"))
            if args.budget is not None
            else None
        )
        if is_run_group(path):
            return self._run_group(path, args.json, budget, args.quiet)
        if path.is_dir() and _diagnose_engine_run(path, args.json, budget):
            return 0
        with reading(f"reading {path.name}", args.quiet) as update:
            source, report = build_report(path, progress=update)
        if not report.devices and not source.ooms:
            if source.kind == "run":  # recorded with kvtrace.record() already: say what it lacks
                raise KvtraceError(f"{path}: no memory figures to diagnose: {_empty_run_cause(source.meta)}")
            raise KvtraceError(
                f"{path}: no memory events to diagnose (profile with torch.profiler(profile_memory=True), or "
                "record the run with kvtrace.record())"
            )
        diagnosis = diagnose(source, report, budget_bytes=budget)
        print_result(args.json, lambda: diagnosis_to_json(diagnosis), lambda: diagnosis_to_text(diagnosis))
        return 0

    @staticmethod
    def _run_group(path: Path, as_json: bool, budget: int | None, quiet: bool) -> int:
        """A run group: the rank that ran out, else the first that failed, else the one that peaked."""
        from analyzers.group import build_group_report
        from analyzers.group_budget import budget_focus
        from analyzers.planning.diagnose import diagnose
        from analyzers.render.group import group_diagnosis_to_json, group_diagnosis_to_text

        with reading(f"reading {path.name}", quiet) as update:
            group = build_group_report(path, progress=update)
        if budget is not None:  # the budget given, not the recorded one: each rank that would run out
            group = budget_focus(group, budget)
        focus = group.rank(group.focus_rank)
        if not focus.report.devices and not focus.source.ooms:  # no rank has figures (the focus would)
            said_unreadable("diagnose", group.unreadable)  # the ranks that may have had them
            raise KvtraceError(
                f"{path}: no rank has memory figures to diagnose; rank {focus.rank}, which "
                f"{group.focus_reason}: {_empty_run_cause(focus.source.meta)}"
            )
        diagnosis = diagnose(focus.source, focus.report, budget_bytes=budget)
        print_result(
            as_json,
            lambda: group_diagnosis_to_json(group, diagnosis),
            lambda: group_diagnosis_to_text(group, diagnosis),
        )
        return said_unreadable("diagnose", group.unreadable)


def _empty_run_cause(meta: dict[str, Any]) -> str:
    """Why a kvtrace run has no device figures: nothing it recorded names a byte, and how its block ended."""
    ended = (meta.get("manifest") or {}).get("ended") or {}
    raised = ""
    if ended.get("status") in ("exception", "interrupted"):
        raised = f" (its block raised {ended.get('type') or 'an exception'})"
    return f"the run recorded no allocator event, no weights (record(model=...) lists them) and no KV{raised}"


def _diagnose_engine_run(path: Path, as_json: bool, budget: int | None = None) -> bool:
    """An engine run (vLLM, transformers' continuous batching): its engine diagnosis, priced in its own knobs
    (analyzers.planning.vllm_diagnose), after the memory budget (`budget`, else the recorded one) when there
    is one (analyzers.planning.engine_budget). False when the run has no engine."""
    from analyzers.planning.engine_run_diagnosis import ended_notes, explain_engine_run, stopped_short
    from analyzers.readers.engine_files import read_engine
    from analyzers.render.engine_run_diagnosis import engine_run_diagnosis_to_json
    from analyzers.render.vllm_diagnosis import vllm_diagnosis_to_text
    from kvtrace.run_lock import holder

    run = read_engine(path)
    if run is None:
        return False
    manifest = _manifest(path)
    # A run that stopped short (killed, raised, still recorded) is said so, as the report says it
    recording = holder(path) if stopped_short(manifest) == "died" else None
    stopped = stopped_short(manifest, recording)
    raised = list(ended_notes(manifest, recording))
    checked = _budget_of_engine(path, run, manifest, budget)
    if run.info.name != "vllm" and run.info.status in ("ok", "failed"):
        if run.requests_missing is not None:
            raised.append(run.requests_missing)
        _other_engine(run, as_json, checked, raised, stopped)  # vLLM's remedies are priced in vLLM's knobs
        return True
    # The report page and the TensorBoard tab explain the run by the same choice and JSON
    explained = explain_engine_run(run, checked, tuple(raised), stopped)  # remedies must fit the budget too
    diagnosis = explained.diagnosis
    if diagnosis is None:  # the pool held every request: transformers' remedies (context, batch) do not apply
        _engine_ran_fine(explained, as_json)
        return True
    budget_lines = _budget_text(run.path, checked, explained.name)
    text = vllm_diagnosis_to_text(diagnosis)
    if budget_lines:  # the budget heads the diagnosis; the engine's own follows
        text = "  " + text.removeprefix(f"kvtrace diagnose: {run.path}: ")
    print_result(
        as_json,
        lambda: engine_run_diagnosis_to_json(explained),
        lambda: "\n".join([*budget_lines, text, *_notes_text(raised)]),
    )
    return True


def _manifest(path: Path) -> dict[str, Any]:
    """The run's manifest.json, {} when there is none (the engine files are read on their own). One that is
    there but damaged is refused as `report` refuses it: read as {}, a killed run was diagnosed as one that
    ran fine and its recorded budget was dropped; a pipe or device in its place was read without end."""
    import os

    from kvtrace.format import MANIFEST
    from kvtrace.json_reads import read_json_file

    manifest_path = path / MANIFEST
    if not os.path.lexists(manifest_path):
        return {}
    manifest = read_json_file(manifest_path, "corrupt manifest", encoding="utf-8-sig")
    if not isinstance(manifest, dict):
        raise KvtraceError(f"{manifest_path}: not a kvtrace manifest")
    return manifest


def _budget_of_engine(path: Path, run: Any, manifest: dict[str, Any], budget: int | None) -> Any:
    """The engine's pool against the memory budget (`budget`, else the one recorded): an EngineBudget, None
    without a budget or a pool."""
    from analyzers.planning.engine_budget import run_engine_budget

    recorded = (manifest.get("options") or {}).get("gpu_memory")
    recorded_bytes = recorded if isinstance(recorded, int | float) and not isinstance(recorded, bool) else 0
    if budget is None and recorded_bytes <= 0:  # no budget, given or recorded
        return None
    if run.info.status not in ("ok", "failed") or not run.info.kv_cache_bytes:
        return None
    from analyzers.report import build_report

    source, report = build_report(path)
    crossing = report.budget
    if budget is not None:
        from analyzers.budget import budget_crossing
        from analyzers.engine_report import bytes_before_trace

        unseen = bytes_before_trace(source, report.devices)
        crossing = budget_crossing(source, report.timelines, budget, unseen).to_json()
    return run_engine_budget(run, crossing, manifest)


def _budget_text(path: str, checked: Any, name: str) -> list[str]:
    """The budget's lines, first line headed as the diagnosis is ([] without a budget)."""
    if checked is None:
        return []
    from analyzers.render.engine_budget import engine_budget_lines

    lines = engine_budget_lines(checked, name)
    return [f"kvtrace diagnose: {path}: {lines[0]}", *lines[1:]]


def _notes_text(notes: list[str]) -> list[str]:
    return [f"  note: {printable(note)}" for note in notes]


def _ran_out_sentence(name: str, failure: dict[str, Any], block_size: int | None, preemptions: int) -> str:
    """transformers' scheduler could place no request in the pool and failed the run: the request that
    outgrew it, what it needed against the usable blocks, and the requests that failed with it."""
    needed, usable = failure.get("blocks_needed"), failure.get("usable_blocks")
    requests = list(failure.get("requests") or ())
    taken = f" (after taking {preemptions} request(s) out)" if preemptions else ""
    return (
        f"{name} ran out of its pool and failed the run at engine step {failure.get('step')}{taken}: request "
        f"{failure.get('request')} needed {needed} blocks of {block_size} tokens and {usable} are usable; "
        f"{len(requests)} request(s) failed ({', '.join(map(str, requests[:5]))}"
        f"{', ...' if len(requests) > 5 else ''}). ContinuousBatchingConfig(num_blocks=...) counts usable "
        f"blocks: at least {needed} to schedule it, more for the tokens it has yet to generate."
    )


def _failed_phrase(failed: tuple[tuple[str, str | None], ...], failure: dict[str, Any] | None) -> str:
    """The requests transformers failed that the sentence has not named: those its loop's stop on an error
    failed (engine.json's `failure`, a forward that raised; a pool that ran out says its own), and those it
    failed on their own while the run went on (a `generate_batch` that returns: its block ends `ok`)."""
    if not failed:
        return ""
    with_run = set(failure.get("requests") or ()) if failure is not None else set()
    stopped = [(rid, error) for rid, error in failed if rid in with_run]
    alone = [(rid, error) for rid, error in failed if rid not in with_run]
    phrase = ""
    if stopped and failure is not None and failure.get("reason") != "no_blocks":
        error = next((e for _, e in stopped if e), None)
        phrase += (
            f" transformers failed the run at engine step {failure.get('step')}"
            f"{f' ({short_error(error)})' if error else ''}: {len(stopped)} request(s) failed ("
            f"{', '.join(rid for rid, _ in stopped[:5])}{', ...' if len(stopped) > 5 else ''})."
        )
    if alone:
        named = "; ".join(f"{rid}{f' ({short_error(error)})' if error else ''}" for rid, error in alone[:3])
        phrase += (
            f" {len(alone)} request(s) failed on their own and the run went on: {named}"
            f"{f'; and {len(alone) - 3} more' if len(alone) > 3 else ''} (engine_requests.jsonl lists each)."
        )
    return phrase


def _other_engine(
    run: Any,
    as_json: bool,
    checked: Any = None,
    raised: list[str] | None = None,
    stopped: str | None = None,
) -> None:
    """Another engine's paged pool (transformers' continuous batching): what ran out and the requests'
    demand in its blocks, without vLLM's knobs (kv_cache_memory_bytes, max_num_seqs, fp8); first, a memory
    budget the run crossed, priced in num_blocks and max_memory_percent. `stopped`: how the run stopped
    short (`stopped_short`): requests it left in the engine make the demand a lower bound, unless each is
    counted at its max_tokens (analyzers.planning.unfinished_asks)."""
    from analyzers.engine import engine_figures
    from analyzers.planning.engine_run_diagnosis import unfinished_at_stop
    from analyzers.planning.vllm_diagnose import diagnose_preemptions
    from analyzers.render.engine import peak_when
    from analyzers.render.engine_run_diagnosis import with_budget

    raised = raised or []
    figures = engine_figures(run)
    usable = max((figures.num_blocks or 0) - figures.blocks_reserved, 0)
    name = f"{figures.name} {figures.version}".strip()
    peak = f"peak {figures.peak_blocks_used:,} of {usable:,} usable blocks at {peak_when(figures)}"
    result: dict[str, Any] = {"kind": "no_preemption", "path": run.path, "engine": figures.name}
    result.update(
        num_blocks=figures.num_blocks, usable_blocks=usable, peak_blocks_used=figures.peak_blocks_used
    )
    over = checked is not None and checked.crossed
    failure = run.info.failure
    # A run transformers failed on an error other than its pool's (a forward that raised) did run out of
    # something, maybe memory: "nothing ran out" is not said of it
    raised_in_run = failure is not None and failure.get("reason") != "no_blocks"
    result["failed_requests"] = [rid for rid, _ in figures.failed_requests]
    left = unfinished_at_stop(run, stopped)
    result["unfinished_requests"] = left.requests if left is not None else 0
    if failure is not None and failure.get("reason") == "no_blocks":
        sentence = _ran_out_sentence(name, failure, figures.block_size, figures.preemptions)
        result.update(
            kind="failed_no_blocks", failed_step=failure.get("step"), failed_request=failure.get("request")
        )
        result.update(blocks_needed=failure.get("blocks_needed"), failed_requests=failure.get("requests"))
    elif figures.peak_step is None:
        sentence = (
            f"{name} ran no engine step: the run ended before its first step, with its pool made "
            f"({usable:,} usable blocks, none used)."
        )
    elif figures.first_preemption_step is None and left is not None:
        # the requests stopped short of their final lengths: whether the pool would have held them is unknown
        sentence = (
            f"{name} took no request out of its pool before the run stopped, with {left.clause()}: whether "
            f"the pool would have sufficed cannot be told from this run ({peak})."
        )
    elif figures.first_preemption_step is None:
        ran_out = "" if over or raised_in_run else ": nothing ran out"
        sentence = f"{name} took no request out of its pool{ran_out} ({peak})."
    elif run.requests_missing is not None:  # the demand is priced on the requests' lengths: unknown
        result.update(kind="preemption", preemptions=figures.preemptions, demand_blocks=None)
        result.update(first_preemption_step=figures.first_preemption_step)
        sentence = (
            f"{name} took {figures.preemptions} request(s) out of its pool (first at step "
            f"{figures.first_preemption_step}); {peak}. Without its request log, the blocks the requests "
            "would have needed cannot be told from this run."
        )
    else:
        preempting = diagnose_preemptions(run)
        demand = preempting.demand_bound_blocks
        result.update(kind="preemption", preemptions=figures.preemptions, demand_blocks=demand)
        result.update(first_preemption_step=figures.first_preemption_step)
        sentence = (
            f"{name} took {figures.preemptions} request(s) out of its pool (first at step "
            f"{figures.first_preemption_step}), {figures.preempted_tokens:,} KV tokens dropped, "
            f"{figures.recomputed_tokens:,} recomputed; {peak}."
        )
        if left is not None and preempting.asked_requests < left.requests:
            # counted at the lengths they had reached: their final demand is larger, by how much is unknown
            knob = "ContinuousBatchingConfig(num_blocks=...)" if figures.name == "transformers-cb" else "pool"
            sentence += (
                f" The run stopped with {left.clause()}, counted at the lengths they had reached: had none "
                f"been taken out, the requests would have needed at least {demand:,} blocks of "
                f"{figures.block_size} tokens, maybe more at their final lengths, so the {knob} that avoids "
                "every preemption cannot be told from this run; rerun to completion to know."
            )
        else:
            if left is not None:  # each counted at its max_tokens: the most it may reach
                asked = "max_new_tokens" if figures.name == "transformers-cb" else "max_tokens"
                sentence += (
                    f" The run stopped with {left.clause()}, each counted at its {asked} (prompt + "
                    f"{asked} - 1 tokens, the most it may reach)."
                )
            sentence += (
                f" Had none been taken out, the requests would have needed at most {demand:,} blocks of "
                f"{figures.block_size} tokens"
            )
            if figures.name == "transformers-cb":
                sentence += f" (ContinuousBatchingConfig(num_blocks={demand}) counts usable blocks alike)"
            sentence += "."
    sentence += _failed_phrase(figures.failed_requests, failure)
    result["sentence"] = sentence
    with_budget(result, checked, tuple(raised))
    budget_lines = _budget_text(run.path, checked, name)
    text = (
        [*budget_lines, f"  {sentence}"]
        if budget_lines
        else [f"kvtrace diagnose: {printable(str(run.path))}: {sentence}"]
    )
    print_result(as_json, lambda: result, lambda: "\n".join(text + _notes_text(raised)))


def _engine_ran_fine(explained: EngineRunDiagnosis, as_json: bool) -> None:
    """A vLLM run that neither preempted nor was refused (analyzers.render.vllm_diagnosis.ran_fine_to_json),
    after the budget's lines when there is one."""
    from analyzers.render.engine_run_diagnosis import engine_run_diagnosis_to_json

    result = engine_run_diagnosis_to_json(explained)
    assert result is not None  # priced: explain_engine_run raises where it cannot be
    run, checked = explained.run, explained.budget
    budget_lines = _budget_text(run.path, checked, explained.name)
    sentence = result["sentence"]
    text = (
        [*budget_lines, f"  {sentence}"]
        if budget_lines
        else [f"kvtrace diagnose: {printable(str(run.path))}: {sentence}"]
    )
    print_result(as_json, lambda: result, lambda: "\n".join(text + _notes_text(list(explained.notes))))
