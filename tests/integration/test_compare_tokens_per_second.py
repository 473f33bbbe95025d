"""`kvtrace compare`'s tokens/s counts what the model generated, not its forwards: prompt-lookup decoding
yields several tokens per forward, and beam search's rows are beams."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import ModelSize, build_model
from kvtrace.run_reader import read_run
from tests.tiny import cache_arg

PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10]  # repeats: prompt lookup finds drafts in it
NEW_TOKENS, BEAMS = 20, 3
DECODINGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "lookup": {"prompt_lookup_num_tokens": 3},
    "beams": {"num_beams": BEAMS},
}


def _seconds(run: Path) -> float:
    """The recording's generation time from the raw samples: the start sample to the last step's end."""
    samples = read_run(run).memory_samples
    start = next(s["t_ns"] for s in samples if s["phase"] == "start")
    end = [s["t_ns"] for s in samples if s["phase"] in ("prefill", "decode")][-1]
    return (end - start) / 1e9


def test_tokens_per_second_counts_generated_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN one model generating 20 tokens plainly, with prompt lookup, and with 3 beams
    model = build_model(ModelSize(128, 256, 4, 8, 2, vocab_size=1000, tie_embeddings=False))
    ids = torch.tensor([PROMPT])
    returned: dict[str, Any] = {}
    for name, extra in DECODINGS.items():
        with torch.no_grad(), kvtrace.record(tmp_path / name, model=model, profiler=False):
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, **extra
            )
        returned[name] = out
    runs = [str(tmp_path / name) for name in returned]

    # WHEN they are compared
    assert main(["compare", *runs, "--json"]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)["runs"]}

    # THEN each run generated the new tokens generate() returned per row, whatever its forwards
    for name, out in returned.items():
        row = rows[name]
        new_per_row = out.shape[1] - len(PROMPT)
        assert row["generated_tokens_per_row"] == new_per_row == NEW_TOKENS
        seconds = _seconds(tmp_path / name)
        assert row["tokens_per_second_per_row"] == pytest.approx(new_per_row / seconds)
        kv_rows = BEAMS if name == "beams" else 1  # beam search's cache holds one row per beam
        assert row["tokens_per_second"] == pytest.approx(new_per_row * kv_rows / seconds)
        assert row["rows_are_beams"] is (name == "beams")
    # prompt lookup did yield several tokens per forward: forwards alone would undercount it
    assert rows["lookup"]["steps"] < NEW_TOKENS
    assert any("beam search" in note for note in rows["beams"]["notes"])

    # AND the table labels both rates, and marks the beams
    assert main(["compare", *runs]) == 0
    table = capsys.readouterr().out
    assert "tokens/s per row (generation)" in table and "tokens/s, all rows (generation)" in table
    assert "(beams)" in next(line for line in table.splitlines() if line.startswith("tokens/s, all rows"))


BATCH, FIRST_PROMPT, FIRST_NEW, NEXT_MESSAGE, NEXT_NEW = 2, 10, 12, 6, 5


def _layer0_steps(run: Path) -> dict[int, tuple[str, int]]:
    """step -> (phase, tokens per row held at its end) of layer 0's K, from the raw log."""
    steps: dict[int, tuple[str, int]] = {}
    for event in read_run(run).kv_events:
        layer0_k = event.layer == 0 and event.kv == "k" and event.part == "data"
        if layer0_k and event.event != "freed" and event.phase != "end":
            steps[event.step] = (event.phase, event.tokens)
    return steps


