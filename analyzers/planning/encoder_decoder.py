"""An encoder-decoder model's KV (T5, BART, Whisper), as transformers' `EncoderDecoderCache` holds it: the
decoder's layers alone keep KV, each two kinds. Its self-attention KV grows with the generated tokens, as
a decoder-only model's does; its cross-attention KV is the encoder's output projected once, at the
prefill, to every decoder layer's K and V: decoder layers x 2 x KV heads x head_dim x the encoder's input
length x rows, whatever the number of tokens generated. Pure, no torch.

A config names its decoder's shape its own way (`kvtrace.geometry.decoder_attention`): the generic names
are the encoder's in most of them (BART's `num_hidden_layers` is `encoder_layers`, T5's is `num_layers`), so
a plan that read those sized the cache by the encoder (a T5 of 3 encoder and 2 decoder layers: 1,536 B a
token where its cache held 1,024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtrace.geometry import decoder_attention

__all__ = ["EncoderDecoderShape", "decoder_fields", "encoder_decoder_note"]

# The encoder's layer count under each family's name (BART's, Whisper's; T5's `num_layers`)
_ENCODER_LAYERS = ("encoder_layers", "num_layers", "encoder_num_hidden_layers")


@dataclass(frozen=True)
class EncoderDecoderShape:
    """What the planner keeps of an encoder-decoder config beside its decoder's fields."""

    decoder_layers: int  # each holds self- and cross-attention KV
    encoder_layers: int | None  # none of their KV is cached
    # The encoder's output length where the model fixes it (Whisper's `max_source_positions`: its input is
    # always 30 s of audio, 1,500 frames); None: the input's own length
    encoder_length: int | None


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def decoder_fields(fields: dict[str, Any]) -> EncoderDecoderShape | None:
    """Rewrite, in `fields`, the standard names an encoder-decoder config's planner reads to its decoder's:
    layers, heads and KV heads (`decoder_attention`), its MLP (`decoder_ffn_dim`), T5's head width
    (`d_kv`, not d_model / heads). None, and `fields` untouched, for any other config."""
    decoder = decoder_attention(fields.get)
    if decoder is None:
        return None
    layers, heads, kv_heads = decoder
    encoder_layers = next((n for n in (_positive(fields.get(k)) for k in _ENCODER_LAYERS) if n), None)
    if layers is not None:
        fields["num_hidden_layers"] = layers
    if heads is not None:
        fields["num_attention_heads"] = heads
    if kv_heads is not None:
        fields["num_key_value_heads"] = kv_heads
    if fields.get("decoder_ffn_dim") is not None:
        fields["intermediate_size"] = fields["decoder_ffn_dim"]
    if fields.get("head_dim") is None and fields.get("d_kv") is not None:
        fields["head_dim"] = fields["d_kv"]
    return EncoderDecoderShape(
        decoder_layers=_positive(layers) or 0,
        encoder_layers=encoder_layers,
        encoder_length=_positive(fields.get("max_source_positions")),
    )


def encoder_decoder_note(shape: EncoderDecoderShape) -> str:
    """The geometry's `kv_note` of an encoder-decoder model: whose layers the KV figures are."""
    encoder = f" (its encoder's {shape.encoder_layers} cache none)" if shape.encoder_layers else ""
    fixed = (
        f"; this model's encoder output is always {shape.encoder_length:,} tokens (max_source_positions)"
        if shape.encoder_length
        else ""
    )
    return (
        f"KV: an encoder-decoder model: its decoder's {shape.decoder_layers} layers{encoder} each hold the "
        "self-attention KV of the generated tokens (the KV per token) and the cross-attention KV of the "
        "encoder's output, which grows with the encoder's input length and the batch, not with the context "
        f"or the tokens generated{fixed}"
    )
