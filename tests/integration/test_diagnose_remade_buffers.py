"""Diagnosing a model whose Meta-style `cache_k`/`cache_v` buffers ([max_batch_size, max_seq_len, kv_heads,
head_dim]) are re-made inside one recorded block: the buffer remedies are priced in the settings and dtype
of the buffers held at the diagnosed moment, not in those of the run's last buffers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kvtrace
from kvtrace.cli import main
from kvtrace.run_reader import read_run

LAYERS, DIM, HEADS, KV_HEADS, VOCAB = 3, 32, 4, 2, 64
HEAD_DIM = DIM // HEADS
PROMPT, NEW_TOKENS = 5, 4
INIT_BATCH, INIT_SEQ = 2, 32  # the buffers the model is built with


class Attention(nn.Module):
    """Meta's reference attention: K and V written in place into registered buffers at `start_pos`."""

    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.make_caches(INIT_BATCH, INIT_SEQ)

    def make_caches(self, max_batch: int, max_seq: int) -> None:
        """Re-made buffers in place of the old ones, in the model's dtype (as Meta's `Attention.__init__`)."""
        dtype = self.wk.weight.dtype
        self.register_buffer("cache_k", torch.zeros(max_batch, max_seq, KV_HEADS, HEAD_DIM, dtype=dtype))
        self.register_buffer("cache_v", torch.zeros(max_batch, max_seq, KV_HEADS, HEAD_DIM, dtype=dtype))

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, seq, _ = x.shape
        q = self.wq(x).view(rows, seq, HEADS, HEAD_DIM)
        k = self.wk(x).view(rows, seq, KV_HEADS, HEAD_DIM)
        v = self.wv(x).view(rows, seq, KV_HEADS, HEAD_DIM)
        self.cache_k[:rows, start_pos : start_pos + seq] = k
        self.cache_v[:rows, start_pos : start_pos + seq] = v
        keys = self.cache_k[:rows, : start_pos + seq].repeat_interleave(HEADS // KV_HEADS, 2)
        values = self.cache_v[:rows, : start_pos + seq].repeat_interleave(HEADS // KV_HEADS, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), is_causal=seq > 1
        )
        return self.wo(out.transpose(1, 2).reshape(rows, seq, HEADS * HEAD_DIM))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Attention() for _ in range(LAYERS))
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def make_caches(self, max_batch: int, max_seq: int) -> None:
        for attention in self.layers:
            attention.make_caches(max_batch, max_seq)

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for attention in self.layers:
            h = h + attention(h, start_pos)
        return self.output(h)


def _generate(model: Decoder, rows: int) -> None:
    """A prefill of PROMPT tokens, then greedy decode steps: NEW_TOKENS tokens in all."""
    with torch.inference_mode():
        nxt = model(torch.randint(0, VOCAB, (rows, PROMPT)), 0)[:, -1:].argmax(-1)
        for i in range(NEW_TOKENS - 1):
            nxt = model(nxt, PROMPT + i)[:, -1:].argmax(-1)


def _buffer_bytes(max_batch: int, max_seq: int, element: int = 4) -> int:
    """K and V buffers of every layer: max_seq x rows x layers x 2 x kv_heads x head_dim x element size."""
    return max_seq * max_batch * LAYERS * 2 * KV_HEADS * HEAD_DIM * element


