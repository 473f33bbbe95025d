"""A hand-written decoder that keeps every layer's K and V in ONE preallocated tensor, as users' own code
does: kv[layers, 2, batch, kv_heads, max_seq, head_dim] ("bhsd") or kv[layers, 2, batch, max_seq, kv_heads,
head_dim] ("bshd"), written in place at `pos`. The tests track its views with `kvtrace.track`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    layers: int
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    batch: int
    max_seq: int


class OneTensorDecoder(torch.nn.Module):
    """The decoder; `layout` says how its one KV tensor is laid out."""

    def __init__(self, shape: Shape, layout: str = "bhsd") -> None:
        super().__init__()
        self.shape, self.layout = shape, layout
        s = shape
        self.emb = torch.nn.Embedding(s.vocab, s.dim)
        width = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(s.dim, width, bias=False) for _ in range(s.layers))
        self.out = torch.nn.Linear(s.heads * s.head_dim, s.vocab, bias=False)
        room = (s.kv_heads, s.max_seq) if layout == "bhsd" else (s.max_seq, s.kv_heads)
        self.kv = torch.zeros(s.layers, 2, s.batch, *room, s.head_dim)

    def view(self, layer: int, index: int, end: int, rows: int | None = None) -> torch.Tensor:
        """Layer `layer`'s K (0) or V (1) cut to its first `end` positions (and first `rows` rows; None:
        every row), in the tensor's layout."""
        if self.layout == "bhsd":
            return self.kv[layer, index, :rows, :, :end]
        return self.kv[layer, index, :rows, :end]

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        s = self.shape
        rows, tokens = ids.shape
        h = self.emb(ids)
        widths = [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim]
        for layer, qkv in enumerate(self.qkv):
            q, k, v = (t.view(rows, tokens, -1, s.head_dim).transpose(1, 2) for t in qkv(h).split(widths, -1))
            for index, new in enumerate((k, v)):
                if self.layout == "bhsd":
                    self.kv[layer, index, :rows, :, pos : pos + tokens] = new
                else:
                    self.kv[layer, index, :rows, pos : pos + tokens] = new.transpose(1, 2)
            held = (self.view(layer, index, pos + tokens, rows) for index in (0, 1))
            bhsd = (t if self.layout == "bhsd" else t.transpose(1, 2) for t in held)
            k, v = (t.repeat_interleave(s.heads // s.kv_heads, 1) for t in bhsd)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=tokens > 1)
            h = h + y.transpose(1, 2).reshape(rows, tokens, -1)[..., : s.dim]
        return self.out(h)
