"""Hand-written decoders whose KV the recorder reads without a transformers cache: module buffers in either
layout (gpt-fast's [batch, kv_heads, seq, head_dim], Meta's [batch, seq, kv_heads, head_dim]), and one
preallocated tensor kv[layers, 2, batch, kv_heads, seq, head_dim] whose per-layer views are tracked.

Every figure is the arithmetic of the tensors: layers x K,V x batch x KV heads x positions x head_dim x 4 B.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import kvtrace
from kvtrace.cli import main
from kvtrace.run_reader import read_run
from tests.one_tensor_decoder import OneTensorDecoder, Shape

LAYERS, DIM, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 3, 64, 4, 2, 16, 128
BATCH, MAX_SEQ, PROMPT, DECODE = 2, 32, 8, 5
FP32 = 4
LAYER_BYTES = BATCH * KV_HEADS * MAX_SEQ * HEAD_DIM * FP32  # one K (or V) buffer or view: 8,192 B
PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32  # 768 B per position of one row


class KvBuffers(torch.nn.Module):
    """A layer's cache buffers, registered under `names`, laid out `layout`: gpt-fast's KVCache for
    ("k_cache", "v_cache") and "bhsd"."""

    def __init__(self, names: tuple[str, str], layout: str, kv_heads_attr: bool) -> None:
        super().__init__()
        self.names, self.layout = names, layout
        if kv_heads_attr:
            self.n_kv_heads = KV_HEADS
        shape = (
            (BATCH, KV_HEADS, MAX_SEQ, HEAD_DIM) if layout == "bhsd" else (BATCH, MAX_SEQ, KV_HEADS, HEAD_DIM)
        )
        for name in names:
            self.register_buffer(name, torch.zeros(shape))

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [batch, kv_heads, tokens, head_dim]; returns the positions written so far, bhsd."""
        end = start_pos + k.shape[2]
        held = []
        for name, new in zip(self.names, (k, v), strict=True):
            buffer = getattr(self, name)
            if self.layout == "bhsd":
                buffer[:, :, start_pos:end] = new
                held.append(buffer[:, :, :end])
            else:
                buffer[:, start_pos:end] = new.transpose(1, 2)
                held.append(buffer[:, :end].transpose(1, 2))
        return held[0], held[1]


class BufferDecoder(torch.nn.Module):
    """Attention layers each owning a `KvBuffers`; forward(ids, start_pos) as Meta's reference code."""

    def __init__(self, names: tuple[str, str], layout: str, kv_heads_attr: bool = False) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.qkv = torch.nn.ModuleList(
            torch.nn.Linear(DIM, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False) for _ in range(LAYERS)
        )
        self.caches = torch.nn.ModuleList(KvBuffers(names, layout, kv_heads_attr) for _ in range(LAYERS))
        self.out = torch.nn.Linear(HEADS * HEAD_DIM, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, tokens = ids.shape
        h = self.emb(ids)
        for qkv, cache in zip(self.qkv, self.caches, strict=True):
            q, k, v = (
                t.view(rows, tokens, -1, HEAD_DIM).transpose(1, 2)
                for t in qkv(h).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
            )
            k, v = cache.update(start_pos, k, v)
            k, v = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=tokens > 1)
            h = h + y.transpose(1, 2).reshape(rows, tokens, -1)[..., :DIM]
        return self.out(h)


def _generate(model: torch.nn.Module) -> None:
    with torch.inference_mode():
        logits = model(torch.randint(0, VOCAB, (BATCH, PROMPT)), 0)
        for pos in range(PROMPT, PROMPT + DECODE):
            logits = model(logits[:, -1:].argmax(-1), pos)


def _report(path: Path, capsys: pytest.CaptureFixture[str], command: str = "report") -> dict[str, Any]:
    assert main([command, str(path), "--json", *(["--no-export"] if command == "report" else [])]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("names", "layout", "cache_attrs", "kv_heads_attr", "part"),
    [
        # gpt-fast's KVCache: k_cache and v_cache on one module are [batch, kv_heads, seq, head_dim]
        (("k_cache", "v_cache"), "bhsd", None, False, "buffer_bhsd"),
        # Meta's cache_k / cache_v: [batch, seq, kv_heads, head_dim], as module caches were always read
        (("cache_k", "cache_v"), "bshd", None, False, "buffer"),
        # names of the user's own, their layout said in cache_attrs
        (("kc", "vc"), "bhsd", {"kc": ("k", "bhsd"), "vc": ("v", "bhsd")}, False, "buffer_bhsd"),
        # unsaid, the module's KV heads count (2) tells which dim is the heads', against the names' convention
        (("k_cache", "v_cache"), "bshd", None, True, "buffer"),
        (("kc", "vc"), "bhsd", {"kc": "k", "vc": "v"}, True, "buffer_bhsd"),
    ],
)
def test_module_buffers_are_read_in_their_layout(
    tmp_path, watched_models, capsys, names, layout, cache_attrs, kv_heads_attr, part
):
    # GIVEN 3 layers of K and V buffers, 2 rows x 32 positions x 2 KV heads x 16 fp32, in `layout`
    torch.manual_seed(0)
    model = BufferDecoder(names, layout, kv_heads_attr).eval()
    watched_models.append(model)
    # WHEN 8 prompt tokens and 5 decode steps are recorded
    with kvtrace.record(tmp_path / "run", model=model, profiler=False, cache_attrs=cache_attrs):
        _generate(model)

    # THEN the buffers are logged in their layout
    run = read_run(tmp_path / "run")
    assert {e.part for e in run.kv_events if e.source == "module"} == {part}
    # AND their room is 2 rows x 32 positions, a position of a row 768 B: 3 x 2 x 2 heads x 16 x 4 B
    kv = _report(tmp_path / "run", capsys)["kv"]
    assert kv["final_bytes"] == LAYERS * 2 * LAYER_BYTES == 49152
    assert (kv["capacity_rows"], kv["capacity_tokens"], kv["capacity_of"]) == (BATCH, MAX_SEQ, "buffers")
    assert kv["bytes_per_token_measured"] == kv["final_bytes"] / (BATCH * MAX_SEQ) == PER_TOKEN == 768
    assert (kv["tokens_held"], kv["batch"]) == (PROMPT + DECODE, BATCH)  # each decode step writes 1
    # AND diagnose prices the context in the buffers' 32 positions
    remedies = _report(tmp_path / "run", capsys, "diagnose")["remedies"]
    context = next(r for r in remedies if r["kind"] == "context")
    assert f"max_seq_len={MAX_SEQ} positions" in context["sentence"]


