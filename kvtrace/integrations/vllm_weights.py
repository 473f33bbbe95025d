"""vLLM: the model's weights as a worker holds them, and the buffers vLLM keeps beside them.

A parameters + buffers sum is wrong on vLLM's CPU build: after loading, `dispatch_cpu_unquantized_gemm`
(vllm/model_executor/layers/utils.py) hands each linear layer's weight to a packed tensor or a oneDNN
handle captured by the layer's `cpu_linear` closure and replaces `layer.weight` with an empty tensor, so the
linear weights are in no parameter; and the rotary embedding's `cos_sin_cache` (max_position x rotary_dim,
16 MiB for a Llama 3 of head_dim 64 in bfloat16) is a buffer vLLM computes, not a weight. On CUDA the
weights stay parameters. What is counted is decided by what each layer holds, not by the device:

- weights: every parameter that holds data (storage once: a tied lm_head counts once), and for a layer whose
  weight was emptied, what its `cpu_linear` holds instead (a tensor's storage; a oneDNN handle's k x n in
  the layer's dtype, the memory it reorders the weight into);
- buffers: the modules' buffers (rotary cache, attention scales) and the copies `cpu_linear` keeps of a
  weight that stays a parameter (the packed copy of an lm_head tied to the embedding);
- parameters: the checkpoint's count, from the layers' declared full sizes (all tensor-parallel ranks,
  vocabulary without vLLM's padding), since a rank holds a share of them and the CPU layers none.

A speculative drafter's model (a draft model, an EAGLE or MTP head: `runner.drafter.model`) is loaded on the
same worker and counted with the target's, after it: what the drafter shares with the target (an EAGLE head's
lm_head, an MTP head's embedding, a rotary cache vLLM reuses) counts once, as the target's; what is left is
the drafter's own share. Its parameters stay out of `num_params`, which names the target's checkpoint.
"""

from __future__ import annotations

from typing import Any


def _closure_values(function: Any) -> list[Any]:
    """The objects a `cpu_linear` closure captured (a bound or builtin function captures none)."""
    values = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return values


def _held_by_cpu_linear(module: Any, element_size: int, seen: set[int]) -> int | None:
    """Bytes the module's `cpu_linear` holds that no parameter holds (each storage once, recorded in `seen`);
    None when it holds nothing kvtrace can see (no `cpu_linear`, or plain `torch.nn.functional.linear`)."""
    import torch

    held, found = 0, False
    for value in _closure_values(getattr(module, "cpu_linear", None)):
        if isinstance(value, torch.Tensor):
            found = True
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                held += storage.nbytes()
        elif hasattr(value, "handler_tensor") and isinstance(getattr(value, "k", None), int):
            # vLLM's CPUDNNLGEMMHandler: oneDNN keeps the [k, n] weight in its own memory
            found = True
            held += int(value.k) * int(value.n) * element_size
    return held if found else None


def _full_numel(module: Any, name: str, param: Any) -> int:
    """A parameter's count in the checkpoint: vLLM's vocabulary and linear layers declare their full sizes
    (a rank holds a share, a CPU linear layer none); other parameters are counted as held."""
    if name == "weight" and hasattr(module, "org_vocab_size") and hasattr(module, "embedding_dim"):
        return int(module.org_vocab_size) * int(module.embedding_dim)  # without vLLM's padding
    if name in ("weight", "bias") and hasattr(module, "input_size") and hasattr(module, "output_size"):
        output = int(module.output_size)
        if hasattr(module, "total_num_kv_heads") and hasattr(module, "total_num_heads"):
            # QKV: output_size counts KV heads replicated over ranks when there are fewer than ranks
            head, v_head = int(module.head_size), int(getattr(module, "v_head_size", module.head_size))
            output = module.total_num_heads * head + module.total_num_kv_heads * (head + v_head)
        return output * int(module.input_size) if name == "weight" else output
    return int(param.numel())


def _held_by(
    model: Any, seen: set[int], visited: set[int], counted: set[int]
) -> tuple[dict[str, int], int, int]:
    """(each parameter's checkpoint count by its qualified name, weights bytes, buffers bytes) of `model` not
    already counted: `seen` holds the storages, `visited` the modules (a drafter may hold the target's
    embedding or lm_head module itself, whose oneDNN handle has no storage to tell it by), `counted` the
    parameters."""
    numels: dict[str, int] = {}
    weights = buffers = 0
    named = [(prefix, module) for prefix, module in model.named_modules() if id(module) not in visited]
    visited.update(id(module) for _, module in named)
    modules = [module for _, module in named]
    for prefix, module in named:
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in counted:
                counted.add(id(param))
                numels[f"{prefix}.{name}" if prefix else name] = _full_numel(module, name, param)
            if param.numel():
                storage = param.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    weights += storage.nbytes()
    for module in modules:
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(weight, "element_size"):
            continue
        held = _held_by_cpu_linear(module, weight.element_size(), seen)
        if weight.numel():
            buffers += held or 0  # a copy beside a weight that stays a parameter
        elif held is not None:
            weights += held
        elif hasattr(module, "input_size_per_partition") and hasattr(module, "output_size_per_partition"):
            # emptied, and held out of kvtrace's sight: the layer's declared share, in its dtype
            share = int(module.input_size_per_partition) * int(module.output_size_per_partition)
            weights += share * weight.element_size()
    for tensor in model.buffers():
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            buffers += storage.nbytes()
    return numels, weights, buffers


def drafter_model(runner: Any) -> Any:
    """A speculative drafter's model (a draft model, an EAGLE or MTP head) as the runner holds it, unwrapped
    from a CUDA graph wrapper; None without one, or with one that has no model (n-gram)."""
    model = getattr(getattr(runner, "drafter", None), "model", None)
    if model is not None and not hasattr(model, "modules") and hasattr(model, "unwrap"):
        model = model.unwrap()
    return model if hasattr(model, "modules") else None


def weight_facts(model: Any, drafter: Any = None) -> dict[str, Any]:
    """`num_params` (the target checkpoint's: it names the model), `param_numels` (the same by parameter
    name: a pipeline stage holds some layers only, and the stages' names, a tied embedding on the first and
    last, add up to the checkpoint once), `weights_bytes` and `buffers_bytes` (all this worker holds, a
    drafter's with the target's: each storage once, so an EAGLE head's embedding or lm_head shared with the
    target counts once), `draft_weights_bytes` (the drafter's own share; 0 without one)."""
    seen: set[int] = set()  # storages counted, the target's first
    visited: set[int] = set()  # modules walked
    counted: set[int] = set()  # parameters counted (a tied one is reachable from two modules)
    numels, weights, buffers = _held_by(model, seen, visited, counted)
    draft_weights = 0
    if drafter is not None:
        _, draft_weights, draft_buffers = _held_by(drafter, seen, visited, counted)
        weights += draft_weights
        buffers += draft_buffers
    return {
        "num_params": sum(numels.values()),
        "param_numels": numels,
        "weights_bytes": weights,
        "buffers_bytes": buffers,
        "draft_weights_bytes": draft_weights,
    }
