"""One rank of the run-group tests, started by tests/integration/test_ranks_*.py like torchrun starts a
rank: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK in the environment.

    python ranks_worker.py MODE OUT_DIR FACTS_DIR

MODE is `reference` (Meta's reference Llama 3, fairscale model parallel over gloo), `reference-raise`
(the same; the last rank's allocation fails inside `kvtrace.record()` after its last step),
`reference-kill` (the same; the last rank is SIGKILLed there instead), `hf-tp` (a Hugging Face Llama
sharded by its `tp_plan="auto"`; `hf-tp-profiled`: recorded with the profiler, its allocator events;
`hf-tp-bf16`: cast whole by `.to(torch.bfloat16)`, its rotary buffers too),
`hf-dp` (the whole model on every rank, each with its own batch),
`hf-dp-uneven` (the same, rank r with r + 2 rows of a PROMPT_LEN + 2r token prompt) or `track-bshd`
(Meta-style attention sharded by hand, its caches grown by torch.cat as [batch, seq, kv_heads, head_dim]
and given to `kvtrace.track`: OUT_DIR/said with `layout="bshd"`, OUT_DIR/unsaid without),
`hf-tp-replicated-kv` (a Hugging Face Llama of one KV head split by hand: each rank half the query heads
and a copy of the KV head), `hf-tp-raise-early` (`hf-tp`, the last rank's block raising after one decode
step), `hf-dp-overwrite` (`hf-dp` recorded with `overwrite=True`), `hf-dp-two-caches`
(`hf-dp`, rank 0 with two caches one after the other), `hf-dp-budget` (`hf-dp` with the profiler, recorded
with `gpu_memory=$KVTRACE_TEST_BUDGET`) or `hf-dp-kill-first` (`hf-dp`, the last rank
SIGKILLed first, rank 0 a second later), `hf-dp-raise-first` (`hf-dp`, the last rank's block raising
before its first allocation, the profiler on; `-bare`: recorded without the model; `hf-dp-raise-all-bare`:
every rank so), `module-dp-uneven` /
`module-dp-even` (a hand-written decoder with no geometry, data parallel; see ranks_module_dp.py). Each rank
writes FACTS_DIR/rank-<r>.json: what it measured on its own cache tensors, independently of kvtrace, for
the test to compare with `kvtrace report --json`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import kvtrace
from kvtrace.llama import cache_keyword

# Meta's reference shapes: 2 layers, 4 query heads and 2 KV heads of 16, preallocated for 2 x 64 tokens.
DIM, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB = 64, 2, 4, 2, 256
MAX_BATCH, MAX_SEQ = 2, 64
PROMPT_LEN, DECODE_STEPS = 6, 3


def reference_model() -> torch.nn.Module:
    import fairscale.nn.model_parallel.initialize as fs_init
    from llama_models.llama3.model import ModelArgs, Transformer

    fs_init.initialize_model_parallel(dist.get_world_size())
    torch.manual_seed(0)  # the same seed on every rank: each holds its own shard of the same random model
    args = ModelArgs(
        dim=DIM,
        n_layers=N_LAYERS,
        n_heads=N_HEADS,
        n_kv_heads=N_KV_HEADS,
        vocab_size=VOCAB,
        max_batch_size=MAX_BATCH,
        max_seq_len=MAX_SEQ,
    )
    model = Transformer(args).eval()
    with torch.no_grad():  # the reference code leaves its weights uninitialised (torch.empty)
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model


def reference_cache_facts(model: torch.nn.Module) -> dict[str, object]:
    """This rank's cache tensors, measured on the tensors themselves."""
    tensors = [getattr(block.attention, f"cache_{kv}") for block in model.layers for kv in ("k", "v")]
    return {
        "kv_bytes": sum(t.untyped_storage().nbytes() for t in tensors),
        "shapes": [list(t.shape) for t in tensors],
        "dtype_bytes": tensors[0].element_size(),
        "storages": len({t.untyped_storage().data_ptr() for t in tensors}),
        "parameters": sum(p.numel() for p in model.parameters()),  # this rank's shards and copies
    }


