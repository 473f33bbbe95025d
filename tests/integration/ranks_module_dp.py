"""Data parallelism of a hand-written decoder, one rank of it, started by ranks_worker.py: every rank the
whole model, its own rows, no collective inside the model. Its attention keeps its K and V as module
attributes grown by torch.cat ([batch, kv_heads, seq, head_dim]), found by kvtrace's module-cache scan,
which reads the tokens they hold from the forward's `start_pos` (Meta's convention). The model has no
config and no `params`, so the run's manifest gives no geometry (no `num_kv_heads`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kvtrace

LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 3, 4, 2, 8, 100
PROMPT_LEN = 6


class CatAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        width = HEADS * HEAD_DIM
        self.q = nn.Linear(width, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(width, KV_HEADS * HEAD_DIM, bias=False)
        self.v = nn.Linear(width, KV_HEADS * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, width, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, length, _ = x.shape
        q = self.q(x).view(rows, length, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(x).view(rows, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(rows, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
        self.k_cache = k if self.k_cache is None else torch.cat([self.k_cache, k], 2)
        self.v_cache = v if self.v_cache is None else torch.cat([self.v_cache, v], 2)
        group = HEADS // KV_HEADS
        keys, values = self.k_cache.repeat_interleave(group, 1), self.v_cache.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=length > 1)
        return self.o(out.transpose(1, 2).reshape(rows, length, -1))


class CatDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HEADS * HEAD_DIM)
        self.layers = nn.ModuleList(CatAttention() for _ in range(LAYERS))
        self.head = nn.Linear(HEADS * HEAD_DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        hidden = self.embed(tokens)
        for layer in self.layers:
            hidden = hidden + layer(hidden, start_pos)
        return self.head(hidden)


def run_module_data_parallel(out_dir: Path, facts_dir: Path, uneven: bool) -> None:
    """Rank r: 2 + r rows and 4 + r decode steps when `uneven` (different rows and tokens), else 2 rows and
    4 steps on every rank (the same shape of work, other tokens). Facts: the rank's rows, tokens and cache
    bytes, measured on its tensors."""
    rank = dist.get_rank()
    rows, decode = (2 + rank, 4 + rank) if uneven else (2, 4)
    torch.manual_seed(0)
    model = CatDecoder().eval()
    torch.manual_seed(1 + rank)  # each rank its own sequences
    tokens = torch.randint(0, VOCAB, (rows, PROMPT_LEN + decode))
    with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=False):
        model(tokens[:, :PROMPT_LEN], 0)
        for pos in range(PROMPT_LEN, PROMPT_LEN + decode):
            model(tokens[:, pos : pos + 1], pos)
    tensors = [t for layer in model.layers for t in (layer.k_cache, layer.v_cache)]
    facts = {
        "rank": rank,
        "rows": rows,
        "tokens": tensors[0].shape[2],
        "kv_bytes": sum(t.untyped_storage().nbytes() for t in tensors),
        "shapes": [list(t.shape) for t in tensors],
    }
    (facts_dir / f"rank-{rank}.json").write_text(json.dumps(facts))
