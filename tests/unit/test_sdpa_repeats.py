"""Which recorded transformers' sdpa the planner prices K and V copies for at a static cache's decode steps
(analyzers.planning.sdpa_repeats): those before 5.23, whose sdpa expands K and V to the query heads wherever
a step has a mask; 5.23 on runs a one-token query on the KV heads (`pack_gqa`). The versions below were
read in transformers' own `integrations/sdpa_attention.py` (5.22.2: `repeat_kv`; 5.23.0: `pack_gqa`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from analyzers.planning.plan_types import RecordedPeak
from analyzers.planning.sdpa_repeats import sdpa_repeats_kv

RUN = RecordedPeak(
    peak_bytes=1,
    activations_bytes=0,
    weights_bytes=1,
    phase="decode",
    tokens=9,
    batch=1,
    context=10,
    prompt=2,
    cache="dynamic",
    kv_dtype="bf16",
    window=None,
    beams=1,
    quant_group_size=64,
    residual_length=128,
    attn_implementation="sdpa",
)


@pytest.mark.parametrize(
    ("version", "repeats"),
    [
        ("4.57.1", True),
        ("5.17.0", True),
        ("5.22.2", True),
        ("5.23.0", False),
        ("5.25.0", False),
        ("6.0.0.dev0", False),
        (None, True),
    ],
)
def test_static_decode_steps_repeat_k_and_v_under_sdpa_before_5_23(
    version: str | None, repeats: bool
) -> None:
    # GIVEN an sdpa run that says its transformers (None: a manifest without one, priced as the bound)
    rec = replace(RUN, transformers_version=version)
    # THEN a static cache's decode steps copy K and V as that transformers did; a dynamic cache's never
    assert sdpa_repeats_kv("static", rec) is repeats
    assert sdpa_repeats_kv("static_sliding", rec) is repeats
    assert sdpa_repeats_kv("dynamic", rec) is False


def test_other_attention_is_left_to_its_own_pricing() -> None:
    # eager prices its own copies; flash attention takes the KV heads as they are
    for attention in ("eager", "flash_attention_2", None):
        assert (
            sdpa_repeats_kv(
                "static", replace(RUN, attn_implementation=attention, transformers_version="5.17.0")
            )
            is False
        )
