"""GPUs by name where a device's memory is asked (`plan --gpu-memory H100`, `diagnose --budget a10g`).

A GPU's memory is the total `nvidia-smi` shows for it (its "Memory-Usage" column), each read from
public nvidia-smi outputs of that card. CUDA's own total (`torch.cuda.mem_get_info()[1]`, which vLLM's
`gpu_memory_utilization` multiplies) is about 0.4 GiB less, the driver's reserve: an H100 80GB shows
81,559 MiB (79.65 GiB) in nvidia-smi and 79.22 GiB in vLLM's start-up log. A name says which card is meant;
the exact figure of one machine is `--gpu-memory` of its `mem_get_info()[1]` in bytes.

A name is read loosely, as people and torch write it: "H100", "h100-80gb", "NVIDIA H100 80GB HBM3",
"A100-SXM4-40GB", "RTX 4090", "NVIDIA GeForce RTX 4090". A card sold with more than one memory size
(A100, V100) needs its size; a size no listed card of that name has is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvtrace.errors import KvtraceError

__all__ = ["Gpu", "gpu_by_name", "gpu_names_text", "gpu_note"]


@dataclass(frozen=True)
class Gpu:
    label: str  # as the plan names it: "H100 80GB"
    model: str  # the word that names it, lower case: "h100"
    marketed_gb: int  # the size it is sold as, which a name may carry ("a100-40gb")
    mib: int  # nvidia-smi's total, MiB
    variant: str = ""  # a word that tells two cards of one model apart ("nvl")

    @property
    def bytes(self) -> int:
        return self.mib * 2**20


GPUS: tuple[Gpu, ...] = (
    Gpu("B200", "b200", 180, 183_359),
    Gpu("H200", "h200", 141, 143_771),
    Gpu("H100 NVL", "h100", 94, 95_830, "nvl"),
    Gpu("H100 80GB", "h100", 80, 81_559),
    Gpu("A100 80GB", "a100", 80, 81_920),
    Gpu("A100 40GB", "a100", 40, 40_960),
    Gpu("L40S", "l40s", 48, 46_068),
    Gpu("RTX A6000", "a6000", 48, 49_140),
    Gpu("V100 32GB", "v100", 32, 32_768),
    Gpu("V100 16GB", "v100", 16, 16_384),
    Gpu("RTX 5090", "5090", 32, 32_607),
    Gpu("RTX 4090", "4090", 24, 24_564),
    Gpu("RTX 3090", "3090", 24, 24_576),
    Gpu("L4", "l4", 24, 23_034),
    Gpu("A10G", "a10g", 24, 23_028),
    Gpu("A10", "a10", 24, 23_028),
    Gpu("T4", "t4", 16, 15_360),
)

_BRAND_WORDS = {"nvidia", "geforce", "tesla", "rtx", "quadro"}
_MODELS = {gpu.model for gpu in GPUS}


def gpu_names_text() -> str:
    """The names a size flag takes, for its help and its errors."""
    return ", ".join(dict.fromkeys(gpu.label.replace(" ", "-") for gpu in GPUS))


def gpu_by_name(text: str) -> Gpu | None:
    """The listed GPU `text` names, or None when it names none (a size, or a card not listed)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    words = [word.removeprefix("rtx") for word in words if word not in _BRAND_WORDS]
    model = next((word for word in words if word in _MODELS), None)
    if model is None:
        return None
    cards = [gpu for gpu in GPUS if gpu.model == model]
    sizes = {int(m[1]) for word in words if (m := re.fullmatch(r"(?:sxm\d?|pcie)?(\d+)g[bi]?b?", word))}
    named = [gpu for gpu in cards if gpu.variant and gpu.variant in words]
    if named:
        cards = named
    elif sizes:
        cards = [gpu for gpu in cards if gpu.marketed_gb in sizes]
    elif len(cards) > 1:
        plain = [gpu for gpu in cards if not gpu.variant]
        if len(plain) == 1:
            return plain[0]
    if len(cards) == 1:
        return cards[0]
    listed = " or ".join(gpu.label.replace(" ", "-") for gpu in GPUS if gpu.model == model)
    if not cards:
        raise KvtraceError(f"{text.strip()!r}: kvtrace knows {listed}; give the memory as a size, e.g. 80GiB")
    raise KvtraceError(f"{text.strip()!r} comes in more than one memory size: write {listed}")


def gpu_note(text: str, flag: str) -> str | None:
    """What a GPU's name was read as, for the plan's notes; None when `text` is a size."""
    gpu = gpu_by_name(text)
    if gpu is None:
        return None
    return (
        f"{flag} {text.strip()}: the {gpu.label}'s {gpu.mib:,} MiB ({gpu.bytes / 2**30:.2f} GiB), the total "
        "nvidia-smi shows; CUDA's own total, which vLLM's gpu_memory_utilization multiplies, is about "
        "0.4 GiB less (an H100 80GB's 79.22 GiB in vLLM's log): for one machine's exact figure, give "
        f"{flag} the bytes of torch.cuda.mem_get_info()[1]"
    )