def run_reference(out_dir: Path, facts_dir: Path, failure: str = "") -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = reference_model()
    facts = {"rank": rank, **reference_cache_facts(model)}
    (facts_dir / f"rank-{rank}.json").write_text(json.dumps(facts))
    torch.manual_seed(1)  # the same tokens on every rank, as tensor parallelism requires
    tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN + DECODE_STEPS))
    failing = bool(failure) and rank == world_size - 1
    try:
        with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=False):
            model(tokens[:, :PROMPT_LEN], 0)
            for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
                model(tokens[:, pos : pos + 1], pos)
            if failing and failure == "kill":
                time.sleep(0.25)  # the writer thread flushes every 0.1 s: the last step is on disk
                os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer's way: no exception, no teardown
            if failing:
                # A real allocation failure, after the last collective so that no other rank waits on us:
                # the CPU allocator refuses 1 PiB.
                torch.empty(1 << 50, dtype=torch.uint8)
    except RuntimeError as exc:
        if not failing:
            raise
        (facts_dir / f"rank-{rank}.error").write_text(str(exc))
        sys.exit(3)


def hf_model(num_kv_heads: int = N_KV_HEADS) -> torch.nn.Module:
    """A tiny random Llama 3 of this file's shape, the same on every rank (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=DIM,
        intermediate_size=2 * DIM,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=num_kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_SEQ,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def hf_tensor_parallel_model() -> torch.nn.Module:
    """A tiny random Llama sharded by transformers' own tensor-parallel plan (`tp_plan="auto"`).

    `from_pretrained(..., tp_plan="auto")` needs `accelerate`, which kvtrace does not depend on; this is
    the same path without the checkpoint: `prepare_distribute_model` builds the device mesh over the
    process group, `maybe_distribute_model` applies the model's `base_model_tp_plan` (DTensor weights).
    """
    from transformers import LlamaForCausalLM
    from transformers.distributed import DistributedConfig

    plan = DistributedConfig(tp_plan="auto")
    distributed, _device_map, mesh = LlamaForCausalLM.prepare_distribute_model(plan)
    return LlamaForCausalLM.maybe_distribute_model(hf_model(), distributed, mesh)


def _record_steps(
    model: torch.nn.Module,
    out_dir: Path,
    rows: int,
    prompt: int = PROMPT_LEN,
    caches: int = 1,
    overwrite: bool = False,
    profiler: bool = False,
    gpu_memory: str | None = None,
) -> list[torch.Tensor]:
    """A prefill of `prompt` tokens and DECODE_STEPS single-token steps of `rows` rows, recorded, on each
    of `caches` caches in turn (each dropped when the next is made, as generate() drops its own); the last
    cache's K and V tensors afterwards."""
    from transformers import DynamicCache

    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (rows, prompt + DECODE_STEPS))
    recording = kvtrace.record(
        out_dir, model=model, profiler=profiler, overwrite=overwrite, gpu_memory=gpu_memory
    )
    with torch.no_grad(), recording:
        for _ in range(caches):
            cache = DynamicCache(config=model.config)
            model(input_ids=tokens[:, :prompt], **{cache_keyword(): cache}, use_cache=True)
            for pos in range(prompt, prompt + DECODE_STEPS):
                model(input_ids=tokens[:, pos : pos + 1], **{cache_keyword(): cache}, use_cache=True)
        _meet_other_jobs()
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _meet_other_jobs(timeout_s: float = 120.0) -> None:
    """With KVTRACE_TEST_MEET=DIR:N, wait inside the recording until N processes (of this job and another
    launched beside it) have reached this point, so that every rank's run spans a moment all of them share:
    two jobs recorded at the same time, whatever each one's start-up took."""
    said = os.environ.get("KVTRACE_TEST_MEET")
    if not said:
        return
    folder, count = said.rsplit(":", 1)
    meet = Path(folder)
    meet.mkdir(parents=True, exist_ok=True)
    (meet / f"{os.getpid()}").write_text("")
    deadline = time.monotonic() + timeout_s
    while len(list(meet.iterdir())) < int(count):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{meet}: the other job's ranks never came")
        time.sleep(0.05)


def run_hf_tensor_parallel(
    out_dir: Path, facts_dir: Path, profiler: bool = False, dtype: torch.dtype | None = None
) -> None:
    rank = dist.get_rank()
    model = hf_tensor_parallel_model()
    if dtype is not None:  # cast whole, buffers too (rotary inv_freq), as `.to()` does, not from_pretrained
        model = model.to(dtype)
    tensors = _record_steps(model, out_dir, MAX_BATCH, profiler=profiler)
    facts = {
        "rank": rank,
        "kv_bytes": sum(t.untyped_storage().nbytes() for t in tensors),
        "shapes": [list(t.shape) for t in tensors],
        "dtype_bytes": tensors[0].element_size(),
        "storages": len({t.untyped_storage().data_ptr() for t in tensors}),
        "weight_type": type(model.model.layers[0].self_attn.k_proj.weight).__name__,
        # the elements this rank holds: a DTensor's own shard (its numel() is the global size)
        "parameters": sum(
            p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()
        ),
        "buffers": {name: [b.numel(), str(b.dtype)] for name, b in model.named_buffers()},
    }
    (facts_dir / f"rank-{rank}.json").write_text(json.dumps(facts))


