"""The room behind a tracked tensor: the positions a row of its storage holds (the recorder reads it from the
view's strides) and the capacity the analyzers take from the log's lines, on small hand-made inputs."""

from __future__ import annotations

import torch

from analyzers.kv_log import analyze_kv_log
from analyzers.kv_views import tracked_capacity, tracked_length_note
from kvtrace.format import TRACK_CACHE_ID, KvEvent
from kvtrace.kv_slots import seq_room, with_room

LAYERS, BATCH, HEADS, MAX_SEQ, HEAD_DIM = 2, 2, 2, 64, 16


def test_a_view_cut_from_one_tensor_has_its_max_seq_in_either_layout() -> None:
    bhsd = torch.zeros(LAYERS, 2, BATCH, HEADS, MAX_SEQ, HEAD_DIM)
    bshd = torch.zeros(LAYERS, 2, BATCH, MAX_SEQ, HEADS, HEAD_DIM)
    # the last layer's V too: its room ends where the storage does
    assert seq_room(bhsd[1, 1, :, :, :13], -2) == MAX_SEQ
    assert seq_room(bshd[1, 1, :, :13], 1) == MAX_SEQ
    # a Meta-layout buffer read as [batch, heads, seq, dim] through a transpose: the same room
    assert seq_room(bshd[0, 0, :, :13].transpose(1, 2), -2) == MAX_SEQ


def test_a_tensor_of_its_own_or_without_an_outer_dim_has_its_length() -> None:
    assert seq_room(torch.zeros(BATCH, HEADS, 13, HEAD_DIM), -2) == 13  # grown by torch.cat
    assert seq_room(torch.zeros(LAYERS, 2, 1, 1, MAX_SEQ, HEAD_DIM)[0, 0, 0, 0, :13], -2) == 13
    assert seq_room(torch.zeros(5), -1) == 0


def test_only_a_tracked_line_shorter_than_its_room_says_it() -> None:
    view = torch.zeros(LAYERS, 2, BATCH, HEADS, MAX_SEQ, HEAD_DIM)[0, 0, :, :, :13]
    assert with_room('{"seq":1}', view, "tracked") == '{"seq":1,"capacity_tokens":64}'
    assert with_room('{"seq":1}', view, "data") == '{"seq":1}'
    assert with_room('{"seq":1}', torch.zeros(BATCH, HEADS, 13, HEAD_DIM), "tracked") == '{"seq":1}'


def _view(seq: int, layer: int, kv: str, tokens: int, room: int, event: str = "created") -> KvEvent:
    """A bhsd view of layer `layer`'s K or V of one 65,536 B tensor, `tokens` long, `room` positions a row."""
    offset = (layer * 2 + (kv == "v")) * BATCH * HEADS * MAX_SEQ * HEAD_DIM * 4
    return KvEvent(
        seq=seq, t_ns=seq * 1000, step=seq, phase="", event=event, layer=layer, kv=kv, part="tracked",
        addr=0x1000, storage_bytes=65536, view_offset=offset, shape=[BATCH, HEADS, tokens, HEAD_DIM],
        logical_bytes=BATCH * HEADS * tokens * HEAD_DIM * 4, dtype="float32", device="cpu", tokens=tokens,
        prev_addr=0x1000 if event == "written" else 0, cache=TRACK_CACHE_ID, source="track",
        capacity_tokens=room,
    )  # fmt: skip


def _views(tokens: int, room: int, first: int = 1) -> list[KvEvent]:
    event = "created" if first == 1 else "written"
    return [
        _view(first + 2 * layer + (kv == "v"), layer, kv, tokens, room, event)
        for layer in range(LAYERS)
        for kv in "kv"
    ]


def test_views_cut_to_the_tokens_give_the_room_they_logged() -> None:
    # GIVEN each layer's K and V views cut to 8 tokens, then to 9, each line saying 64 positions of room
    events = _views(8, MAX_SEQ) + _views(9, MAX_SEQ, first=5)
    # THEN the cache's capacity is 2 rows x 64 positions, and no note calls the 9 tokens the room
    (cache,) = analyze_kv_log(events).caches
    assert (cache.capacity_rows, cache.capacity_tokens, cache.capacity_of) == (BATCH, MAX_SEQ, "tracked")
    assert tracked_length_note(events, 9) is None


def test_whole_views_give_their_length_and_grown_tensors_none() -> None:
    # views that make up the whole tensor: their length is its room (no line says more)
    assert tracked_capacity(_views(MAX_SEQ, 0), MAX_SEQ) == MAX_SEQ
    # each layer's own tensor, grown by torch.cat (a new storage each time): no room
    grown = [
        KvEvent(seq=i + 1, t_ns=i, step=1, phase="", event="created", layer=i, kv="k", part="tracked",
                addr=0x1000 + i * 0x1000, storage_bytes=2048, shape=[2, 2, 8, 16], logical_bytes=2048,
                tokens=8, cache=TRACK_CACHE_ID, source="track")
        for i in range(LAYERS)
    ]  # fmt: skip
    assert tracked_capacity(grown, 8) == 0
    (cache,) = analyze_kv_log(grown).caches
    assert (cache.capacity_rows, cache.capacity_tokens, cache.capacity_of) == (0, 0, "")
