"""K/V storages the cache replaced that something outside it holds at the moment, and what dropping them
frees: a loop of one's own that keeps every step's `(layer.keys, layer.values)` holds all the copies a
DynamicCache's torch.cat replaced (`analyzers.kv_kept`). The KV log counts them as KV, so the cache's own
remedies price them too; dropping the references frees them at no cost. Pure, torch-free.
"""

from __future__ import annotations

from analyzers.kv_kept import KeptStorages, kept_storages
from analyzers.model import MemorySource
from analyzers.planning.diagnosis import Remedy
from analyzers.planning.grad_steps import grad_steps
from analyzers.units import human_bytes

__all__ = ["REMEDY", "kept_kv", "kept_kv_note", "kept_kv_remedy"]

REMEDY = "kept_kv"


def kept_kv(source: MemorySource, when_us: float | None) -> KeptStorages | None:
    """The replaced storages live and held from outside at the moment (`when_us`, the timeline's clock:
    the KV log's `t_ns` / 1000); None where none are, for a run with grad enabled (the graph keeps them:
    `no_grad` prices that) and for one still being recorded or that died (its last frees unwritten)."""
    run = source.meta.get("run")
    ended = (source.meta.get("manifest") or {}).get("ended") or {}
    if run is None or not run.kv_events or when_us is None or ended.get("status") == "running":
        return None
    if grad_steps(source):
        return None
    kept = kept_storages(run.kv_events, until_ns=int(when_us * 1000))
    return kept if kept.count else None


def kept_kv_note(kept: KeptStorages, kv_bytes: int | None) -> str:
    """Why the KV at the moment is more than the cache holds: the remedies of the cache price it so."""
    of = f" of the {human_bytes(kv_bytes)}" if kv_bytes else ""
    return (
        f"the KV at this moment counts {kept.count:,} K/V storages the cache replaced that were never freed "
        f"({human_bytes(kept.bytes)}{of}): something outside the cache still holds them; the cache's "
        "remedies price the KV as measured, those included"
    )


def kept_kv_remedy(kept: KeptStorages, need: int | None) -> Remedy:
    """Dropping the references that keep the replaced storages: it frees them all, at no cost."""
    fits = None if need is None else kept.bytes >= need
    sentence = (
        f"Drop what keeps the {kept.count:,} K/V storages the cache replaced (a list of past keys or values, "
        f"a kept output): nothing in the cache holds them, so {human_bytes(kept.bytes)} is freed. Keep "
        "copies you need on the CPU, or only the last step's."
    )
    return Remedy(REMEDY, None, kept.bytes, fits, sentence)
