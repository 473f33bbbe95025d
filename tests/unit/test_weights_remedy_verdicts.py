"""The `weights` remedy's verdicts where a figure is unknown: no shortfall, no dtype, no limit."""

from __future__ import annotations

from analyzers.planning.diagnose_weights_remedy import weights_bits, weights_remedy
from kvtrace.format import WeightRecord

MIB = 2**20


def test_without_a_shortfall_its_fit_is_unknown() -> None:
    # 4 MiB of fp32 weights on a 3 MiB budget, the moment's shortfall unknown: bf16 puts them at 2 MiB
    remedy = weights_remedy(4 * MIB, 3 * MIB, "budget", None, 32, "r")
    assert remedy is not None
    assert (remedy.kind, remedy.setting, remedy.saved_bytes, remedy.fits) == ("weights", 16, 2 * MIB, None)
    assert "the weights then under the budget" in remedy.sentence


def test_without_the_weights_dtype_nothing_is_priced() -> None:
    remedy = weights_remedy(4 * MIB, 3 * MIB, "device", 2 * MIB, None, None)
    assert remedy is not None
    assert (remedy.setting, remedy.saved_bytes, remedy.fits) == (None, None, None)
    assert remedy.sentence.startswith("The weights alone (4.00 MiB) reach the 3.00 MiB device: no KV remedy")
    assert "kvtrace plan" not in remedy.sentence


def test_no_remedy_under_the_limit_or_without_one() -> None:
    assert weights_remedy(2 * MIB, 3 * MIB, "budget", MIB, 32, "r") is None
    assert weights_remedy(4 * MIB, 0, "device", MIB, 32, "r") is None
    assert weights_remedy(4 * MIB, None, "device", MIB, 32, "r") is None


def test_weights_a_quantizer_stored_as_int8_are_priced_from_8_bits() -> None:
    # most bytes int8 (a quantizer's), the norms bf16: 8 bits a parameter, not the compute dtype's 16
    weights = [
        WeightRecord("q", 1, 6 * MIB, "int8", "cuda:0", [6 * MIB]),
        WeightRecord("norm", 2, 4096, "bfloat16", "cuda:0", [2048]),
    ]
    assert weights_bits(weights, 16) == 8
    assert weights_bits([], 16) == 16
    remedy = weights_remedy(6 * MIB, 5 * MIB, "budget", MIB, 8, "r")
    assert remedy is not None and (remedy.setting, remedy.saved_bytes, remedy.fits) == (4, 3 * MIB, True)
