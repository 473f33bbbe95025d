"""A run stopped between one layer's K and V updates: the real H200 OOM of sample_traces/h200/oom_b266
struck in layer 5's V torch.cat of decode step 130, after its K had grown to 257 tokens a row, so layer 5's
K holds one token more than its V; and the same recorded here, on the tiny model, the error raised by the
torch.cat of a layer's values. Each storage is over its own tokens: the measured bytes per token is the
arithmetic's exactly, and the per-layer table gives K's and V's tokens where they differ.
"""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import HEAD_DIM, raising_in_values_update, tiny_size

H200 = Path(__file__).resolve().parents[2] / "sample_traces" / "h200"
BF16 = 2


def _out(argv: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _last_tokens(run: Path) -> dict[tuple[int, str], int]:
    """Per (layer, K or V): the tokens a row of the log's last data event held, read from the raw file."""
    last: dict[tuple[int, str], int] = {}
    for line in (run / "kv_events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["part"] == "data" and event["event"] != "freed":
            last[(event["layer"], event["kv"])] = event["tokens"]
    return last


@pytest.fixture(scope="module")
def oom_b266(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cut") / "oom_b266"
    shutil.copytree(H200 / "oom_b266", run)
    return run


def test_a_layer_cut_between_k_and_v_counts_each_at_its_own_tokens(oom_b266: Path) -> None:
    # GIVEN the real run: 266 rows, Llama 3 8B's shape, bf16; the log's last K of layer 5 at 257 tokens, its V
    # at 256 (the OOM struck in V's concatenation), layers 0-4 at 257 both, 6-31 at 256 both
    model = json.loads((oom_b266 / "manifest.json").read_text())["model"]
    layers, heads, head_dim = model["num_layers"], model["num_kv_heads"], model["head_dim"]
    rows = 266
    storage_token = heads * head_dim * BF16  # one token of one row in one K (or V) storage: 2,048 B
    arithmetic = layers * 2 * storage_token
    assert (storage_token, arithmetic) == (2048, 131_072)
    tokens = _last_tokens(oom_b266)
    assert (tokens[(5, "k")], tokens[(5, "v")]) == (257, 256)
    assert {tokens[(layer, kv)] for layer in range(5) for kv in "kv"} == {257}
    assert {tokens[(layer, kv)] for layer in range(6, layers) for kv in "kv"} == {256}

    # WHEN it is reported as JSON
    report: Any = json.loads(_out(["report", str(oom_b266), "--json", "-q", "--no-export"]))

    # THEN each storage's bytes are its own tokens' bytes, and over them the measured bytes per token is the
    # arithmetic's exactly (it was 4,096 x 31 + 140,005,376 x 2 / (257 x 266) = 131,064.03 before)
    kv = report["kv"]
    assert kv["bytes_per_token_measured"] == arithmetic == kv["bytes_per_token_expected"]
    (cache,) = kv["caches"]
    assert cache["bytes_per_token_measured"] == arithmetic
    layer5 = kv["per_layer"][5]
    assert (layer5["k_bytes"], layer5["v_bytes"]) == (257 * rows * storage_token, 256 * rows * storage_token)
    assert (layer5["k_bytes"], layer5["v_bytes"]) == (140_005_376, 139_460_608)
    assert (layer5["tokens"], layer5["k_tokens"], layer5["v_tokens"]) == (257, 257, 256)
    assert all(
        row["k_tokens"] == row["v_tokens"] == row["tokens"] == tokens[(row["layer"], "k")]
        for row in kv["per_layer"]
        if row["layer"] != 5
    )

    # AND the text report says the same, and gives layer 5's K and V tokens in its tokens/row column
    text = _out(["report", str(oom_b266), "-q", "--no-export"])
    assert (
        "bytes per token: measured 131,072.0 (each layer's K and V bytes over their own tokens, 256 to 257 a "
        "row, x 266 rows), arithmetic 131,072"
    ) in text
    assert "        5  140,005,376  139,460,608 K 257 V 256                   0" in text.splitlines()
    assert "        4  140,005,376  140,005,376         257                   0" in text.splitlines()

    # AND the HTML page agrees with the JSON
    page = oom_b266.parent / "oom_b266.html"
    _out(["report", str(oom_b266), "-q", "--no-export", "-o", str(page)])
    assert "<th>KV bytes/token measured vs arithmetic</th><td>131,072.0 vs 131,072</td>" in page.read_text()


def test_runs_whose_k_and_v_agree_keep_their_figures() -> None:
    # GIVEN the batch-261 OOM, cut between layers 9 and 10 (not inside one): its K and V agree in every layer
    run = H200 / "oom_b261_fit"
    tokens = _last_tokens(run)
    assert all(tokens[(layer, "k")] == tokens[(layer, "v")] for layer in range(32))
    # WHEN reported, THEN nothing says K and V apart, and the measured figure is the arithmetic's
    report: Any = json.loads(_out(["report", str(run), "--json", "-q", "--no-export"]))
    assert all(row["k_tokens"] == row["v_tokens"] == row["tokens"] for row in report["kv"]["per_layer"])
    assert report["kv"]["bytes_per_token_measured"] == 131_072


LAYERS, KV_HEADS, ROWS, PROMPT, NEW = 4, 2, 2, 8, 6
RAISED_AT, IN_LAYER = 4, 2  # the fourth forward (step 4: the prefill is step 1), layer 2's V concatenation


def test_a_tiny_run_cut_in_a_values_update_measures_the_arithmetic(
    tmp_path: Path, watched_models: list[torch.nn.Module]
) -> None:
    # GIVEN a recorded generate() whose fourth forward raised an OOM in layer 2's torch.cat of the values:
    # layers 0-1 and layer 2's K hold the prompt and 3 tokens, layer 2's V and layer 3 one fewer
    model = build_model(tiny_size(LAYERS, KV_HEADS)).eval()
    watched_models.append(model)
    run = tmp_path / "run"
    ids = torch.randint(3, 1000, (ROWS, PROMPT), generator=torch.Generator().manual_seed(0))
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")
    with (
        raising_in_values_update(model, error, RAISED_AT, IN_LAYER),
        pytest.raises(torch.OutOfMemoryError),
        torch.no_grad(),
        kvtrace.record(run, model=model, profiler=False),
    ):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    full, short = PROMPT + RAISED_AT - 1, PROMPT + RAISED_AT - 2  # 11 and 10 tokens a row
    tokens = _last_tokens(run)
    assert [(tokens[(layer, "k")], tokens[(layer, "v")]) for layer in range(LAYERS)] == [
        (full, full), (full, full), (full, short), (short, short)
    ]  # fmt: skip

    # WHEN it is reported
    report: Any = json.loads(_out(["report", str(run), "--json", "-q", "--no-export"]))
    text = _out(["report", str(run), "-q", "--no-export"])

    # THEN every storage is over its own tokens: float32, a row's token in K (or V) 2 x 16 x 4 = 128 B, and
    # the measured figure is the arithmetic's, 4 layers x 2 x 128 = 1,024 (1,012.4 over layer 2's K tokens)
    storage_token = KV_HEADS * HEAD_DIM * 4
    arithmetic = LAYERS * 2 * storage_token
    assert (storage_token, arithmetic) == (128, 1024)
    kv = report["kv"]
    assert kv["bytes_per_token_measured"] == arithmetic == kv["bytes_per_token_expected"]
    layer2 = kv["per_layer"][IN_LAYER]
    assert (layer2["k_bytes"], layer2["v_bytes"]) == (
        full * ROWS * storage_token,
        short * ROWS * storage_token,
    )
    assert (layer2["k_tokens"], layer2["v_tokens"]) == (full, short)
    assert "        2        2,816        2,560   K 11 V 10                   0" in text.splitlines()
    assert (
        "measured 1,024.0 (each layer's K and V bytes over their own tokens, 10 to 11 a row, x 2 rows)"
        in text
    )