def run_hf_tensor_parallel_raised_early(out_dir: Path, facts_dir: Path) -> None:
    """Tensor parallelism; the last rank's block raises after the prefill and one decode step, so its run
    holds 2 tokens fewer than rank 0's; it runs the other steps unrecorded, as rank 0's collectives need."""
    from transformers import DynamicCache

    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = hf_tensor_parallel_model()
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN + DECODE_STEPS))
    cache = DynamicCache(config=model.config)
    stop = PROMPT_LEN + 1 if rank == world_size - 1 else PROMPT_LEN + DECODE_STEPS
    held = 0
    with torch.no_grad():
        try:
            with kvtrace.record(out_dir, model=model, profiler=False):
                model(input_ids=tokens[:, :PROMPT_LEN], **{cache_keyword(): cache}, use_cache=True)
                for pos in range(PROMPT_LEN, stop):
                    model(input_ids=tokens[:, pos : pos + 1], **{cache_keyword(): cache}, use_cache=True)
                held = cache.layers[0].keys.shape[-2]
                if stop < PROMPT_LEN + DECODE_STEPS:
                    raise RuntimeError(f"stopped on rank {rank} after {held} tokens")
        except RuntimeError as exc:
            (facts_dir / f"rank-{rank}.error").write_text(str(exc))
        for pos in range(stop, PROMPT_LEN + DECODE_STEPS):
            model(input_ids=tokens[:, pos : pos + 1], **{cache_keyword(): cache}, use_cache=True)
    (facts_dir / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "tokens": held}))


