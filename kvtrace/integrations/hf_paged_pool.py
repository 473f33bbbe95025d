"""engine.json for transformers' continuous-batching pool (`PagedAttentionCache`): its figures, from the cache
object and the KV arithmetic. Split from hf_paged.py, which records the pool's life.

Two layouts: the sector pool (one flat uint8 `cache_tensor` cut into sectors, `cache_allocators`;
`pool_document`) and the older layer pool (transformers 5.17: `key_cache`/`value_cache`, one tensor per layer
of a layer group and kind, `[(num_blocks + 2) x block_size, kv_heads, head_dim]`, one `BlockManager`;
`layer_pool_document`). Both write the same fields where the figure exists, so the report reads either."""

from __future__ import annotations

from typing import Any

ENGINE_NAME = "transformers-cb"
LAYOUT = "BLKNHD"  # per block: each layer's K page then V page (block_size tokens, kv heads, head_dim)
# The layer pool: a tensor per layer and kind, each [blocks x block_size tokens, kv heads, head_dim]
LAYER_LAYOUT = "L2_BNHD"
LAYER_POOL_SOURCE = "key_value_cache"  # engine.json `pool_source` of the layer pool


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def pool_document(cache: Any, model: Any = None) -> dict[str, Any]:
    """engine.json for a `PagedAttentionCache`: the flat tensor is the pool (trash sectors included, as vLLM's
    null block is); a block is `page_size` tokens of every layer's K and V."""
    config = cache.config
    allocators = list(cache.cache_allocators.values())
    first = allocators[0]
    block_size = int(first.tokens_per_page)
    num_kv_heads, head_dim = int(first.num_key_value_heads), int(first.head_dim)
    num_layers = int(config.num_hidden_layers)
    element = int(cache.dtype.itemsize)
    bytes_per_block = num_layers * 2 * num_kv_heads * head_dim * block_size * element
    tensor = cache.cache_tensor
    storage = tensor.untyped_storage()
    pool_bytes = int(tensor.numel() * tensor.element_size())
    num_blocks = pool_bytes // bytes_per_block
    trash_bytes = pool_bytes - cache.num_sectors * cache.bytes_per_sector
    one_type = len(allocators) == 1 and getattr(first, "layer_type", "") == "full_attention"
    layers: list[dict[str, Any]] = []
    for layer in range(num_layers):
        entry: dict[str, Any] = {"layer": layer, "name": f"model.layers.{layer}.self_attn"}
        if one_type:  # each layer owns one K and one V page per block, interleaved with the other layers'
            page_bytes = 2 * num_kv_heads * head_dim * block_size * element
            entry.update(
                {
                    "shape": [num_blocks, 2, block_size, num_kv_heads, head_dim],
                    "dtype": _dtype_name(cache.dtype),
                    "bytes": num_blocks * page_bytes,
                    "storage_addr": storage.data_ptr(),
                    "view_offset": tensor.data_ptr() - storage.data_ptr() + layer * page_bytes,
                }
            )
        layers.append(entry)
    types = list(cache.cache_allocators)
    document = _document(cache, model, block_size, num_kv_heads, head_dim, types, str(tensor.device))
    document.update(
        {
            "num_blocks": num_blocks,
            "block_size": block_size,
            "bytes_per_block": bytes_per_block,
            "blocks_reserved": trash_bytes // bytes_per_block,  # the two trash sectors, never allocated
            "usable_blocks": int(cache.num_blocks),  # transformers' own capacity in whole-model blocks
            "bytes_per_sector": int(cache.bytes_per_sector),
            "num_sectors": int(cache.num_sectors),
            "kv_cache_bytes": pool_bytes,
            "layout": LAYOUT if one_type else None,
            "layers": layers,
            "storage": [
                {"addr": storage.data_ptr(), "bytes": int(storage.nbytes()), "device": str(tensor.device)}
            ],
            "pool_source": "cache_tensor",
        }
    )
    return document


