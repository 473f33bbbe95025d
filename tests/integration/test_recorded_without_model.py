"""`kvtrace.record()` without `model=`: no weights table, so on a CPU the weights allocated before the block
are in none of the run's figures. The report says so, in the words `plan --from-run` uses for such a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import cache_arg, tiny_size, weights_bytes

LAYERS, PROMPT, DECODES, BATCH = 2, 8, 3, 2
NO_MODEL = (
    "the run was recorded without model=: weights allocated before the block are not in its figures (its "
    "peak and final leave them out); pass model= to kvtrace.record() to count them"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[bool, Path], int]:
    """The same greedy loop recorded with model= and without, and the model's weights."""
    import torch
    from transformers import DynamicCache

    import kvtrace

    model = build_model(tiny_size(LAYERS), dtype=torch.float32).eval()
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("nomodel")
    runs = {}
    for given in (True, False):
        runs[given] = folder / str(given)
        with kvtrace.record(runs[given], **({"model": model} if given else {})), torch.no_grad():
            cache = DynamicCache(config=model.config)
            out = model(ids, **cache_arg(cache), use_cache=True)
            for _ in range(DECODES):
                out = model(out.logits[:, -1:].argmax(-1), **cache_arg(cache), use_cache=True)
        del out, cache
    return runs, weights_bytes(model)


def _report(run: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_run_recorded_without_model_says_its_figures_leave_out_the_weights(
    runs: tuple[dict[bool, Path], int], capsys: pytest.CaptureFixture[str]
) -> None:
    folders, weights = runs
    # GIVEN the run without model= counts no weights at its peak, the one with model= all of them
    without, given = _report(folders[False], capsys), _report(folders[True], capsys)
    assert without["devices"][0]["categories_at_peak"]["weights"] == 0
    assert given["devices"][0]["categories_at_peak"]["weights"] == weights
    # THEN the report without model= says why, the one with model= does not
    assert NO_MODEL in without["notes"]
    assert not [note for note in given["notes"] if "without model=" in note]
    # AND the text report says it too
    assert main(["report", str(folders[False]), "--no-export", "-q"]) == 0
    assert NO_MODEL in capsys.readouterr().out
    # AND it is what `plan --from-run` says of such a run
    assert main(["plan", "--from-run", str(folders[False])]) != 0
    assert "recorded without model=" in capsys.readouterr().err
