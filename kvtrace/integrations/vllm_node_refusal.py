"""vLLM's CPU worker refusing a KV pool that its memory node cannot hold, recorded as a refused start.

The check that one request of max_model_len fits (`kv_cache_utils._check_enough_kv_cache_memory`, watched in
kvtrace.integrations.vllm) comes after another on CPU: `CPUWorker.determine_available_memory` raises when the
KV space asked (`kv_cache_memory_bytes`, which `VLLM_CPU_KVCACHE_SPACE` sets in GiB; else the share
`gpu_memory_utilization` asks of the node less what the process already holds) is more than the node has
free, or none is left. Without this watch such a run had no engine.json, and `kvtrace diagnose` read it as a
Hugging Face run. The wrapper records what vLLM compared, and its model's KV specs, so that the diagnosis can
say what one request of max_model_len needs beside what was asked and what the node had
(analyzers.planning.vllm_node_refused).

vLLM's message rounds to GiB; the node's figures are read again right after the check (the same call vLLM
makes), so they may differ from its message by what moved in between.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

__all__ = ["NODE_REFUSAL_KIND", "NodeMemoryWatch"]

NODE_REFUSAL_KIND = "node_memory"  # engine.json refused.kind
_MODULE = "vllm.v1.worker.cpu_worker"
_MARK = "on kv cache allocation is less than requested memory for kv"


class NodeMemoryWatch:
    """Wraps `CPUWorker.determine_available_memory` while installed (once its module is imported): on the
    node-memory refusal, `on_refused(refused, vllm_config)` gets vLLM's figures before the error goes on."""

    def __init__(self, on_refused: Callable[[dict[str, Any], Any], None]) -> None:
        self._on_refused = on_refused
        self._cls: Any = None
        self._original: Any = None
        self._wrapper: Any = None
        self._finder: Any = None

    def install(self) -> None:
        from kvtrace.integrations.vllm import after_import

        self._finder = after_import(_MODULE, self._patch)

    def uninstall(self) -> None:
        import sys

        if self._finder is not None:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self._finder)
            self._finder = None
        if self._cls is not None:
            if self._cls.__dict__.get("determine_available_memory") is self._wrapper:
                self._cls.determine_available_memory = self._original
            self._cls = None

    def _patch(self, module: Any) -> None:
        cls = getattr(module, "CPUWorker", None)
        if cls is None or self._cls is not None:
            return
        original, on_refused = cls.determine_available_memory, self._on_refused

        def determine_available_memory(worker: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return original(worker, *args, **kwargs)
            except ValueError as exc:
                if _MARK in str(exc):
                    with contextlib.suppress(Exception):
                        on_refused(node_refusal(module, worker, str(exc)), worker.vllm_config)
                raise

        self._cls, self._original, self._wrapper = cls, original, determine_available_memory
        cls.determine_available_memory = determine_available_memory


def node_refusal(module: Any, worker: Any, message: str) -> dict[str, Any]:
    """engine.json's `refused` for a pool the node cannot hold: what was asked, what the node had, and what
    one request of max_model_len takes by vLLM's own KV specs (its `max_memory_usage_bytes`)."""
    vllm_config = worker.vllm_config
    explicit = vllm_config.cache_config.kv_cache_memory_bytes
    requested_cpu = int(getattr(worker, "requested_cpu_memory", 0) or 0)
    refused: dict[str, Any] = {
        "message": message,
        "kind": NODE_REFUSAL_KIND,
        "max_model_len": int(vllm_config.model_config.max_model_len),
        "kv_cache_memory_bytes": int(explicit) if explicit is not None else None,
        "kv_cache_space_gib": _env_gib(),
        "requested_cpu_memory_bytes": requested_cpu,
        "needed_bytes": None,
        "available_bytes": None,
        "estimated_max_model_len": None,
    }
    with contextlib.suppress(Exception):
        node = module.get_allowed_cpu_list()[0].numa_node
        status = module.get_memory_node_info(node)
        refused["node"] = int(node)
        refused["node_available_bytes"] = int(status.available_memory)
        refused["node_total_bytes"] = int(status.total_memory)
    if explicit is not None:
        refused["requested_kv_bytes"] = int(explicit)
    else:  # vLLM's own arithmetic: the share of the node asked, less what the process holds already
        with contextlib.suppress(Exception):
            import psutil

            consumed = int(psutil.Process(os.getpid()).memory_info().rss)
            refused["consumed_bytes"] = consumed
            refused["requested_kv_bytes"] = requested_cpu - consumed
    with contextlib.suppress(Exception):
        from vllm.v1.core.kv_cache_utils import max_memory_usage_bytes

        specs = list(worker.get_kv_cache_spec().values())
        refused["needed_bytes"] = int(max_memory_usage_bytes(vllm_config, specs))
        refused["bytes_per_block"] = int(sum(spec.page_size_bytes for spec in specs))
    return refused


def _env_gib() -> int | None:
    """VLLM_CPU_KVCACHE_SPACE (GiB) where set: vLLM's platform turned it into kv_cache_memory_bytes."""
    value = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    return int(value) if value.strip().isdigit() else None
