"""GPUs by name where a device's memory is asked (`plan --gpu-memory H100`, `diagnose --budget a10g`).

A GPU's memory is the total `nvidia-smi` shows for it (its "Memory-Usage" column), each read from
public nvidia-smi outputs of that card. CUDA's own total (`torch.cuda.mem_get_info()[1]`, which vLLM's
`gpu_memory_utilization` multiplies) is about 0.4 GiB less, the driver's reserve: an H100 80GB shows
81,559 MiB (79.65 GiB) in nvidia-smi and 79.22 GiB in vLLM's start-up log. A name says which card is meant;
the exact figure of one machine is `--gpu-memory` of its `mem_get_info()[1]` in bytes.

A name is read loosely, as people and torch write it: "H100", "h100-80gb", "NVIDIA H100 80GB HBM3",
"A100-SXM4-40GB", "RTX 4090", "NVIDIA GeForce RTX 4090", "H100 (94 GB)". A card sold with more than one
memory size (A100) needs its size; a size no listed card of that name has is refused, and so is a name that
says it is not the whole card its model names: a laptop part, a MIG slice, a vGPU profile ("-24Q"), a
"v2" (each has less memory than the desktop card of its model number).

A vLLM plan takes `DRIVER_RESERVE_BYTES` off a name's total: vLLM multiplies CUDA's total by its
gpu_memory_utilization and keeps no reserve of its own, so nvidia-smi's figure would plan 0.4 GiB it never
has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvtrace.errors import KvtraceError

__all__ = ["DRIVER_RESERVE_BYTES", "Gpu", "gpu_by_name", "gpu_names_text", "gpu_note", "named_gpu"]

# nvidia-smi's total less CUDA's, rounded up: 438 MiB on an H100 80GB (81,559 MiB against vLLM's logged
# 79.22 GiB), 418-449 MiB on an RTX 4090 (24,564 MiB against 23.55 and 23.58 GiB)
DRIVER_RESERVE_BYTES = 512 * 2**20


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
    Gpu("RTX 5090", "5090", 32, 32_607),
    Gpu("RTX 4090", "4090", 24, 24_564),
    Gpu("RTX 3090", "3090", 24, 24_576),
    Gpu("L4", "l4", 24, 23_034),
    Gpu("A10G", "a10g", 24, 23_028),
    Gpu("A10", "a10", 24, 23_028),
    Gpu("T4", "t4", 16, 15_360),
)

_BRAND_WORDS = {"nvidia", "geforce", "tesla", "rtx", "quadro"}
# Words that say the device is less than the card its model names
_PART_WORDS = {"laptop", "mobile", "maxq", "mig", "v2", "vgpu"}
_SIZE_TEXT = re.compile(r"[0-9.eE+-]+\s*([A-Za-z]*)")
_SIZE_UNITS = {"", "b", "kb", "mb", "gb", "tb", "kib", "mib", "gib", "tib"}
_MODELS = {gpu.model for gpu in GPUS}


def gpu_names_text() -> str:
    """The names a size flag takes, for its help and its errors."""
    return ", ".join(dict.fromkeys(gpu.label.replace(" ", "-") for gpu in GPUS))


def named_gpu(text: str) -> Gpu | None:
    """The GPU `text` is read as where a device's memory is asked: None for a size ("80GiB", "4090 MiB",
    a bare number of bytes from 1 MiB on), else `gpu_by_name` ("4090" is no device's bytes: the card)."""
    size = _SIZE_TEXT.fullmatch(text.strip())
    if size is not None and size.group(1).lower() in _SIZE_UNITS:
        if size.group(1):
            return None
        try:
            if float(text) >= 2**20:
                return None
        except ValueError:
            return None
    return gpu_by_name(text)


def gpu_by_name(text: str) -> Gpu | None:
    """The listed GPU `text` names, or None when it names none (a size, or a card not listed)."""
    lowered = re.sub(r"(\d+)\s+(gi?b|g)\b", r"\1\2", text.lower())  # "94 GB": one word
    lowered = lowered.replace("max-q", "maxq")
    words = re.findall(r"[a-z0-9]+", lowered)
    words = [word.removeprefix("rtx") for word in words if word not in _BRAND_WORDS]
    model = next((word for word in words if word in _MODELS), None)
    if model is None:
        return None
    part = next((w for w in words if w in _PART_WORDS or re.fullmatch(r"\d+[qcab]", w)), None)
    if part is not None:
        raise KvtraceError(
            f"{text.strip()!r} is not a whole {model.upper()} card ({part!r}: a laptop part, a MIG slice "
            "or a vGPU profile has its own memory): give its memory as a size, e.g. 16GiB"
        )
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


def gpu_note(text: str, flag: str, vllm: bool = False) -> str | None:
    """What a GPU's name was read as, for the plan's notes; None when `text` is a size. `vllm`: the plan
    took the driver's reserve off (`DRIVER_RESERVE_BYTES`)."""
    gpu = named_gpu(text)
    if gpu is None:
        return None
    if vllm:
        planned = gpu.bytes - DRIVER_RESERVE_BYTES
        return (
            f"{flag} {text.strip()}: the {gpu.label}'s {gpu.mib:,} MiB, the total nvidia-smi shows, less "
            f"{DRIVER_RESERVE_BYTES // 2**20} MiB for the driver's reserve ({planned / 2**30:.2f} GiB): "
            "CUDA's own total, which vLLM's gpu_memory_utilization multiplies, is about that much less (an "
            f"H100 80GB's 79.22 GiB in vLLM's log); for one machine's exact figure, give {flag} the bytes of "
            "torch.cuda.mem_get_info()[1]"
        )
    return (
        f"{flag} {text.strip()}: the {gpu.label}'s {gpu.mib:,} MiB ({gpu.bytes / 2**30:.2f} GiB), the total "
        "nvidia-smi shows; CUDA's own total, which vLLM's gpu_memory_utilization multiplies, is about "
        "0.4 GiB less (an H100 80GB's 79.22 GiB in vLLM's log): for one machine's exact figure, give "
        f"{flag} the bytes of torch.cuda.mem_get_info()[1]"
    )