def _diagnose(run: str, capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, object]:
    capsys.readouterr()
    assert main(["diagnose", run, "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_remedies_of_caches_remade_inside_the_block_are_the_peaks_buffers(tmp_path, watched_models, capsys):
    # GIVEN one block that re-makes the caches twice: 4 rows x 64 positions for a first request, then
    # 1 x 16 for a second, the model built with 2 x 32 (fp32 throughout)
    torch.manual_seed(0)
    model = Decoder().eval()
    watched_models.append(model)
    run = tmp_path / "run"
    try:
        with kvtrace.record(run, model=model, profiler=False):
            for max_batch, max_seq in ((4, 64), (1, 16)):
                model.make_caches(max_batch, max_seq)
                _generate(model, max_batch)
    finally:
        watched_models.remove(model)
    big, small = _buffer_bytes(4, 64), _buffer_bytes(1, 16)
    one_old = _buffer_bytes(INIT_BATCH, INIT_SEQ) // (LAYERS * 2)  # one built buffer, not yet freed
    assert (big, small, one_old) == (98304, 6144, 4096)
    weights = sum(w.storage_bytes for w in read_run(run).weights)

    # WHEN it is diagnosed against a budget 32 KiB short of its peak: the big buffers, and the last built
    # one as it is replaced (the log has the new buffer before the old one's free)
    need = 32 * 1024
    data = _diagnose(str(run), capsys, "--budget", f"{weights + big + one_old - need}B")
    assert (data["kv_bytes"], data["shortfall_bytes"]) == (big + one_old, need)
    priced = {(r["kind"], r["setting"]): r for r in data["remedies"]}

    # THEN a smaller max_batch_size is priced in the peak's 4 rows: 4 x (98304 - 32768) / 98304 = 2.7 -> 2,
    # freeing 2 rows of 98304 / 4 B, enough
    batch = priced[("batch", 2)]
    assert (batch["saved_bytes"], batch["fits"]) == (big // 2, True) == (49152, True)
    assert "allocated for max_batch_size=4 (24.00 KiB of KV a row of it)" in str(batch["sentence"])
    assert "max_batch_size=2 instead of 4 frees 48.00 KiB, enough to fit" in str(batch["sentence"])
    # ... a smaller max_seq_len in its 64 positions: 64 x 65536 / 98304 = 42.7 -> 42, 22 positions freed
    context = priced[("context", 42)]
    per_position = big // 64
    assert (context["saved_bytes"], context["fits"]) == (22 * per_position, True) == (33792, True)
    assert "max_seq_len=64 positions (1.50 KiB of KV each, over the 4 rows" in str(context["sentence"])
    assert priced[("sliding_window", 42)]["saved_bytes"] == 22 * per_position
    # ... fp8 buffers keep 8 of the 32 bits of those buffers
    fp8 = priced[("quantized_kv", 8)]
    assert fp8["saved_bytes"] == big * 3 // 4
    assert "of the 96.00 KiB held at 32 bits" in str(fp8["sentence"])
    # ... and the old buffer held beside them is said, the remedies not claimed exact
    (note,) = [n for n in data["notes"] if "buffers of max_batch_size=4 x max_seq_len=64" in n]
    assert "another 4.00 KiB of KV" in note and "not exact" in note

    # AND the report's capacity is the run's last buffers, 1 x 16
    capsys.readouterr()
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    assert (kv["capacity_rows"], kv["capacity_tokens"], kv["final_bytes"]) == (1, 16, small)


def test_fp8_remedy_of_buffers_converted_inside_the_block_uses_the_peaks_dtype(
    tmp_path, watched_models, capsys
):
    # GIVEN float32 buffers of 2 x 32 converted to bfloat16 inside the block, before the first forward,
    # and a trace: the peak holds the float32 weights and buffers
    torch.manual_seed(0)
    model = Decoder().eval()
    watched_models.append(model)
    run = tmp_path / "run"
    try:
        with kvtrace.record(run, model=model):
            model.to(torch.bfloat16)
            _generate(model, INIT_BATCH)
    finally:
        watched_models.remove(model)
    fp32 = _buffer_bytes(INIT_BATCH, INIT_SEQ)
    assert fp32 == 24576

    # WHEN diagnosed at its peak
    data = _diagnose(str(run), capsys)
    assert data["kv_bytes"] == fp32
    # THEN fp8 buffers save 24 of the 32 bits the buffers held then, not 8 of the last buffers' 16
    fp8 = {(r["kind"], r["setting"]): r for r in data["remedies"]}[("quantized_kv", 8)]
    assert fp8["saved_bytes"] == fp32 * 3 // 4
    assert "of the 24.00 KiB held at 32 bits" in str(fp8["sentence"])
