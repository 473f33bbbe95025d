"""Record a Llama sharded by transformers' own tensor-parallel plan: one kvtrace run per rank.

    torchrun --nproc-per-node 2 examples/record_tensor_parallel.py runs/tp
    kvtrace report runs/tp          # the ranks side by side, the KV summed over them
    kvtrace report runs/tp/rank-0   # one rank: the cache of the KV heads it holds

A tiny Llama 3 (GQA: 8 query heads, 2 KV heads, random weights) on 2 ranks: each rank computes 1 KV head's
keys and values and caches only those. On CPUs the ranks talk over gloo; where CUDA is available, nccl,
one GPU per rank (LOCAL_RANK).

Two things differ from the usual `from_pretrained(name, tp_plan="auto")`: that call needs `accelerate`, so
the script shards a model built from a config with the same two steps it takes (`prepare_distribute_model`,
then `maybe_distribute_model`); and the embeddings are untied, since a tied `lm_head` does not shard
(`KeyError: 'lm_head.weight'`).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM
from transformers.distributed import DistributedConfig

import kvtrace
from kvtrace.llama import SIZES, build_model

PROMPT_TOKENS, NEW_TOKENS, BATCH = 8, 4, 2
# kvtrace's "tiny" Llama 3 (4 layers, 8 query heads, 2 KV heads of 16), untied, with a small vocabulary.
SIZE = dataclasses.replace(SIZES["tiny"], vocab_size=1024, tie_embeddings=False)


def main(out_dir: str) -> None:
    # transformers would start the process group itself; started here, the backend is ours to say:
    # nccl and this rank's GPU where CUDA is available, else gloo on the CPU.
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        # The device mesh over the ranks, then the model's `base_model_tp_plan` applied to it: q/k/v and
        # gate/up projections split by output rows, o and down by input columns (DTensor weights).
        plan = DistributedConfig(tp_plan="auto")
        distributed, _device_map, mesh = LlamaForCausalLM.prepare_distribute_model(plan)
        # The same seed on every rank: each shards the same random model.
        model = build_model(SIZE, device=str(device), seed=0)
        model = LlamaForCausalLM.maybe_distribute_model(model, distributed, mesh)

        # Every rank feeds the same tokens, as tensor parallelism requires.
        torch.manual_seed(1)
        input_ids = torch.randint(3, SIZE.vocab_size, (BATCH, PROMPT_TOKENS), device=device)
        # Each rank writes its own run, out_dir/rank-<r>/ (a job of one rank: out_dir itself).
        with kvtrace.record(out_dir, model=model) as recording:
            model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,  # random weights: never stop early at an end-of-text token
                do_sample=False,
            )
        # Every rank's run written before rank 0 names them, once for the job
        dist.barrier()
        if dist.get_rank() == 0 and dist.get_world_size() == 1:
            print(f"recorded {recording.path}; next: kvtrace report {recording.path}", flush=True)
        elif dist.get_rank() == 0:
            last = dist.get_world_size() - 1
            print(
                f"recorded one run per rank: {recording.path} to rank-{last}; "
                f"next: kvtrace report {out_dir} (the ranks side by side), "
                f"kvtrace report {recording.path} (one rank)",
                flush=True,
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tp")