def layer_pool_document(cache: Any, model: Any = None) -> dict[str, Any]:
    """engine.json for the layer pool (transformers 5.17): a block id names `block_size` rows of every tensor
    in `key_cache` and `value_cache` (one per layer of a layer group), so a block is those rows of all of
    them; the two padding blocks past `num_blocks` (read and write trash) count in the pool as the sector
    pool's trash sectors do. With one layer group, tensor j is layer j's K (V); with several (sliding and
    full attention), tensor j is shared by the j-th layer of each group and `layers` carry no shapes."""
    keys, values = list(cache.key_cache), list(cache.value_cache)
    block_size = int(cache.block_size)
    num_kv_heads, head_dim = int(cache.num_key_value_heads), int(cache.head_dim)
    element = int(cache.dtype.itemsize)
    bytes_per_block = len(keys) * 2 * num_kv_heads * head_dim * block_size * element
    tensors = keys + values
    storages: dict[int, dict[str, Any]] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages.setdefault(
            storage.data_ptr(),
            {"addr": storage.data_ptr(), "bytes": int(storage.nbytes()), "device": str(tensor.device)},
        )
    pool_bytes = sum(s["bytes"] for s in storages.values())
    num_blocks = pool_bytes // bytes_per_block if bytes_per_block else 0
    one_group = int(cache.num_groups) == 1
    layers: list[dict[str, Any]] = []
    for layer in range(int(cache.config.num_hidden_layers)):
        entry: dict[str, Any] = {"layer": layer, "name": f"model.layers.{layer}.self_attn"}
        if one_group:  # layer j's K is key_cache[j], its V value_cache[j]: a storage each
            key, value = keys[layer], values[layer]
            entry.update(
                {
                    "shape": [num_blocks, 2, block_size, num_kv_heads, head_dim],
                    "dtype": _dtype_name(key.dtype),
                    "bytes": int(key.nbytes + value.nbytes),
                    "storage_addr": key.untyped_storage().data_ptr(),
                    "view_offset": key.data_ptr() - key.untyped_storage().data_ptr(),
                    "v_storage_addr": value.untyped_storage().data_ptr(),
                }
            )
        layers.append(entry)
    attention_types = [
        _ALLOCATOR_TYPES.get(type(a).__name__, type(a).__name__) for a in cache.group_cache_managers
    ]
    document = _document(
        cache, model, block_size, num_kv_heads, head_dim, attention_types, str(keys[0].device)
    )
    document.update(
        {
            "num_blocks": num_blocks,
            "block_size": block_size,
            "bytes_per_block": bytes_per_block,
            # the padding blocks past transformers' `num_blocks` (read and write trash: 2), never allocated
            "blocks_reserved": max(num_blocks - int(cache.num_blocks), 0),
            "usable_blocks": int(cache.num_blocks),
            "kv_cache_bytes": pool_bytes,
            "layout": LAYER_LAYOUT if one_group else None,
            "layers": layers,
            "storage": list(storages.values()),
            "pool_source": LAYER_POOL_SOURCE,
        }
    )
    return document


# The layer pool's allocator classes, by the attention type each serves (`config.attention_types`)
_ALLOCATOR_TYPES = {
    "FullAttentionCacheAllocator": "full_attention",
    "SlidingAttentionCacheAllocator": "sliding_attention",
}


def _document(
    cache: Any,
    model: Any,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    attention_types: list[str],
    device: str,
) -> dict[str, Any]:
    """The fields both layouts write alike; the pool's own figures are added by the caller."""
    import transformers

    facts = _model_facts(cache.config, _dtype_name(cache.dtype))
    if model is not None and getattr(model, "config", None) is not None:
        facts["class"] = facts["class"] or type(model).__name__
        facts["num_params"] = sum(p.numel() for p in model.parameters())
    facts["num_kv_heads"] = num_kv_heads  # per device, under tensor parallelism
    facts["head_dim"] = head_dim
    return {
        "name": ENGINE_NAME,
        "version": transformers.__version__,
        "status": "ok",
        "process": "inproc",
        "model": facts,
        "config": {
            "block_size": block_size,
            "max_batch_tokens": cache.max_batch_tokens,
            "max_blocks_per_request": cache.max_blocks_per_request or None,
            "allow_block_sharing": bool(cache.allow_block_sharing),
            "attention_types": attention_types,
            "kv_cache_dtype": _dtype_name(cache.dtype),
            "device": device,
        },
        "kv_dtype": _dtype_name(cache.dtype),
        "memory_profile": {},
        "refused": None,
        # Written with the pool, so that a run whose process dies before its manifest counts the failed
        # requests still says its request log names each of them: none named is then none failed
        "failed_requests_logged": True,
    }


def _model_facts(config: Any, dtype: str) -> dict[str, Any]:
    """engine.json `model`, in the keys the vLLM integration writes (the report reads them alike)."""
    heads = getattr(config, "num_attention_heads", None)
    architectures = getattr(config, "architectures", None) or [None]
    return {
        "class": architectures[0],
        "model_type": getattr(config, "model_type", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "num_kv_heads": getattr(config, "num_key_value_heads", heads),
        "head_dim": None,
        "dtype": dtype,
        "num_attention_heads": heads,
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "intermediate_size": getattr(config, "intermediate_size", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "num_params": None,
    }
