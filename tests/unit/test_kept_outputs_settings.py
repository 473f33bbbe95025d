"""Which of a generate() call's output settings the recorder notes as kept: `output_attentions` only where
the model's attention returns weights (transformers' sdpa and flash attention return none: what the call
keeps then is the other settings', and the remedy must not name it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvtrace.integrations.hf_generate import _kept_outputs


def _model(implementation: object) -> SimpleNamespace:
    return SimpleNamespace(
        config=SimpleNamespace(_attn_implementation=implementation), generation_config=None
    )


ALL_ON = {
    "return_dict_in_generate": True,
    "output_scores": True,
    "output_attentions": True,
    "output_hidden_states": True,
}


@pytest.mark.parametrize(
    "implementation",
    [
        "sdpa",
        "flash_attention_2",
        "flash_attention_3",
        "flash_attention_4",
        "paged|sdpa",
        "paged|flash_attention_2",
    ],
)
def test_attentions_are_not_named_where_the_attention_returns_no_weights(implementation: str) -> None:
    assert _kept_outputs(_model(implementation), (), ALL_ON) == ("output_scores", "output_hidden_states")


@pytest.mark.parametrize(
    "implementation", ["eager", "paged|eager", "flex_attention", "kernels-community/x", None]
)
def test_attentions_are_named_where_the_attention_may_return_weights(implementation: object) -> None:
    expected = ("output_scores", "output_attentions", "output_hidden_states")
    assert _kept_outputs(_model(implementation), (), ALL_ON) == expected


def test_nothing_is_kept_without_return_dict_in_generate() -> None:
    assert _kept_outputs(_model("eager"), (), {**ALL_ON, "return_dict_in_generate": False}) == ()