@pytest.mark.parametrize("profiler", [False, True])
def test_a_cache_reused_across_generate_calls_counts_what_each_call_returned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], profiler: bool
) -> None:
    # GIVEN one cache reused across two generate() calls (a chat's next turn): 12 new tokens, then the user's
    # next 6 tokens appended and 5 more new tokens
    from transformers import DynamicCache

    model = build_model(ModelSize(64, 128, 4, 4, 2, vocab_size=1000, tie_embeddings=False))
    ids = torch.randint(3, 1000, (BATCH, FIRST_PROMPT), generator=torch.Generator().manual_seed(0))
    message = torch.randint(3, 1000, (BATCH, NEXT_MESSAGE), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=model.config)
    run = tmp_path / "reused"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=profiler):
        first = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_arg(cache),
            max_new_tokens=FIRST_NEW,
            min_new_tokens=FIRST_NEW,
            do_sample=False,
        )
        turn = torch.cat([first, message], dim=1)
        second = model.generate(
            turn,
            attention_mask=torch.ones_like(turn),
            **cache_arg(cache),
            max_new_tokens=NEXT_NEW,
            min_new_tokens=NEXT_NEW,
            do_sample=False,
        )
    returned = (first.shape[1] - FIRST_PROMPT) + (second.shape[1] - turn.shape[1])
    assert returned == FIRST_NEW + NEXT_NEW == 17

    # WHEN it is compared
    assert main(["compare", str(run), str(run), "--json"]) == 0  # compare takes two runs or more
    row = json.loads(capsys.readouterr().out)["runs"][0]

    # THEN it generated what the two calls returned per row: the second call's prompt is not generated
    assert row["generated_tokens_per_row"] == 17
    seconds = _seconds(run)
    assert row["tokens_per_second_per_row"] == pytest.approx(17 / seconds)
    assert row["tokens_per_second"] == pytest.approx(17 * BATCH / seconds)
    # AND each call starts with a prefill: the second's first forward (step 1 + 11 decode steps + 1) writes
    # the 6 new tokens and the first call's last token, never written back: 10 + 11 held, then 28
    steps = _layer0_steps(run)
    assert row["steps"] == len(steps) == FIRST_NEW + NEXT_NEW
    second_prefill = FIRST_NEW + 1
    assert steps[1] == ("prefill", FIRST_PROMPT)
    assert (
        steps[second_prefill]
        == ("prefill", FIRST_PROMPT + FIRST_NEW - 1 + 1 + NEXT_MESSAGE)
        == ("prefill", 28)
    )
    assert [step for step, (phase, _) in steps.items() if phase == "prefill"] == [1, second_prefill]
    assert steps[len(steps)][1] == turn.shape[1] + NEXT_NEW - 1 == cache.get_seq_length()


def test_prompt_lookup_on_a_reused_cache_keeps_its_verifications_decode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN prompt-lookup decoding over one cache reused across two generate() calls
    from transformers import DynamicCache

    model = build_model(ModelSize(128, 256, 4, 8, 2, vocab_size=1000, tie_embeddings=False))
    ids = torch.tensor([PROMPT])
    cache = DynamicCache(config=model.config)
    run = tmp_path / "lookup"
    kwargs: dict[str, Any] = {"max_new_tokens": 8, "do_sample": False, "prompt_lookup_num_tokens": 3}
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        first = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_arg(cache), **kwargs)
        turn = torch.cat([first, ids[:, :6]], dim=1)
        second = model.generate(turn, attention_mask=torch.ones_like(turn), **cache_arg(cache), **kwargs)
    returned = (first.shape[1] - ids.shape[1]) + (second.shape[1] - turn.shape[1])

    # WHEN it is compared
    assert main(["compare", str(run), str(run), "--json"]) == 0  # compare takes two runs or more
    row = json.loads(capsys.readouterr().out)["runs"][0]

    # THEN it generated what the calls returned
    assert row["generated_tokens_per_row"] == returned == 16
    # AND only each call's first forward is a prefill: the verifications that wrote several draft tokens
    # per row on a cache holding tokens are decode steps
    steps = _layer0_steps(run)
    prefills = [step for step, (phase, _) in steps.items() if phase == "prefill"]
    assert len(prefills) == 2 and prefills[0] == 1
    writes = {step: steps[step][1] - steps[step - 1][1] for step in steps if step > 1}
    assert any(grew > 1 for step, grew in writes.items() if step not in prefills)


