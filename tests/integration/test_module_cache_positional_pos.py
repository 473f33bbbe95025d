"""A user's own decoder whose forward is `forward(ids, pos)`, not Meta's `forward(tokens, start_pos)`: its
preallocated buffers (named with `record(cache_attrs=...)`) hold `pos` plus the input's length per row, the
int second argument read as the position it writes from, as the step's phase already read it. Before, only a
parameter named `start_pos` was read, so such a run logged every buffer's tokens as 0 (unknown)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import kvtrace
from kvtrace.run_reader import read_run
from tests.cli_json import report_json

LAYERS, KV_HEADS, HEAD_DIM, ROWS, MAX_SEQ = 2, 2, 16, 2, 32
PROMPT, DECODES = 5, 4
HIDDEN = KV_HEADS * HEAD_DIM
BUFFER_BYTES = ROWS * KV_HEADS * MAX_SEQ * HEAD_DIM * 4  # one K or V buffer, float32, allocated up front


class _Attention(nn.Module):
    """Attention writing K and V into its own [batch, kv_heads, seq, head_dim] buffers `kc` / `vc`."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.register_buffer("kc", torch.zeros(ROWS, KV_HEADS, MAX_SEQ, HEAD_DIM), persistent=False)
        self.register_buffer("vc", torch.zeros(ROWS, KV_HEADS, MAX_SEQ, HEAD_DIM), persistent=False)

    def forward(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        rows, fed, _ = hidden.shape
        q, k, v = (
            t.transpose(1, 2) for t in self.qkv(hidden).view(rows, fed, 3, KV_HEADS, HEAD_DIM).unbind(2)
        )
        self.kc[:rows, :, pos : pos + fed] = k
        self.vc[:rows, :, pos : pos + fed] = v
        keys, values = self.kc[:rows, :, : pos + fed], self.vc[:rows, :, : pos + fed]
        out = nn.functional.scaled_dot_product_attention(q, keys, values, is_causal=fed > 1)
        return out.transpose(1, 2).reshape(rows, fed, HIDDEN)


class _PosDecoder(nn.Module):
    """A decoder called as `model(ids, pos)`: the position is its second argument, named `pos`."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, HIDDEN)
        self.layers = nn.ModuleList(_Attention() for _ in range(LAYERS))

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        hidden = self.embed(ids)
        for layer in self.layers:
            hidden = hidden + layer(hidden, pos)
        return hidden


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_a_forward_s_int_second_argument_says_where_its_buffers_are_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], watched_models: list[nn.Module], how: str
) -> None:
    # GIVEN a decoder of its own, called `model(ids, pos)` (or `model(ids, pos=...)`)
    torch.manual_seed(0)
    model = _PosDecoder().eval()
    watched_models.append(model)
    ids = torch.randint(0, 64, (ROWS, PROMPT + DECODES))
    attrs = {"kc": ("k", "bhsd"), "vc": ("v", "bhsd")}

    def forward(fed: torch.Tensor, pos: int) -> None:
        model(fed, pos) if how == "positional" else model(fed, pos=pos)

    # WHEN a prefill of PROMPT positions and DECODES decode steps run
    try:
        record = kvtrace.record(tmp_path / "run", model=model, profiler=False, cache_attrs=attrs)
        with record, torch.inference_mode():
            forward(ids[:, :PROMPT], 0)
            for pos in range(PROMPT, PROMPT + DECODES):
                forward(ids[:, pos : pos + 1], pos)
    finally:
        watched_models.remove(model)

    # THEN each forward's events hold the tokens written per row: the prompt, then one more a step
    run = read_run(tmp_path / "run")
    written = [
        (e.step, e.phase, e.tokens) for e in run.kv_events if (e.layer, e.kv, e.event) == (0, "k", "written")
    ]
    assert written == [(1, "prefill", PROMPT)] + [
        (1 + d, "decode", PROMPT + d) for d in range(1, DECODES + 1)
    ]
    assert not [w for w in run.manifest.get("warnings", []) if "without saying where" in w]
    # AND the report gives the tokens held, and the buffers' bytes over the positions written
    report = report_json(tmp_path / "run", capsys)["kv"]
    held = PROMPT + DECODES
    assert report["final_bytes"] == 2 * LAYERS * BUFFER_BYTES
    assert [layer["tokens"] for layer in report["per_layer"]] == [held] * LAYERS
    assert (report["tokens_held"], report["batch"]) == (held, ROWS)
