"""What a full cache's KV peak, its last update (a step's last layer), holds beside its KV, planned from a
recorded run: the activations the run held at its own KV peak where that is the same moment (a dynamic
cache's growth copy), or at its last update where its cache slid, whose KV peak came as its window filled,
in its first layer, beside ids over the prompt; and the attention mask a full cache's step makes over all
its keys, which a sliding run's covered its window. Pure arithmetic on a `RecordedPeak`, no torch.

Before, a sliding run's KV peak stood for it: the demo's Llama (8 rows, 20-token padded prompt, 64 new
tokens, window 16) planned `--cache fp8` said 2,584 B under the fp8 recording, a position's hidden states
(2,048 B, the last layer's input beside the embeddings) and the mask over 83 keys less 16 (536 B).
"""

from __future__ import annotations

from dataclasses import dataclass

from analyzers.planning.plan_kv import cache_layout
from analyzers.planning.plan_types import PlanRequest, RecordedPeak
from analyzers.planning.presets import dtype_bytes_for
from analyzers.planning.recorded_run import run_request
from analyzers.planning.static_prefill import attended

__all__ = ["UpdateBeside", "full_update_beside", "full_update_mask_bytes", "mask_beyond_window"]


@dataclass(frozen=True)
class UpdateBeside:
    """Bytes held beside the weights and KV at a decode step's cache update, as the run measured them."""

    activations_bytes: int
    token_bytes: int | None  # of them, generate()'s token tensors (ids, mask); None: not told
    context_token_bytes: int | None  # what a row and token of the context adds to them; None: not told


def _slid_to_full(req: PlanRequest, rec: RecordedPeak) -> bool:
    """Whether every layer of the run's cache kept a window and none of the planned cache's does, for a run
    that finished (a run cut short never reached its last update), ran no beam search (whose reorder after a
    step copies every layer's K and V outside the forward: its last storage made is no update's) and tells
    its last update."""
    if rec.cut_short or rec.beams > 1 or rec.last_update_activations_bytes is None:
        return False
    run_whole, run_windowed, _ = cache_layout(run_request(req, rec))
    _, windowed, _ = cache_layout(req)
    return run_whole == 0 and run_windowed > 0 and windowed == 0


def full_update_beside(req: PlanRequest, rec: RecordedPeak) -> UpdateBeside | None:
    """What the run held at the moment the planned cache's KV peak repeats, a cache update: its last update
    where its cache slid and the plan's keeps every token (`RecordedPeak.last_update_activations_bytes`),
    else its KV peak's (`update_activations_bytes`). None where the run does not tell."""
    last = rec.last_update_activations_bytes
    if last is not None and _slid_to_full(req, rec):
        return UpdateBeside(last, rec.last_update_token_bytes, rec.last_update_context_token_bytes)
    if rec.update_activations_bytes is None:
        return None
    return UpdateBeside(rec.update_activations_bytes, rec.update_token_bytes, rec.update_context_token_bytes)


def full_update_mask_bytes(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """Bytes of the attention mask the planned full cache's last step holds over its keys (the context less
    the token never fed) beyond what the sliding run's last update held (`full_update_beside`): eager's, in
    the compute dtype, made at every step, less the run's over its window; sdpa's, a bool a key, made where
    a key is padding (transformers' `_ignore_causal_mask_sdpa` skips it otherwise), so where the run's
    prompts were padded or it does not tell (a bound), and the run's last window, past the prompt's padding,
    needed none (were it padded there, the plan is over by its mask, `batch` x the window bytes). 0 for any
    other plan."""
    if not _slid_to_full(req, rec):
        return 0
    window_keys = attended(run_request(req, rec), rec.context) - 1
    compute_bytes = dtype_bytes_for(req.effective_compute_dtype, 1)
    return mask_beyond_window(
        rec.attn_implementation, batch, attended(req, context) - 1, window_keys, compute_bytes, rec.padded
    )


def mask_beyond_window(
    attn_implementation: str | None,
    batch: int,
    keys: int,
    window_keys: int,
    compute_bytes: int,
    padded: bool | None,
) -> int:
    """Bytes of a full cache's last step's attention mask over its `keys` beyond a sliding run's over its
    `window_keys` (`full_update_mask_bytes`'s arithmetic, which `kvtrace diagnose`'s fp8 remedy for a sliding
    run takes too): eager's `compute_bytes` a row and key, beyond the window's; sdpa's a bool a key, unless
    the prompts were not padded (`padded` False; None, not told, a bound)."""
    if attn_implementation == "eager":
        return batch * max(keys - window_keys, 0) * compute_bytes
    return 0 if padded is False else batch * keys