def run_hf_tensor_parallel_replicated_kv(out_dir: Path, facts_dir: Path) -> None:
    """Tensor parallelism over more ranks than KV heads, split by hand as vLLM and Megatron split Llama 3
    70B at TP 16: a model of one KV head, each rank its share of the query heads (q_proj rows, o_proj
    columns, summed over the ranks after o_proj) and a copy of the KV head. Every rank, the same rows."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = hf_model(num_kv_heads=1)
    heads = N_HEADS // world_size
    share = slice(rank * heads * (DIM // N_HEADS), (rank + 1) * heads * (DIM // N_HEADS))
    for layer in model.model.layers:
        attention = layer.self_attn
        attention.q_proj.weight.data = attention.q_proj.weight.data[share].clone()
        attention.o_proj.weight.data = attention.o_proj.weight.data[:, share].clone()
        attention.num_key_value_groups = heads  # this rank's query heads share the one KV head
        attention.o_proj.register_forward_hook(lambda _module, _args, out: dist.all_reduce(out))
    tensors = _record_steps(model, out_dir, MAX_BATCH)
    facts = {
        "rank": rank,
        "kv_bytes": sum(t.untyped_storage().nbytes() for t in tensors),
        "shapes": [list(t.shape) for t in tensors],
        "q_proj_shape": list(model.model.layers[0].self_attn.q_proj.weight.shape),
    }
    (facts_dir / f"rank-{rank}.json").write_text(json.dumps(facts))


def run_hf_data_parallel_killed(out_dir: Path, facts_dir: Path) -> None:
    """Data parallelism; the last rank is SIGKILLed inside record() (the OOM killer's way), then rank 0
    a second later (a launcher stops the other ranks once one dies): neither leaves an `ended`."""
    from transformers import DynamicCache

    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = hf_model()
    torch.manual_seed(rank)
    tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN + DECODE_STEPS + 1))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=False):
        model(input_ids=tokens[:, :PROMPT_LEN], **{cache_keyword(): cache}, use_cache=True)
        for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
            model(input_ids=tokens[:, pos : pos + 1], **{cache_keyword(): cache}, use_cache=True)
        dist.barrier()  # from here both ranks keep time together
        if rank != world_size - 1:
            time.sleep(1.0)
            pos = PROMPT_LEN + DECODE_STEPS
            model(input_ids=tokens[:, pos : pos + 1], **{cache_keyword(): cache}, use_cache=True)
        time.sleep(0.25)  # the writer thread flushes every 0.1 s: the last step is on disk
        (facts_dir / f"rank-{rank}.killed").write_text(str(time.time_ns()))
        os.kill(os.getpid(), signal.SIGKILL)


def run_hf_data_parallel_raised_first(
    out_dir: Path, facts_dir: Path, bare: bool = False, every_rank: bool = False
) -> None:
    """Data parallelism; the last rank's block raises at once, before its first allocation, with the
    profiler on (record()'s default; `bare`: recorded without the model, so no weights table); the others
    record their steps (`every_rank`: they raise as it does). Each rank writes its model's parameter and
    buffer storage bytes, counted on it."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = hf_model()
    tensors = [*model.parameters(), *model.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    if rank != world_size - 1 and not every_rank:
        _record_steps(model, out_dir, rank + 1)
    else:
        try:
            with kvtrace.record(out_dir, model=None if bare else model):
                raise RuntimeError(f"stopped on rank {rank} before generate")
        except RuntimeError as exc:
            (facts_dir / f"rank-{rank}.error").write_text(str(exc))
    (facts_dir / f"rank-{rank}.json").write_text(
        json.dumps({"rank": rank, "weights": sum(storages.values())})
    )


def run_hf_data_parallel(
    out_dir: Path,
    facts_dir: Path,
    uneven: bool = False,
    overwrite: bool = False,
    two_caches: bool = False,
    gpu_memory: str | None = None,
) -> None:
    """Data parallelism: every rank the whole model, its own batch (rank r: r + 1 rows; `uneven`: r + 2
    rows of a PROMPT_LEN + 2r token prompt, so the ranks hold different token counts; `two_caches`: rank
    0 fills two caches in turn, rank 1 one)."""
    rank = dist.get_rank()
    rows, prompt = (rank + 2, PROMPT_LEN + 2 * rank) if uneven else (rank + 1, PROMPT_LEN)
    caches = 2 if two_caches and rank == 0 else 1
    profiler = gpu_memory is not None  # a budget is crossed on the allocator's events
    tensors = _record_steps(
        hf_model(),
        out_dir,
        rows,
        prompt,
        caches=caches,
        overwrite=overwrite,
        profiler=profiler,
        gpu_memory=gpu_memory,
    )
    facts = {
        "rank": rank,
        "kv_bytes": sum(t.untyped_storage().nbytes() for t in tensors),
        "rows": rows,
        "tokens": tensors[0].shape[-2],
    }
    (facts_dir / f"rank-{rank}.json").write_text(json.dumps(facts))


class ShardedAttention(torch.nn.Module):
    """Meta's reference attention, sharded by hand: this rank's share of the KV heads, its cache grown by
    torch.cat in Meta's layout [batch, seq, kv_heads, head_dim] (as flash-attn holds it) and tracked."""

    def __init__(self, layer: int, world_size: int, layout: str | None) -> None:
        super().__init__()
        self.layer, self.layout = layer, layout
        self.heads, self.kv_heads = N_HEADS // world_size, N_KV_HEADS // world_size
        self.head_dim = DIM // N_HEADS
        self.wq = torch.nn.Linear(DIM, self.heads * self.head_dim, bias=False)
        self.wk = torch.nn.Linear(DIM, self.kv_heads * self.head_dim, bias=False)
        self.wv = torch.nn.Linear(DIM, self.kv_heads * self.head_dim, bias=False)
        self.wo = torch.nn.Linear(self.heads * self.head_dim, DIM, bias=False)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, length, _ = x.shape
        q = self.wq(x).view(rows, length, self.heads, self.head_dim)
        k = self.wk(x).view(rows, length, self.kv_heads, self.head_dim)
        v = self.wv(x).view(rows, length, self.kv_heads, self.head_dim)
        self.keys = k if self.keys is None else torch.cat([self.keys, k], 1)
        self.values = v if self.values is None else torch.cat([self.values, v], 1)
        said = {"layout": self.layout} if self.layout else {}
        kvtrace.track(self.keys, layer=self.layer, kind="k", **said)
        kvtrace.track(self.values, layer=self.layer, kind="v", **said)
        group = self.heads // self.kv_heads
        keys = self.keys.repeat_interleave(group, 2).transpose(1, 2)
        values = self.values.repeat_interleave(group, 2).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, is_causal=length > 1
        )
        out = self.wo(out.transpose(1, 2).reshape(rows, length, -1))
        dist.all_reduce(out)
        return out


class ShardedTransformer(torch.nn.Module):
    """The layers above with Meta's `params`, from which kvtrace reads the model's geometry."""

    def __init__(self, world_size: int, layout: str | None) -> None:
        super().__init__()
        self.params = types.SimpleNamespace(
            n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, dim=DIM, vocab_size=VOCAB
        )
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.layers = torch.nn.ModuleList(ShardedAttention(i, world_size, layout) for i in range(N_LAYERS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        for layer in self.layers:
            hidden = hidden + layer(hidden)
        return hidden


def run_tracked_bshd(out_dir: Path, facts_dir: Path) -> None:
    """Tensor parallel by hand, recorded twice: with `layout="bshd"` said, and without."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    facts: dict[str, object] = {"rank": rank}
    for name, layout in (("said", "bshd"), ("unsaid", None)):
        torch.manual_seed(0)
        model = ShardedTransformer(world_size, layout).eval()
        torch.manual_seed(1)  # the same tokens on every rank, as tensor parallelism requires
        tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN + DECODE_STEPS))
        with torch.no_grad(), kvtrace.record(out_dir / name, model=model, profiler=False):
            model(tokens[:, :PROMPT_LEN])
            for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
                model(tokens[:, pos : pos + 1])
        tensors = [t for layer in model.layers for t in (layer.keys, layer.values)]
        facts[name] = {
            "kv_bytes": sum(t.untyped_storage().nbytes() for t in tensors),
            "shapes": [list(t.shape) for t in tensors],
        }
    (facts_dir / f"rank-{rank}.json").write_text(json.dumps(facts))


def launch(
    mode: str, out_dir: Path, facts_dir: Path, world_size: int = 2, timeout_s: float = 180.0
) -> list[int]:
    """Start `world_size` ranks of this script the way torchrun does (env://, one process per rank) and
    wait for all of them; their exit statuses, in rank order. Each rank's output goes to FACTS_DIR."""
    import socket
    import subprocess

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    facts_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
        )
        log = open(facts_dir / f"rank-{rank}.log", "w")  # noqa: SIM115 - closed with the process
        cmd = [sys.executable, __file__, mode, str(out_dir), str(facts_dir)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    statuses = []
    try:
        for proc, _log in procs:
            statuses.append(proc.wait(timeout=timeout_s))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return statuses


def launch_facts(mode: str, out_dir: Path, facts_dir: Path, world_size: int = 2) -> list[dict[str, Any]]:
    """`launch`, asserting every rank exited 0 (else the ranks' last output is the failure's message); each
    rank's facts, in rank order."""
    statuses = launch(mode, out_dir, facts_dir, world_size)
    logs = "".join((facts_dir / f"rank-{r}.log").read_text()[-3000:] for r in range(world_size))
    assert statuses == [0] * world_size, logs
    return [json.loads((facts_dir / f"rank-{r}.json").read_text()) for r in range(world_size)]


def main() -> None:
    mode, out_dir, facts_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if mode in ("reference", "reference-raise", "reference-kill"):
            run_reference(out_dir, facts_dir, failure=mode.removeprefix("reference").lstrip("-"))
        elif mode in ("hf-tp", "hf-tp-profiled", "hf-tp-bf16"):
            bf16 = torch.bfloat16 if mode == "hf-tp-bf16" else None
            run_hf_tensor_parallel(out_dir, facts_dir, profiler=mode == "hf-tp-profiled", dtype=bf16)
        elif mode == "hf-tp-replicated-kv":
            run_hf_tensor_parallel_replicated_kv(out_dir, facts_dir)
        elif mode == "hf-tp-raise-early":
            run_hf_tensor_parallel_raised_early(out_dir, facts_dir)
        elif mode in ("hf-dp", "hf-dp-uneven", "hf-dp-overwrite", "hf-dp-two-caches", "hf-dp-budget"):
            run_hf_data_parallel(
                out_dir,
                facts_dir,
                uneven=mode == "hf-dp-uneven",
                overwrite=mode == "hf-dp-overwrite",
                two_caches=mode == "hf-dp-two-caches",
                gpu_memory=os.environ.get("KVTRACE_TEST_BUDGET") if mode == "hf-dp-budget" else None,
            )
        elif mode == "hf-dp-kill-first":
            run_hf_data_parallel_killed(out_dir, facts_dir)
        elif mode in ("hf-dp-raise-first", "hf-dp-raise-first-bare", "hf-dp-raise-all-bare"):
            run_hf_data_parallel_raised_first(
                out_dir, facts_dir, bare=mode.endswith("-bare"), every_rank=mode == "hf-dp-raise-all-bare"
            )
        elif mode == "track-bshd":
            run_tracked_bshd(out_dir, facts_dir)
        elif mode in ("module-dp-uneven", "module-dp-even"):
            from ranks_module_dp import run_module_data_parallel

            run_module_data_parallel(out_dir, facts_dir, uneven=mode == "module-dp-uneven")
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        if mode not in ("reference-raise", "reference-kill", "hf-dp-kill-first"):
            # Both ranks leave together: a rank tearing gloo down while its peer still talks to it can
            # abort at exit ("terminate called without an active exception", status -6).
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # Everything is written and closed by now. Leave without C++ static destructors, which sometimes
    # abort at interpreter exit after gloo ("terminate called without an active exception", status -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