@pytest.mark.parametrize("cut", [False, True], ids=["whole-views", "views-cut-to-tokens"])
def test_views_of_one_preallocated_tensor_are_split_by_layer(tmp_path, watched_models, capsys, cut):
    # GIVEN one kv[3, 2, 2, 2, 32, 16] fp32 tensor whose layers' K and V views are tracked: whole, as the
    # README's kvtrace.track(kv[l, 0], ...), or cut to the tokens written after each forward
    torch.manual_seed(0)
    model = OneTensorDecoder(Shape(LAYERS, DIM, HEADS, KV_HEADS, HEAD_DIM, VOCAB, BATCH, MAX_SEQ)).eval()
    watched_models.append(model)

    def track(end: int) -> None:
        for layer in range(LAYERS):
            for index, kind in enumerate("kv"):
                kvtrace.track(model.kv[layer, index, :, :, :end], layer=layer, kind=kind)

    with kvtrace.record(tmp_path / "run", model=model, profiler=False):
        track(MAX_SEQ)
        with torch.inference_mode():
            logits = model(torch.randint(0, VOCAB, (BATCH, PROMPT)), 0)
            for pos in range(PROMPT, PROMPT + DECODE):
                logits = model(logits[:, -1:].argmax(-1), pos)
                if cut:
                    track(pos + 1)

    # THEN the tensor is counted once, and each layer holds its own K and V views: 8,192 B each
    report = _report(tmp_path / "run", capsys)
    kv = report["kv"]
    assert kv["final_bytes"] == kv["peak_bytes"] == model.kv.nbytes == LAYERS * 2 * LAYER_BYTES == 49152
    assert [(row["layer"], row["k_bytes"], row["v_bytes"]) for row in kv["per_layer"]] == [
        (layer, LAYER_BYTES, LAYER_BYTES) for layer in range(LAYERS)
    ]
    # AND the tokens per row are the views' length: the 32 positions of whole views, which a note says are
    # the room preallocated; the 13 written for views cut to them
    held = PROMPT + DECODE if cut else MAX_SEQ
    assert kv["tokens_held"] == held
    notes = [note for note in report["notes"] if note.startswith("tokens per row")]
    assert notes == ([] if cut else [notes[0]])
    if not cut:
        assert f"tokens per row ({MAX_SEQ})" in notes[0] and "48.00 KiB" in notes[0]
    # AND diagnose gives each layer its views' 16 KiB at the peak, not the whole tensor to layer 0
    diagnosis = _report(tmp_path / "run", capsys, "diagnose")
    assert diagnosis["top_layers"] == [
        {"layer": layer, "kv_bytes": 2 * LAYER_BYTES} for layer in range(LAYERS)
    ]


@pytest.mark.parametrize("cut", [True, False], ids=["views-cut-to-tokens", "whole-buffers"])
def test_room_note_only_for_tracked_tensors_that_keep_their_length(tmp_path, capsys, cut):
    # GIVEN the README's advice followed on a plain tensor cache, no model: the tokens written in place each
    # step, then every layer's K and V tracked again, as views cut to them (kv[l, 0, :, :, :pos]) or as
    # whole preallocated per-layer buffers of MAX_SEQ positions
    kv = torch.zeros(LAYERS, 2, BATCH, KV_HEADS, MAX_SEQ, HEAD_DIM)
    buffers = [[torch.zeros(BATCH, KV_HEADS, MAX_SEQ, HEAD_DIM) for _ in "kv"] for _ in range(LAYERS)]
    written = PROMPT + DECODE
    with kvtrace.record(tmp_path / "run", profiler=False):
        for end in [PROMPT, *range(PROMPT + 1, written + 1)]:
            kv[..., :end, :] = 1.0
            for layer in range(LAYERS):
                for index, kind in enumerate("kv"):
                    if cut:
                        kvtrace.track(kv[layer, index, :, :, :end], layer=layer, kind=kind)
                    else:
                        buffers[layer][index][:, :, :end] = 1.0
                        kvtrace.track(buffers[layer][index], layer=layer, kind=kind)

    # THEN the KV held is the whole preallocated room either way: 3 layers x K,V x 8,192 B
    report = _report(tmp_path / "run", capsys)
    assert report["kv"]["final_bytes"] == LAYERS * 2 * LAYER_BYTES == 49152
    notes = [note for note in report["notes"] if note.startswith("tokens per row")]
    if cut:
        # AND the views' length is the 13 tokens written, which no note calls the room preallocated
        assert report["kv"]["tokens_held"] == written == 13
        assert notes == []
    else:
        # AND the whole buffers' length is their 32 positions, which the note says are the room preallocated
        assert report["kv"]["tokens_held"] == MAX_SEQ
        assert len(notes) == 1 and f"tokens per row ({MAX_SEQ})" in notes[0]
        assert "written in place" in notes[0]
