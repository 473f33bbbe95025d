"""A run that ran out of memory (or was interrupted) part-way through its `generate()` is planned as the user
launched it: the recorder notes the length each call was asked to reach (its prefill sample's `max_length`,
read once as the call begins, as transformers resolves it), and `plan --from-run` plans that context, not
the tokens the run reached before it stopped. A whole run is planned at what it reached, as before."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import HEAD_DIM, killed_mid_step_script, raising_before_layer, tiny_size

LAYERS, KV_HEADS, ROWS, PROMPT = 2, 2, 2, 8
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB"


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(tiny_size(LAYERS, KV_HEADS)).eval()


@pytest.fixture(autouse=True)
def watched(model: Any, watched_models: list[torch.nn.Module]) -> Iterator[None]:
    watched_models.append(model)  # the leak guard checks it after each test
    yield


def _ids(rows: int = ROWS, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 1000, (rows, PROMPT), generator=torch.Generator().manual_seed(seed))


def _greedy(**length: int) -> GenerationConfig:
    return GenerationConfig(do_sample=False, pad_token_id=0, **length)


def _prefill_sample(run: Path) -> dict[str, Any]:
    samples = [json.loads(line) for line in (run / "memory_samples.jsonl").read_text().splitlines()]
    (prefill,) = [sample for sample in samples if sample["phase"] == "prefill"]
    return prefill


def _plan(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["plan", "--from-run", str(run), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _record_raising(model: Any, run: Path, error: BaseException, forward: int, **asked: Any) -> None:
    """Record a greedy generate() asked for a length by `asked`, whose `forward`-th forward (1: the prefill)
    raises `error` as its second decoder layer begins, so layer 0 has written that step's token."""
    ids = _ids()
    with (
        raising_before_layer(model, error, forward, 1),
        pytest.raises(type(error)),
        torch.no_grad(),
        kvtrace.record(run, model=model, profiler=False),
    ):
        model.generate(ids, attention_mask=torch.ones_like(ids), **asked)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (torch.OutOfMemoryError(OOM_MESSAGE), "ran out of memory"),
        (KeyboardInterrupt(), "was interrupted (Ctrl-C)"),
    ],
    ids=["oom", "ctrl-c"],
)
def test_a_run_that_stopped_mid_decode_is_planned_at_the_length_its_call_asked_for(
    model: Any, error: BaseException, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a greedy generate() of max_new_tokens=40 whose fifth forward raises inside its decoder layers:
    # steps 1-4 ended, 4 tokens a row yielded, a context of 8 + 4 reached
    run, new, raised_at = tmp_path / "run", 40, 5
    asked = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    _record_raising(model, run, error, raised_at, **asked)
    reached = PROMPT + raised_at - 1
    # THEN the recorder noted the call's request in its prefill sample
    prefill = _prefill_sample(run)
    assert (prefill["prompt_end"], prefill["max_length"], prefill["max_new_tokens"]) == (
        PROMPT,
        PROMPT + new,
        new,
    )
    # WHEN it is planned from the run alone
    plan = _plan(run, capsys)
    # THEN the plan is the run as launched: its rows at the context of 8 + 40, KV of 47 tokens a row
    request = plan["request"]
    assert (request["batch"], request["context"], request["prompt"]) == (ROWS, PROMPT + new, PROMPT)
    assert plan["kv_bytes"] == TOKEN_ROW * ROWS * (PROMPT + new - 1)
    # AND a note says where it stopped, that this is the run as launched, and how far it got
    expected = (
        f"the run {said} in step {raised_at}, which never finished; step {raised_at - 1} was the last whole "
        f"one ({reached - 1} tokens a row held): planned as launched, at the context of {PROMPT + new} "
        f"tokens its generate() call asked for (its prompt of {PROMPT} + max_new_tokens={new}); it had "
        f"reached {reached} when it stopped"
    )
    assert expected in plan["notes"], plan["notes"]


def test_an_oom_in_the_prefill_is_planned_at_the_length_asked_for(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a generate() of max_new_tokens=30 whose prefill runs out of memory (layer 0 wrote the prompt)
    run, new = tmp_path / "run", 30
    asked = {"max_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    _record_raising(model, run, torch.OutOfMemoryError(OOM_MESSAGE), 1, **asked)
    # WHEN planned: THEN at 8 + 30, a note saying its prefill never finished
    plan = _plan(run, capsys)
    assert (plan["request"]["context"], plan["request"]["prompt"]) == (PROMPT + new, PROMPT)
    assert plan["kv_bytes"] == TOKEN_ROW * ROWS * (PROMPT + new - 1)
    note = next(note for note in plan["notes"] if "its prefill, which never finished" in note)
    assert f"planned as launched, at the context of {PROMPT + new} tokens" in note


@pytest.mark.parametrize(
    ("asked", "model_new", "length"),
    [
        # A generation_config passed in: its max_new_tokens
        ({"generation_config": _greedy(max_new_tokens=9)}, None, 17),
        # The passed config's max_length, where it sets no max_new_tokens: the whole sequence
        ({"generation_config": _greedy(max_length=15)}, None, 15),
        # A keyword wins over the passed config's setting
        ({"generation_config": _greedy(max_new_tokens=9), "max_new_tokens": 5}, None, 13),
        # max_new_tokens wins over a max_length
        ({"max_length": 30, "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}, None, 11),
        # The model's generation_config, where the call sets nothing
        ({"do_sample": False, "pad_token_id": 0}, 6, 14),
        # transformers' default: 20 new tokens
        ({"do_sample": False, "pad_token_id": 0}, None, 28),
    ],
    ids=["config-new", "config-length", "keyword-wins", "new-over-length", "model-config", "default"],
)  # fmt: skip
def test_the_recorder_notes_the_length_generate_stops_at(
    model: Any, asked: dict[str, Any], model_new: int | None, length: int, tmp_path: Path
) -> None:
    # GIVEN a whole generate() that runs to its length (EOS suppressed: min_length of the same length)
    run = tmp_path / "run"
    ids = _ids()
    saved = model.generation_config.max_new_tokens
    model.generation_config.max_new_tokens = model_new
    try:
        with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), min_length=length, **asked)
    finally:
        model.generation_config.max_new_tokens = saved
    # THEN the prefill sample's max_length is the sequence generate() returned: the call's own rule
    assert out.shape[1] == length
    assert _prefill_sample(run)["max_length"] == length
    # AND the manifest's call says it too (written as the call began, kept at the end)
    (call,) = json.loads((run / "manifest.json").read_text())["generate_calls"]
    assert (call["step"], call["max_length"], call["prompt_end"]) == (1, length, PROMPT)


def test_inputs_embeds_count_the_prompt_in_the_length(model: Any, tmp_path: Path) -> None:
    # GIVEN a generate() fed inputs_embeds alone, max_new_tokens=4: it returns the new tokens only
    run = tmp_path / "run"
    embeds = model.get_input_embeddings()(_ids())
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        out = model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(ROWS, PROMPT, dtype=torch.long), max_new_tokens=4,
            min_new_tokens=4, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    # THEN the length noted is the prompt's positions and the new tokens
    assert _prefill_sample(run)["max_length"] == PROMPT + out.shape[1] == PROMPT + 4


class _StopAt(StoppingCriteria):
    """Stops every row once the sequence is `length` long, as an end-of-sequence token would."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_a_whole_run_stopped_early_is_planned_at_what_it_reached(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a whole generate() of max_new_tokens=20 that a stopping criterion ends after 5 new tokens
    run, new, made = tmp_path / "run", 20, 5
    ids = _ids()
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([_StopAt(PROMPT + made)]),
        )  # fmt: skip
    reached = PROMPT + made
    assert out.shape[1] == reached
    # WHEN planned: THEN the plan is what it reached, as before, and a note gives the length asked for
    plan = _plan(run, capsys)
    assert (plan["request"]["context"], plan["request"]["prompt"]) == (reached, PROMPT)
    assert plan["kv_bytes"] == TOKEN_ROW * ROWS * (reached - 1)
    said = (
        f"its generate() call stopped at a context of {reached} tokens, before the {PROMPT + new} it asked "
        f"for (its prompt of {PROMPT} + max_new_tokens={new})"
    )
    assert any(note.startswith(said) for note in plan["notes"]), plan["notes"]
    assert not any("as launched" in note for note in plan["notes"])


def test_a_killed_run_is_planned_at_the_length_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real run of max_new_tokens=30 SIGKILLed inside layer 1 of step 4: steps 1-3 whole
    run, new, cut = tmp_path / "run", 30, 4
    model = f"build_model(tiny_size({LAYERS}, {KV_HEADS})).eval()"
    script = killed_mid_step_script(model, cut, ROWS, PROMPT, f"max_new_tokens={new}")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script, str(run)], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert done.returncode == -9, done.stderr
    assert json.loads((run / "manifest.json").read_text())["ended"] == {"status": "running"}
    # WHEN planned: THEN at 8 + 30, a note saying it was cut short and reached 8 + 3
    plan = _plan(run, capsys)
    assert (plan["request"]["batch"], plan["request"]["context"]) == (ROWS, PROMPT + new)
    assert plan["kv_bytes"] == TOKEN_ROW * ROWS * (PROMPT + new - 1)
    expected = (
        "the run was cut short (its manifest still says running): planned as launched, at the context of "
        f"{PROMPT + new} tokens its generate() call asked for (its prompt of {PROMPT} + "
        f"max_new_tokens={new}); it had reached {PROMPT + cut - 1} when it stopped"
    )
    assert expected in plan["notes"], plan["notes"]
    # AND diagnose names a shorter context against that length, saying the run stopped short of it (it
    # said "before the run's last step held 37", a step the run never ran)
    assert main(["diagnose", str(run), "--json"]) == 0
    remedies = json.loads(capsys.readouterr().out)["remedies"]
    (context,) = [r["sentence"] for r in remedies if r["kind"] == "context"]
    assert f"instead of {PROMPT + new:,} (prompt + new tokens" in context
    assert context.endswith(
        f" The run stopped at {PROMPT + cut - 2} tokens a row, short of the {PROMPT + new - 1} its call "
        "asked for, which the context is named against (as `kvtrace plan --from-run` plans it)."
    ), context


def test_a_run_killed_in_its_prefill_is_planned_at_the_length_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real run of max_new_tokens=30 on 8-token prompts SIGKILLed inside layer 1 of its prefill (the
    # kernel's OOM killer's way): layer 0's update on disk, no end sample of the prefill ever written
    run, new = tmp_path / "run", 30
    model = f"build_model(tiny_size({LAYERS}, {KV_HEADS})).eval()"
    script = killed_mid_step_script(model, 1, ROWS, PROMPT, f"max_new_tokens={new}")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script, str(run)], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert done.returncode == -9, done.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["ended"] == {"status": "running"}
    samples = [json.loads(line) for line in (run / "memory_samples.jsonl").read_text().splitlines()]
    assert not [sample for sample in samples if sample["phase"] == "prefill"]
    # THEN the manifest, rewritten as the call began, says what it asked for: 8 + 30
    assert manifest["generate_calls"] == [
        {"step": 1, "prompt_end": PROMPT, "max_length": PROMPT + new, "max_new_tokens": new}
    ]
    # WHEN planned: THEN at the context of 8 + 30 = 38 (it was 9, the prompt and one new token), its KV
    # 2 layers x K,V x 2 KV heads x 16 x 37 tokens x 2 rows x 4 B = 37,888 B
    plan = _plan(run, capsys)
    request = plan["request"]
    assert (request["batch"], request["context"], request["prompt"]) == (ROWS, PROMPT + new, PROMPT)
    assert plan["kv_bytes"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * (PROMPT + new - 1) * ROWS * 4 == 37888
    # AND its note says it stopped in its prefill and is planned as launched, asking for no --context
    expected = (
        "the run was cut short in step 1, its prefill, which never finished (its manifest still says "
        f"running): planned as launched, at the context of {PROMPT + new} tokens its generate() call asked "
        f"for (its prompt of {PROMPT} + max_new_tokens={new}); it stopped before its first new token"
    )
    assert expected in plan["notes"], plan["notes"]
    assert not [note for note in plan["notes"] if "give --context" in note]


@pytest.fixture(scope="module")
def whole_run(model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole greedy generate() of max_new_tokens=4 on 8-token prompts: its prefill sample says
    prompt_end 8, max_length 12, max_new_tokens 4."""
    run = tmp_path_factory.mktemp("whole") / "run"
    ids = _ids()
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
    return run


def _edit_prefill(run: Path, **fields: Any) -> int:
    """Set `fields` on the prefill sample; its line number."""
    path = run / "memory_samples.jsonl"
    lines = path.read_text().splitlines()
    (number,) = [i for i, line in enumerate(lines) if json.loads(line)["phase"] == "prefill"]
    lines[number] = json.dumps({**json.loads(lines[number]), **fields})
    path.write_text("\n".join(lines) + "\n")
    return number + 1


_I64 = 2**63 - 1


@pytest.mark.parametrize(
    ("prompt_end", "said"),
    [
        (-5, f"is -5, expected an integer from 1 to {_I64}"),
        (0, f"is 0, expected an integer from 1 to {_I64}"),
        (10**20, f"is {10**20}, expected an integer from 1 to {_I64}"),
        (PROMPT + 1, f"is {PROMPT + 1}, past the {PROMPT} tokens a row the KV log shows step 1's caches "),
        (10**18, f"is {10**18}, past the {PROMPT} tokens a row the KV log shows step 1's caches taking in"),
    ],
    ids=["negative", "zero", "past-int64", "one-past-the-prompt", "past-the-prompt"],
)
def test_a_prompt_end_no_prefill_wrote_is_refused_naming_its_line(
    whole_run: Path, prompt_end: int, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the whole run, its prefill sample's prompt_end changed: below a token, or past the 8 tokens a row
    # its prefill wrote into every layer (a plan read 10**20 as the prompt, and -5 or 0 moved its context
    # from 12 to 25 or 20 tokens, all exit 0)
    run = Path(shutil.copytree(whole_run, tmp_path / "run"))
    line = _edit_prefill(run, prompt_end=prompt_end)
    # THEN every command that reads the run refuses it in one line naming the file, the line and the field
    for argv in (
        ["report", str(run), "--no-export"],
        ["diagnose", str(run)],
        ["plan", "--from-run", str(run)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        where = f"{run / 'memory_samples.jsonl'}: line {line}"
        assert err.startswith(f"kvtrace {argv[0]}: error: {where}: field 'prompt_end' {said}"), err
        assert err.count("\n") == 1
    # AND the run as recorded is planned at its prompt of 8 + 4 new tokens
    _edit_prefill(run, prompt_end=PROMPT)
    request = _plan(run, capsys)["request"]
    assert (request["context"], request["prompt"]) == (PROMPT + 4, PROMPT)


@pytest.mark.parametrize("field", ["prompt_end", "max_length", "max_new_tokens", "step"])
def test_a_generate_call_of_the_manifest_with_an_impossible_number_is_refused(
    whole_run: Path, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the whole run, its manifest's call entry (which plans a run killed in its prefill) given -5
    run = Path(shutil.copytree(whole_run, tmp_path / "run"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["generate_calls"][0][field] = -5 if field != "step" else -(2**40)
    (run / "manifest.json").write_text(json.dumps(manifest))
    # THEN plan --from-run (and every reader) refuses it in one line naming the entry and the field
    assert main(["plan", "--from-run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"kvtrace plan: error: {run / 'manifest.json'}: field 'generate_calls[0].{field}' is "
        f"{manifest['generate_calls'][0][field]}, expected an integer from "
    ), err
