"""What the recorder lists as the model's weights when they are not plain tensors: wrapper tensor subclasses
(torchao's quantized weights) by their inner tensors, parameters on the meta device (accelerate's offload) not
at all, torch.ao's packed quantized weights (`quantize_dynamic`) at their int8 size; a tensor kvtrace cannot
read is left out with a warning, never raised (kvtrace/model_weights.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from analyzers.report import build_report
from kvtrace.llama import build_model
from tests.tiny import HEAD_DIM, HEADS, HIDDEN, record_generate, tiny_size

LAYERS, KV_HEADS, INTERMEDIATE, VOCAB = 2, 2, 128, 1000
BATCH, PROMPT, NEW = 2, 5, 4
SIZE = tiny_size(LAYERS, KV_HEADS)  # tied embeddings: one vocab x hidden matrix

# The Linear layers of one layer, (out, in): q, k, v, o, then the MLP's gate, up, down
LINEARS = [
    (HEADS * HEAD_DIM, HIDDEN),
    (KV_HEADS * HEAD_DIM, HIDDEN),
    (KV_HEADS * HEAD_DIM, HIDDEN),
    (HIDDEN, HEADS * HEAD_DIM),
    (INTERMEDIATE, HIDDEN),
    (INTERMEDIATE, HIDDEN),
    (HIDDEN, INTERMEDIATE),
]
LINEAR_ELEMENTS = LAYERS * sum(out * inp for out, inp in LINEARS)
EMBEDDING = VOCAB * HIDDEN
NORMS = (2 * LAYERS + 1) * HIDDEN  # two RMSNorms per layer, and the final one
BUFFERS = 2 * (HEAD_DIM // 2)  # RoPE's inv_freq and original_inv_freq
W32 = (EMBEDDING + LINEAR_ELEMENTS + NORMS + BUFFERS) * 4
# The KV cache after generate(): layers x K and V x rows x KV heads x head_dim x tokens x 4 B (float32)
TOKENS = PROMPT + NEW - 1  # the last token generated is never fed back
KV32 = LAYERS * 2 * BATCH * KV_HEADS * HEAD_DIM * TOKENS * 4
# The KV peak: the last torch.cat's new tensor made while the one it replaces (a token short) is held
KV_PEAK = KV32 + BATCH * KV_HEADS * HEAD_DIM * (TOKENS - 1) * 4


class Int8Weight(torch.Tensor):
    """A weight-only int8 wrapper subclass as torchao's make them: int8 elements and a float scale per row,
    dequantized on use; the wrapper itself holds no data."""

    qdata: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor) -> Any:
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=torch.float32, device=qdata.device)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor) -> None:
        self.qdata, self.scale = qdata, scale

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["qdata", "scale"], None

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.detach.default:
            return type(args[0])(args[0].qdata, args[0].scale)

        def plain(t: Any) -> Any:
            return t.qdata.float() * t.scale if isinstance(t, Int8Weight) else t

        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))


class OpaqueWeight(Int8Weight):
    """A wrapper subclass that does not say what it holds (no `__tensor_flatten__`): unreadable to kvtrace."""

    __tensor_flatten__ = None  # type: ignore[assignment]


def _quantize_linears(model: torch.nn.Module, kind: type[Int8Weight]) -> None:
    """Every Linear of the decoder layers gets an int8 wrapper weight (the tied embedding/lm_head stays)."""
    for module in model.model.layers.modules():  # type: ignore[union-attr, operator]
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.detach()
            scale = weight.abs().amax(1, keepdim=True) / 127
            qdata = (weight / scale).round().to(torch.int8)
            module.weight = torch.nn.Parameter(kind(qdata, scale), requires_grad=False)


def _start_lines(run: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (run / "weights.jsonl").read_text().splitlines()]
    return [line for line in lines if "event" not in line]


def test_weights_held_by_a_wrapper_subclass_are_its_inner_tensors(tmp_path: Path) -> None:
    # GIVEN the tiny Llama with its layers' Linear weights int8 wrapper subclasses (no storage of their own)
    model = build_model(SIZE, seed=0)
    _quantize_linears(model, Int8Weight)
    # WHEN it generates inside record() (which used to raise at its start)
    record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW, profiler=False)
    # THEN the weights are the int8 elements and a float32 scale per output row, beside the float32 rest
    scales = LAYERS * sum(out for out, _inp in LINEARS)
    expected = LINEAR_ELEMENTS * 1 + scales * 4 + (EMBEDDING + NORMS + BUFFERS) * 4
    start = _start_lines(tmp_path / "run")
    assert sum(line["storage_bytes"] for line in start) == expected
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert {line["name"]: line["dtype"] for line in start if line["name"].startswith(q_proj)} == {
        f"{q_proj}.qdata": "int8",
        f"{q_proj}.scale": "float32",
    }
    # AND the end of the block found nothing changed, and the report counts them so
    _source, report = build_report(tmp_path / "run")
    assert not [n for n in report.notes if "weight" in n and "changed" in n]
    assert report.devices[0].final_allocated_bytes == expected  # generate()'s cache is let go by the end


def test_a_weight_kvtrace_cannot_read_is_left_out_with_a_warning(tmp_path: Path) -> None:
    # GIVEN a model whose layers' Linear weights are wrapper subclasses that do not say what they hold
    model = build_model(SIZE, seed=0)
    _quantize_linears(model, OpaqueWeight)
    # WHEN it generates inside record()
    record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW, profiler=False)
    # THEN the recording goes on, the other weights are listed, and a warning counts those left out
    start = _start_lines(tmp_path / "run")
    assert sum(line["storage_bytes"] for line in start) == (EMBEDDING + NORMS + BUFFERS) * 4
    warnings_ = json.loads((tmp_path / "run" / "manifest.json").read_text())["warnings"]
    assert f"{LAYERS * len(LINEARS)} of the model's weight tensors could not be read" in " ".join(warnings_)


def test_parameters_on_the_meta_device_are_not_weights(tmp_path: Path) -> None:
    # GIVEN the tiny Llama with a head left on the meta device (as accelerate's offload leaves parameters)
    model = build_model(SIZE, seed=0)
    model.extra = torch.nn.Linear(2048, 2048, device="meta")  # 16 MiB if it were held: 0 B
    # WHEN it generates inside record()
    record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW, profiler=False)
    # THEN no weight is listed on meta, and the report's only device is the CPU: weights and KV at the peak
    assert {line["device"] for line in _start_lines(tmp_path / "run")} == {"cpu"}
    _source, report = build_report(tmp_path / "run")
    assert [device.device for device in report.devices] == ["cpu"]
    assert report.devices[0].peak_allocated_bytes == W32 + KV_PEAK
    assert report.devices[0].categories_at_peak == {"kv": KV_PEAK, "weights": W32, "other": 0}
    assert any(
        n.startswith("2 of the model's parameters and buffers are on the meta device") for n in report.notes
    )
    assert not [n for n in report.notes if "weight" in n and "changed" in n]


def test_packed_weights_of_a_quantize_dynamic_model_are_counted(tmp_path: Path) -> None:
    # GIVEN the tiny Llama with every Linear dynamically quantized to int8 (lm_head too: it leaves the
    # embedding it was tied to in float32): the int8 weights are packed, neither parameters nor buffers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation
        model = torch.ao.quantization.quantize_dynamic(
            build_model(SIZE, seed=0), {torch.nn.Linear}, dtype=torch.qint8
        )
        # WHEN it generates inside record()
        record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW, profiler=False)
    # THEN the weights are the float32 embedding, norms and RoPE buffers, and 1 B per int8 element (no
    # bias: Llama's Linears have none; one scale per weight, in the packed object's header)
    int8 = LINEAR_ELEMENTS + VOCAB * HIDDEN  # the layers' and lm_head's
    start = _start_lines(tmp_path / "run")
    assert sum(line["storage_bytes"] for line in start) == (EMBEDDING + NORMS + BUFFERS) * 4 + int8
    packed = [line for line in start if line["dtype"] == "qint8"]
    assert len(packed) == LAYERS * len(LINEARS) + 1
    assert packed[-1]["name"] == "lm_head._packed_params._packed_params"
    assert packed[-1]["shape"] == [VOCAB, HIDDEN]
    # AND the report counts them as weights, and says what of the packed layout is left out
    _source, report = build_report(tmp_path / "run")
    assert report.devices[0].categories_at_peak["weights"] == (EMBEDDING + NORMS + BUFFERS) * 4 + int8
    assert any(
        n.startswith(f"{len(packed)} packed weights of torch.ao quantized modules") for n in report.notes
    )
