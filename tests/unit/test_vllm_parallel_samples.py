"""Which blocks a prompt's parallel samples (vLLM `n > 1`) share, read from hand-made engine files: a
prompt of 10 tokens in blocks of 4 has (10 - 1) // 4 = 2 full blocks a later sample can find cached (vLLM's
hit stops one token short of the prompt). Split by chunked prefill, the sharing holds only where each later
sample logged that it found them (`cached_tokens`, on its `scheduled` line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from analyzers.planning.vllm_samples import SharedSamples, parallel_samples
from analyzers.readers.engine_files import read_engine
from tests.engine_files import _req, _step, write_engine_run

PROMPT, BLOCK = 10, 4
SHARED = (PROMPT - 1) // BLOCK  # 2


def _samples(
    tmp_path: Path, second_found: int | None, first_chunk: int = 8, second_step: int = 2
) -> SharedSamples:
    """Samples 0_P and 1_P of one prompt: 0_P writes `first_chunk` tokens in step 1 and the rest in step 2;
    1_P is admitted in `second_step` with `second_found` tokens cached (None: a run that did not log them)."""
    found: dict[str, Any] = {} if second_found is None else {"cached_tokens": second_found}
    zero: dict[str, Any] = {} if second_found is None else {"cached_tokens": 0}
    requests = [
        _req(1, "0_P", "scheduled", -(-first_chunk // BLOCK), first_chunk, PROMPT, 0, **zero),
        _req(second_step, "1_P", "scheduled", 3, PROMPT, PROMPT, 0, **found),
        _req(3, "0_P", "finished", 0, 0, PROMPT, 1),
        _req(3, "1_P", "finished", 0, 0, PROMPT, 1),
    ]
    if first_chunk < PROMPT:
        requests.insert(1 if second_step == 2 else 2, _req(2, "0_P", "blocks", 3, PROMPT, PROMPT, 0))
    steps = [_step(1, 2, 1, 1, first_chunk), _step(2, 4, 2, 0, 4), _step(3, 0, 0, 0, 2)]
    run = read_engine(write_engine_run(tmp_path / "run", steps=steps, requests=requests))
    assert run is not None
    return parallel_samples(run, BLOCK, sliding=False)


def test_a_chunked_prompts_blocks_are_shared_where_its_later_sample_found_them(tmp_path: Path) -> None:
    # GIVEN the first sample's prompt written in 2 chunks, the second sample admitted after the last one
    # finding the prompt's 2 full blocks (8 tokens) cached
    samples = _samples(tmp_path, second_found=SHARED * BLOCK)
    # THEN they share them: counted once a prompt
    assert samples.parent_of == {"0_P": "P", "1_P": "P"} and samples.shared_blocks == {"P": SHARED}
    assert samples.once_per_prompt({"0_P": 3, "1_P": 3}) == [3, 3 - SHARED]


@pytest.mark.parametrize(
    ("second_found", "why"),
    [
        (None, "a run recorded before kvtrace logged the hits: once a sample, an upper bound"),
        (BLOCK, "admitted between the first's chunks (4 + 6): found 1 block, writes the next itself"),
    ],
)
def test_a_chunked_prompts_blocks_count_per_sample_where_not_found(
    tmp_path: Path, second_found: int | None, why: str
) -> None:
    mid_chunks = second_found is not None
    samples = _samples(
        tmp_path, second_found, first_chunk=4 if mid_chunks else 8, second_step=1 if mid_chunks else 2
    )
    assert samples.parent_of == {} and samples.shared_blocks == {}, why


def test_a_prompt_each_sample_took_whole_is_shared_without_the_hits(tmp_path: Path) -> None:
    # GIVEN a run that did not log the hits, each sample given its whole prompt in the step that admitted it
    samples = _samples(tmp_path, second_found=None, first_chunk=PROMPT)
    # THEN they share its full blocks, as before
    assert samples.shared_blocks == {"P": SHARED}
