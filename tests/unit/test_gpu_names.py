"""A GPU's name where a device's memory is asked: `plan --gpu-memory H100`, `diagnose --budget L4`,
`record(gpu_memory="T4")`. Each card's memory is nvidia-smi's total for it, MiB x 2**20."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from analyzers.planning.size_text import parse_device_memory
from kvtrace.commands.plan import PlanCommand
from kvtrace.errors import KvtraceError
from kvtrace.gpu_names import DRIVER_RESERVE_BYTES, GPUS, gpu_by_name, named_gpu
from kvtrace.options import RecordOptions

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
H100_MIB = 81_559  # "NVIDIA H100 80GB HBM3 ... 0MiB / 81559MiB" in nvidia-smi


@pytest.mark.parametrize(
    ("typed", "mib"),
    [
        ("H100", H100_MIB),
        ("h100-80gb", H100_MIB),
        ("NVIDIA H100 80GB HBM3", H100_MIB),  # torch.cuda.get_device_name()
        ("NVIDIA H100 PCIe", H100_MIB),
        ("H100 NVL", 95_830),
        ("h200", 143_771),
        ("A100-SXM4-40GB", 40_960),
        ("NVIDIA A100 80GB PCIe", 81_920),
        ("a100-80g", 81_920),
        ("H100 (94 GB)", 95_830),  # a size written apart
        ("A100 80 GB", 81_920),
        ("NVIDIA GeForce RTX 4090 D", 24_564),
        ("NVIDIA GeForce RTX 4090", 24_564),
        ("rtx4090", 24_564),
        ("4090", 24_564),  # no device has 4,090 bytes: the card
        ("RTX A6000", 49_140),
        ("NVIDIA A10G", 23_028),
        ("L4", 23_034),
        ("l40s", 46_068),
        ("Tesla T4", 15_360),
    ],
)
def test_a_gpu_name_is_its_nvidia_smi_total(typed: str, mib: int) -> None:
    # GIVEN a GPU's name as people and torch write it, WHEN read as a device's memory
    # THEN it is the card's MiB in bytes
    assert parse_device_memory(typed, "--gpu-memory") == mib * MIB


def test_sizes_read_as_before() -> None:
    assert parse_device_memory("80GiB", "--gpu-memory") == 80 * 2**30
    assert parse_device_memory("24GB", "--budget") == 24 * 10**9
    with pytest.raises(KvtraceError, match=r"--gpu-memory 24: a number without a unit is bytes"):
        parse_device_memory("24", "--gpu-memory")


def test_a_card_sold_in_two_sizes_needs_its_size() -> None:
    with pytest.raises(KvtraceError, match=r"^--budget: 'A100' comes in more than one memory size: write "):
        parse_device_memory("A100", "--budget")
    # a size no card of that name has
    with pytest.raises(KvtraceError, match=r"'h100 40gb': kvtrace knows H100-NVL or H100-80GB"):
        parse_device_memory("h100 40gb", "--gpu-memory")


@pytest.mark.parametrize(
    "typed",
    [
        "NVIDIA GeForce RTX 4090 Laptop GPU",  # torch's name of a 16 GB laptop part
        "NVIDIA GeForce RTX 5090 D v2",  # 24 GB
        "NVIDIA H100 80GB HBM3 MIG 1g.10gb",  # a 10 GB slice
        "NVIDIA RTXA6000-24Q",  # a 24 GB vGPU profile
    ],
)
def test_a_name_that_is_not_the_whole_card_is_refused(typed: str) -> None:
    with pytest.raises(
        KvtraceError, match=r"^--gpu-memory: '.*' is not a whole .* card .*give its memory as a size"
    ):
        parse_device_memory(typed, "--gpu-memory")


def test_a_size_is_never_read_as_a_name() -> None:
    # "4090 MiB" is a size (the plan's note said "the RTX 4090's 24,564 MiB" of it); "4090" is the card
    assert named_gpu("4090 MiB") is None and parse_device_memory("4090 MiB", "--gpu-memory") == 4090 * MIB
    assert named_gpu("85899345920") is None  # bytes
    assert named_gpu("4090") is not None
    assert RecordOptions(gpu_memory="4090").gpu_memory == 24_564 * MIB  # as the CLI reads it


def test_an_unknown_name_lists_the_names() -> None:
    assert gpu_by_name("MI300X") is None
    with pytest.raises(KvtraceError) as refused:
        parse_device_memory("MI300X", "--gpu-memory")
    said = str(refused.value)
    assert said.startswith("--gpu-memory: cannot read size 'MI300X'") and "\n" not in said
    assert all(gpu.label.replace(" ", "-") in said for gpu in GPUS)


def test_record_takes_a_gpu_name() -> None:
    assert RecordOptions(gpu_memory="L4").gpu_memory == 23_034 * MIB
    with pytest.raises(KvtraceError, match=r"^record\(gpu_memory=\.\.\.\): 'a100' comes in"):
        RecordOptions(gpu_memory="a100")


def test_plan_on_a_named_gpu_says_what_it_read(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN `kvtrace plan --preset llama-3-8b --gpu-memory H100 --json`
    command = PlanCommand()
    parser = argparse.ArgumentParser(prog="kvtrace plan")
    command.add_arguments(parser)
    status = command.run(parser.parse_args(["--preset", "llama-3-8b", "--gpu-memory", "H100", "--json"]))
    payload = json.loads(capsys.readouterr().out)
    # THEN it is planned on the H100's 81,559 MiB, with 10% of it reserved, and a note says which card it read
    assert status == 0
    assert payload["request"]["gpu_memory_bytes"] == H100_MIB * MIB
    assert payload["request"]["reserve_bytes"] == H100_MIB * MIB // 10
    assert payload["headroom_bytes"] == H100_MIB * MIB - payload["peak_bytes"]
    named = [note for note in payload["notes"] if note.startswith("--gpu-memory H100:")]
    assert named == [
        "--gpu-memory H100: the H100 80GB's 81,559 MiB (79.65 GiB), the total nvidia-smi shows; CUDA's own "
        "total, which vLLM's gpu_memory_utilization multiplies, is about 0.4 GiB less (an H100 80GB's 79.22 "
        "GiB in vLLM's log): for one machine's exact figure, give --gpu-memory the bytes of "
        "torch.cuda.mem_get_info()[1]"
    ]


def test_a_refused_name_is_one_line_and_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "plan", "--preset", "llama-3-8b", "--gpu-memory", "A100"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "kvtrace plan: error: --gpu-memory: 'A100' comes in more than one memory size: write A100-80GB or "
        "A100-40GB"
    ]


def test_a_vllm_plan_takes_the_driver_s_reserve_off_a_name(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN `kvtrace plan --engine vllm --gpu-memory H100`: vLLM multiplies CUDA's total, ~0.4 GiB below
    # nvidia-smi's (79.22 GiB in vLLM's log on an H100 80GB)
    command = PlanCommand()
    parser = argparse.ArgumentParser(prog="kvtrace plan")
    command.add_arguments(parser)
    argv = ["--engine", "vllm", "--preset", "llama-3-8b", "--gpu-memory", "H100", "--json"]
    command.run(parser.parse_args(argv))
    payload = json.loads(capsys.readouterr().out)
    # THEN it plans 512 MiB less than nvidia-smi's 81,559 MiB, and says so
    assert payload["request"]["gpu_memory_bytes"] == H100_MIB * MIB - DRIVER_RESERVE_BYTES == 84_983_939_072
    assert any("less 512 MiB for the driver's reserve (79.15 GiB)" in note for note in payload["notes"])