def test_a_generate_call_that_ran_no_forward_leaves_the_next_forward_decode(tmp_path: Path) -> None:
    # GIVEN a generate() call that fails before its first forward, then a forward of one token on the cache
    from transformers import DynamicCache

    model = build_model(ModelSize(64, 128, 2, 4, 2, vocab_size=1000, tie_embeddings=False))
    ids = torch.tensor([PROMPT])
    cache = DynamicCache(config=model.config)
    run = tmp_path / "failed_call"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), **cache_arg(cache), max_new_tokens=3, min_new_tokens=3
        )
        with pytest.raises(ValueError):
            model.generate(out, **cache_arg(cache), max_new_tokens=3, num_beams=2, num_return_sequences=3)
        model(out[:, -1:], **cache_arg(cache), use_cache=True)

    # THEN the generate() call's first forward was a prefill, and the forward outside any call a decode step
    steps = _layer0_steps(run)
    assert [phase for _, (phase, _) in sorted(steps.items())] == ["prefill", "decode", "decode", "decode"]
    assert steps[4][1] == len(PROMPT) + 3 == cache.get_seq_length()


CHUNKED_PROMPT, CHUNK, CHUNKED_NEW = 10, 4, 6


@pytest.mark.parametrize(
    ("cache", "passed", "profiler"),
    [
        ("dynamic", False, False),
        ("static", False, False),
        ("dynamic", False, True),
        ("dynamic", True, False),
        ("static", True, False),
    ],
)
def test_a_chunked_prefill_is_one_prefill_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cache: str, passed: bool, profiler: bool
) -> None:
    # GIVEN a prompt of 10 written in chunks of 4, 4 and 2 (`prefill_chunk_size`), then 5 decode steps, on a
    # cache generate() makes or on an empty one passed in
    from transformers import DynamicCache, StaticCache

    model = build_model(ModelSize(64, 128, 4, 4, 2, vocab_size=1000, tie_embeddings=False))
    ids = torch.randint(3, 1000, (BATCH, CHUNKED_PROMPT), generator=torch.Generator().manual_seed(0))
    run = tmp_path / "chunked"
    given: dict[str, Any] = {"cache_implementation": cache}
    if passed:
        made = (
            DynamicCache(config=model.config)
            if cache == "dynamic"
            else StaticCache(config=model.config, max_cache_len=CHUNKED_PROMPT + CHUNKED_NEW)
        )
        given = cache_arg(made)
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=profiler):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=CHUNKED_NEW,
            min_new_tokens=CHUNKED_NEW,
            do_sample=False,
            prefill_chunk_size=CHUNK,
            pad_token_id=0,
            **given,
        )
    assert out.shape[1] - CHUNKED_PROMPT == CHUNKED_NEW

    # WHEN it is compared
    assert main(["compare", str(run), str(run), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["runs"][0]

    # THEN the three chunks are one prefill step, holding the whole prompt at its end, and the run generated
    # what generate() returned: 1 token for the prefill, 1 per decode step
    steps = _layer0_steps(run)
    assert steps[1] == ("prefill", CHUNKED_PROMPT)
    assert [phase for phase, _ in steps.values()] == ["prefill"] + ["decode"] * (CHUNKED_NEW - 1)
    assert [tokens for _, tokens in steps.values()] == list(
        range(CHUNKED_PROMPT, CHUNKED_PROMPT + CHUNKED_NEW)
    )
    assert row["steps"] == CHUNKED_NEW
    assert row["generated_tokens_per_row"] == CHUNKED_NEW
    # AND the chunks' growth is logged inside that step: a dynamic cache grows at each chunk (4, 8, 10)
    if cache == "dynamic":
        grown = [
            e.tokens
            for e in read_run(run).kv_events
            if e.step == 1 and e.layer == 0 and e.kv == "k" and e.event in ("created", "grown")
        ]
        assert grown == [CHUNK, 2 * CHUNK, CHUNKED_PROMPT]


@pytest.mark.parametrize("assistant", ["one layer", "a copy"])
def test_assisted_decoding_counts_what_generate_returned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], assistant: str
) -> None:
    # GIVEN assisted decoding with a 1-layer draft model, or with a copy of the model made inside the block
    # (a draft cache of the model's own shape): the model's first forward writes the prompt and the drafts
    # it verifies, which it keeps
    size = ModelSize(64, 128, 2, 4, 2, vocab_size=512, tie_embeddings=False)
    model = build_model(size, seed=0)
    base = torch.randint(3, 500, (1, 5), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([base, base, base], dim=1)
    run = tmp_path / "assisted"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        draft = build_model(ModelSize(64, 128, 1, 4, 2, vocab_size=512), seed=1)
        if assistant == "a copy":
            draft = copy.deepcopy(model)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), assistant_model=draft, max_new_tokens=8,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    returned = out.shape[1] - ids.shape[1]
    assert returned == 8
    # WHEN it is compared THEN the run generated what generate() returned: the model's cache only, its
    # first forward's kept drafts included, which its end (prompt + 8 - 1 tokens) confirms
    assert main(["compare", str(run), str(run), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["runs"][0]
    assert row["generated_tokens_per_row"] == returned
    recorded = read_run(run)
    (mine,) = recorded.manifest["model_caches"]
    held = max(e.tokens for e in recorded.kv_events if e.cache == mine and e.event != "freed")
    assert held == ids.shape[1] + returned - 1
    first = [
        e for e in recorded.kv_events if e.cache == mine and e.layer == 0 and e.kv == "k" and e.step == 1
    ]
    assert first[0].tokens > ids.shape[1], "the first forward verifies drafts beyond the prompt"


def test_a_run_without_a_cache_says_why_it_has_no_tokens_per_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN one model generating 4 tokens for 2 rows with its cache, and without (use_cache=False)
    model = build_model(ModelSize(64, 128, 2, 4, 2, vocab_size=1000, tie_embeddings=False))
    ids = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    for name, use_cache in (("cached", True), ("uncached", False)):
        with torch.no_grad(), kvtrace.record(tmp_path / name, model=model, profiler=False):
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                do_sample=False, use_cache=use_cache, pad_token_id=0,
            )  # fmt: skip
    runs = [str(tmp_path / "cached"), str(tmp_path / "uncached")]
    # its 4 forwards each ended whole, and none wrote a KV line
    uncached = read_run(tmp_path / "uncached")
    ended = [s["step"] for s in uncached.memory_samples if s["phase"] in ("prefill", "decode")]
    assert ended == [1, 2, 3, 4] and uncached.kv_events == []

    # WHEN they are compared
    assert main(["compare", *runs, "--json"]) == 0
    cached_row, uncached_row = json.loads(capsys.readouterr().out)["runs"]

    # THEN the cached run's rates are its KV log's: 4 tokens per row, 2 rows, over its samples' time
    seconds = _seconds(tmp_path / "cached")
    assert cached_row["generated_tokens_per_row"] == 4
    assert cached_row["tokens_per_second"] == pytest.approx(4 * 2 / seconds)
    # AND the uncached run's are unknown (a forward without a cache does not say what it yielded, nor its
    # rows), and its notes say why, where they were a bare null
    assert uncached_row["steps"] == 4
    unknown = ("tokens_per_second", "tokens_per_second_per_row", "generated_tokens_per_row", "batch")
    assert [uncached_row[key] for key in unknown] == [None, None, None, None]
    said = (
        "tokens/s, generated tokens and batch unknown: kvtrace counts the tokens a forward generated, and "
        "the rows it ran, from its KV cache's updates, and its 4 forward passes made none (use_cache=False, "
        "or a cache kvtrace does not follow): a forward alone does not say what it yielded (a token per "
        "row in generate(), none in a scoring pass)"
    )
    assert said in uncached_row["notes"]
    assert not any(note.startswith("tokens/s") for note in cached_row["notes"])
    # AND the table's blank cells are explained by a note under it
    assert main(["compare", *runs]) == 0
    table = capsys.readouterr().out.splitlines()
    per_row = next(line for line in table if line.startswith("tokens/s per row"))
    assert per_row.split()[-1] == "-"
    assert f"note: uncached: {said}" in table
