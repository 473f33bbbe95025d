"""The terms a recorded run's peak is grown by, for a plan at another batch, context or prompt
(`recorded_growth`): how its activations follow the rows, the tokens attended and the prompt, what of them
stays fixed, and the copies and masks a longer context adds. Pure arithmetic on a `RecordedPeak`, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analyzers.planning.diagnose_rows import beside_at_rows
from analyzers.planning.fp8_update import fp8_prefill_attention_bytes, fp8_update_bytes
from analyzers.planning.plan_kv import kv_sizes
from analyzers.planning.plan_types import PREALLOCATED_CACHES, PlanRequest, PrefillMoment, RecordedPeak
from analyzers.planning.presets import dtype_bytes_for
from analyzers.planning.recorded_run import run_request, same_cache_as_run
from analyzers.planning.sdpa_repeats import sdpa_copies_unmeasured
from analyzers.planning.static_prefill import attended as _attended

__all__ = [
    "Gain",
    "attended_gain",
    "attention_copies",
    "beside_at_end",
    "context_growth",
    "covering_moments",
    "eager_scores_bytes",
    "fp8_prefill_attending",
    "grown_with_prompt",
    "moments_grown",
    "pairs_squared",
    "prefill_growth",
    "prefill_moment_kv",
    "prefill_peaks",
    "prompt_bytes_kept",
    "prompt_ratio",
    "prompt_token_growth",
    "rows_freed",
    "scaled_activations",
    "shorter_prefill",
    "static_mask_bytes",
    "step_end_beside",
    "step_end_token_bytes",
    "token_growth",
    "unseen_at_end",
    "update_token_growth",
]


def attention_copies(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """Bytes one layer's attention holds over the attended tokens at a decode step beyond the cache's own
    storages, where they grow with the context: eager attention (the run's `attn_implementation`) expands K
    and V to the query heads (`repeat_kv`, where there are fewer KV heads) over the last step's keys (the
    context less the token never fed) and makes the scores (`eager_scores_bytes`); an fp8 cache dequantizes
    the K and V it holds to float32 (`fp8_update_bytes`: 3 of K's or V's copies live at once, measured), a
    quanto or HQQ cache returns its K and V in the compute dtype. sdpa's kernels take the KV heads as they
    are, but for a static cache's decode steps under a transformers before 5.23 (`sdpa_repeats_kv`): K and
    V expanded to the query heads over every position of the cache, with the step's mask and the kernel's
    buffers beside, where the run's peak does not hold them. 0 for other attention and a run that does not
    say its own."""
    geom = req.geometry
    attended = _attended(req, context)
    compute = dtype_bytes_for(req.effective_compute_dtype, 1)
    side = max(max(k, v) for k, v in geom.layer_kv_widths)  # one layer's K (or V) elements a token
    per_token = 0
    dequantized = 0
    if req.cache == "quantized" and req.kv_dtype == "fp8":
        # over the tokens the layer holds after its last update, one fewer than the context (the last token
        # is never fed); before, over the context: the demo's Llama planned fp8 from its dynamic run was
        # 196,608 B (8 rows x a token's 3 float32 copies of a layer's K) over its recording
        _, dequantized = fp8_update_bytes(0, batch * side, context - 1)
    if rec.attn_implementation == "eager":
        # over the keys the last step's layer holds after its update, the context less the token never fed
        keys = _attended(req, context - 1)
        expanded = geom.num_attention_heads * max(geom.head_dim, geom.global_head_dim or 0)
        per_key = 2 * side * compute if req.cache == "quantized" and req.kv_dtype != "fp8" else 0
        per_key += 2 * expanded * compute if expanded > side else 0
        scores = eager_scores_bytes(batch * geom.num_attention_heads * keys, compute)
        return batch * keys * per_key + scores + dequantized
    if sdpa_copies_unmeasured(req, rec):
        # beside the copies, the step's bool mask a position, torch's copy of it in the compute dtype (sdpa
        # takes a float mask) and the kernel's own buffers, bounded by the scores' float32 row a head (on the
        # CPU, flash attention's per-thread buffers: 4,100 B of the tiny Llama's 8 rows x 319 positions)
        expanded = geom.num_attention_heads * max(geom.head_dim, geom.global_head_dim or 0)
        if expanded > side:
            per_token += 2 * expanded * compute + 1 + compute + geom.num_attention_heads * 4
    return batch * attended * per_token + dequantized


# torch's 0-dim tensors of the Python scale eager attention multiplies its scores by (a double and its
# float32 copy), live while the scaled copy is made: measured on the CPU
_EAGER_SCALE_SCALARS = 12


def eager_scores_bytes(scores: int, compute: int) -> int:
    """Bytes eager attention's scores hold at once (`eager_attention_forward`): `scores` values (rows x
    query heads x keys) made in the compute dtype, scaled, masked, softmaxed in float32 and cast back, each
    a new copy freeing the one before: the product beside its scaled copy (with the scale's scalars), or
    the masked copy beside softmax's float32 copy of it (none where the compute dtype is float32) and its
    float32 output, measured on the tiny Llama in fp32 (2 copies) and bf16 (a bf16 and 2 float32 copies).
    Before, three float32 copies over the context, a token more than the last step's keys."""
    upcast = 4 if compute != 4 else 0  # softmax(dtype=float32) converts its input first
    return max(2 * scores * compute + _EAGER_SCALE_SCALARS, scores * (compute + upcast + 4))


def context_growth(req: PlanRequest, rec: RecordedPeak, context: int) -> float:
    """How much a row's activations grow from the run's context to `context`: as the tokens the planned
    cache attends over at each (at least 1: a shorter context keeps them, an upper bound). Measured from the
    run's context in the planned cache, not in the run's: at one context a step ends holding the same
    logits, ids and mask whatever the cache, so a sliding run planned on a full cache at its own context
    keeps its activations (before, they grew by context / (window + 1): on the tiny Llama at batch 2,
    context 12, window 8, +19,186 B, +3.1%, over the full cache's recording; the demo's, +88%)."""
    return max(_attended(req, context) / _attended(req, rec.context), 1.0)


def step_end_beside(rec: RecordedPeak, activations: int, at_end: int) -> int:
    """What the run held beside its weights and KV at a decode step's end, at most, of `activations` (the
    peak moment's at the plan's rows): a run that peaked at its prefill held its final KV at its last
    step's end within its peak, so no more than its peak less its weights and that KV beside it (`at_end`,
    `beside_at_end`'s), kept in the share fewer rows keep; the peak's own where the run peaked elsewhere, or
    was cut short before its end."""
    if rec.phase != "prefill" or rec.cut_short:
        return activations
    kept = activations / max(rec.activations_bytes, 1)
    return min(activations, math.floor(at_end * kept))


def step_end_token_bytes(rec: RecordedPeak, at_end: int) -> int | None:
    """What a row and token of the context adds to `step_end_beside`'s figure of a run that peaked at its
    prefill, where that figure is its decode steps' measured most (`decode_context_token_bytes`: the ids
    and mask every step grows), not the bound; else the peak's (`context_token_bytes`, which a prefill peak
    does not tell): all grow with the context. Before, all did: a sliding run of the tiny Llama (4 rows,
    40-token prompt, window 16, 20 new tokens) planned `--cache dynamic --context 200` put its step's end,
    110,244 B, grown 10/3-fold (367,480 B) beside the final KV, 1,327,288 B where the dynamic recording
    peaked at its last update at 1,112,984 (+19.3%). `at_end`: `beside_at_end`'s."""
    decode = rec.decode_activations_bytes
    if rec.phase != "prefill" or rec.cut_short or decode is None or decode > at_end:
        return rec.context_token_bytes
    return rec.decode_context_token_bytes


def beside_at_end(run: PlanRequest, rec: RecordedPeak) -> int:
    """The most a finished run held beside its weights and final KV at its last step's end: its peak less
    those, and, where it peaked at its prefill, no more than its decode steps held at most beside their KV
    (`RecordedPeak.decode_activations_bytes`, measured). A sliding run's prefill holds its whole prompt's KV,
    more than its final window's, so its peak less that window's KV counted the difference as activations:
    the tiny Llama (4 rows, 40-token prompt, window 16, 20 new tokens) planned fp8 said 1,064,328 B where
    the fp8 recording peaked at its prefill at 1,005,448 (+5.9%), 24 tokens' KV of every row and layer and
    the prefill's activations beside the fp8 cache's final KV. Its callers take it computed once a plan's
    moment (`step_end_beside`, `step_end_token_bytes`, `unseen_at_end`): each computed it again."""
    final_kv = kv_sizes(run, rec.batch, rec.context).kv_bytes
    bound = max(rec.peak_bytes - rec.weights_bytes - final_kv, 0)
    decode = rec.decode_activations_bytes
    return min(bound, decode) if rec.phase == "prefill" and decode is not None else bound


def prefill_moment_kv(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """The plan's KV at the run's prefill peak moment: the prompt's, or, for an fp8 cache planned from a
    dynamic run whose prefill peaked before its last layers wrote their KV (`kv_at_peak_bytes` below the
    prompt's), the layers it held then. That moment is the fp8 prefill's most where its activations are the
    prefill's most (`prefill_activations_bytes`) and each layer's KV no larger than the run's: an earlier
    layer's moment holds no more beside less KV, a later one's at most the run's peak less the run's KV
    there, which outgrows the fp8 KV. Before, the prompt's whole KV: the demo's Llama (2 rows, 128-token
    prompt, 4 new tokens), whose prefill peaked in its third of 4 layers, planned fp8 1,048,584 B over its
    fp8 recording (a layer's 8-bit KV). Layers of one width only, where bytes count layers."""
    sizes = kv_sizes(req, batch, context)
    held, widths = rec.kv_at_peak_bytes, req.geometry.layer_kv_widths
    fp8_from_dynamic = req.cache == "quantized" and req.kv_dtype == "fp8" and rec.cache == "dynamic"
    if not fp8_from_dynamic or rec.phase != "prefill" or rec.cut_short or held is None:
        return sizes.prefill_bytes
    at_run = kv_sizes(run_request(req, rec), rec.batch, rec.context).prefill_bytes
    most = rec.prefill_activations_bytes
    if len(set(widths)) != 1 or not 0 < held < at_run or sizes.prefill_bytes > at_run:
        return sizes.prefill_bytes
    if most is None or rec.activations_bytes < most:
        return sizes.prefill_bytes
    reached = round(held / at_run * len(widths))
    return math.ceil(sizes.prefill_bytes * reached / len(widths))


def fp8_prefill_attending(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """The attending layer's full-precision K and V beside an fp8 cache's prefill, planned from a dynamic
    run that peaked inside a prefill layer's attention (`fp8_prefill_attention_bytes`, the figure
    `kvtrace diagnose`'s fp8 remedy takes too): measured at the run's rows and prompt, priced at the plan's.
    0 for any other cache or moment."""
    fp8_from_dynamic = req.cache == "quantized" and req.kv_dtype == "fp8" and rec.cache == "dynamic"
    at = rec.prefill_peak_moment
    if not fp8_from_dynamic or rec.phase != "prefill" or rec.cut_short or at is None:
        return 0
    run_prompt = kv_sizes(run_request(req, rec), rec.batch, rec.context).prompt
    layer = max(k + v for k, v in req.geometry.layer_kv_widths)
    compute = dtype_bytes_for(req.effective_compute_dtype, 1)
    at_run = fp8_prefill_attention_bytes(at[3], rec.batch, run_prompt, layer, compute)
    prompt = kv_sizes(req, batch, context).prompt
    return math.ceil(at_run * batch * prompt / (rec.batch * run_prompt)) if at_run else 0


def unseen_at_end(rec: RecordedPeak, at_end: int) -> int:
    """Bytes a finished run may have held beside its weights and KV at its last step's end beyond those it
    held at its peak moment: its peak less its weights, final KV (`at_end`, `beside_at_end`'s) and the
    peak's activations (none where the peak was that moment, or the run was cut short and never reached
    it)."""
    if rec.cut_short:
        return 0
    return max(at_end - rec.activations_bytes, 0)


@dataclass(frozen=True)
class Gain:
    """How a plan grows a moment's activations from the run's: `rows` times the run's rows, `stretch`
    times the tokens it attends over (`context_growth`), `row_count` rows of `tokens` tokens more."""

    rows: float
    stretch: float
    row_count: int
    tokens: int

    def grown(self, activations: float, token_bytes: int | None, fixed: int | None = None) -> int:
        """`activations` at the plan: all follow the rows, and where the run tells the bytes a row and
        token adds (`token_bytes`: run_peak's `context_token_bytes`), those grow by the tokens attended
        more; the logits, a position's hidden states and generate()'s float32 copies of the last position
        stay (before, all grew with the context: the tiny Llama's dynamic cache planned from context 12
        at 206 was +918,539 B, +109.4%, over its recording). Not told: all grow in proportion to the
        context too (an upper bound). `fixed` of them (the vocabulary-long vectors: run_peak's
        `batch_fixed_bytes`) stay whatever the rows and tokens."""
        if token_bytes is None:
            return scaled_activations(activations, fixed, self.rows * self.stretch)
        return scaled_activations(activations, fixed, self.rows) + token_bytes * self.row_count * self.tokens


def grown_with_prompt(
    activations: float, fixed: int | None, rows: float, longer: float, prompt_bytes: float | None
) -> int:
    """A prefill's `activations` at `rows` times the run's rows (all but `fixed` grow with them, `scaled`)
    and a prompt `longer` times the run's: where the run tells what its prefill held that grows with the
    prompt (`prompt_bytes`, run_peak's `prefill_prompt_bytes`), those grow by the tokens added, the logits
    over the last position and the vectors over the vocabulary stay, as generate() makes them whatever the
    prompt; not told, all but `fixed` grow with it. Before, all grew: the tiny Llama 3 (128,256-token
    vocabulary) at batch 1, planned from a 16-token prompt at 256, said 111,149,568 B where the recording
    peaked at 73,190,324 (+51.9%), its 2.45 MiB of float32 logits over one position grown 16-fold. Each
    moment of the prefill is within the run's most beside its KV plus its most growing (a moment inside a
    layer, not the logits', may hold the latter): an upper bound."""
    if prompt_bytes is None:
        return scaled_activations(activations, fixed, rows * longer)
    return scaled_activations(activations, fixed, rows) + math.ceil(prompt_bytes * rows * (longer - 1))


def moments_grown(
    moments: tuple[PrefillMoment, ...], rows: float, longer: float, squared: bool = False, held: int = 0
) -> int:
    """The most of the prefill's `moments` (`RecordedPeak.prefill_moments`) at `rows` times the run's rows
    and a prompt `longer` times its: each its fixed bytes, its rows' grown with them, its prompt's with
    both, and eager attention's mask and scores over prompt x prompt with the rows and, where `squared`
    (`pairs_squared`), the prompt squared, else with the prompt as the rest. Before, the logits' moment was
    priced with another moment's growth beside it: the tiny Llama 3 with eager attention, batch 2, planned
    from a 16-token prompt at 256, +9.6% over its recording. A shorter prompt (`longer` below 1) keeps
    `held` of each moment's prompt bytes (`RecordedPeak.prefill_held_bytes`: what the step never frees)."""
    pair_growth = longer * longer if squared else longer

    def prompt_part(grows: int) -> float:
        kept = min(held, grows) if longer < 1 else 0
        return kept + (grows - kept) * longer

    return max(
        fixed + math.ceil((row_only + prompt_part(grows) + pairs * pair_growth) * rows)
        for fixed, row_only, grows, pairs in moments
    )


def pairs_squared(req: PlanRequest, rec: RecordedPeak) -> bool:
    """Whether a plan grows the run's prefill moments' eager mask and scores (`RecordedPeak.prefill_moments`'
    last part) with the prompt squared, each within its own moment, so that none is added beyond them
    (static_prefill's `dynamic_prefill_bytes` is not): where the run tells them (an eager run, or an sdpa
    one whose prompt reached its model's sliding window: its mask and the mask's copy) and the plan's cache
    fills as it goes, whose prefill attends over its prompt alone (a static cache's over its
    length: `static_prefill_bytes` prices that beyond the run's prefill, grown with the prompt). Before, the
    pairs beyond the run's were added to the most of any moment, which at a short prompt is the MLP's or
    the logits', holding no scores: the tiny Llama 3 (bf16, 2 layers, 2 rows, eager) planned from a
    24-token prompt at 384 said 34,158,432 B where the recording peaked at 29,799,112 (+14.6%; 600 B over
    after, the prefill's scalars grown with the prompt)."""
    moments = rec.prefill_moments
    return bool(moments) and req.cache not in PREALLOCATED_CACHES and any(m[3] for m in moments or ())


def covering_moments(rec: RecordedPeak, beside: int) -> tuple[PrefillMoment, ...] | None:
    """The run's prefill moments (`RecordedPeak.prefill_moments`) where the most of them is at least
    `beside`, the prefill's most as the plan takes it: not where the run peaked in a prefill step it did
    not finish (cut short), which no moment counts. None: not told, or not covering."""
    moments = rec.prefill_moments
    return moments if moments and moments_grown(moments, 1.0, 1.0) >= beside else None


def prompt_bytes_kept(rec: RecordedPeak, kept: float) -> float | None:
    """The run's prefill bytes that grow with the prompt (`RecordedPeak.prefill_prompt_bytes`) at fewer
    rows, the share `kept` of them that `rows_freed` keeps; None: not told."""
    return None if rec.prefill_prompt_bytes is None else rec.prefill_prompt_bytes * kept


def scaled_activations(activations: float, fixed: int | None, factor: float) -> int:
    """`activations` grown by `factor` (more rows, a longer prompt), all but `fixed` of them, which no row
    count changes (the logits processors' vectors over the vocabulary: run_peak's `batch_fixed_bytes`);
    the run's own figure where `factor` is 1."""
    kept = min(fixed or 0, math.floor(activations))
    return kept + math.ceil((activations - kept) * factor)


def attended_gain(req: PlanRequest, rec: RecordedPeak, context: int) -> int:
    """Tokens a step attends over more at `context` than at the run's, in the planned cache (none fewer:
    a shorter context keeps the activations, an upper bound)."""
    return max(_attended(req, context) - _attended(req, rec.context), 0)


def update_token_growth(
    rec: RecordedPeak,
    batch: int,
    context: int,
    scale: float,
    held: int | None = None,
    told: tuple[Gain, int | None, float] | None = None,
) -> int:
    """Bytes generate()'s token tensors add to what the run held at its KV peak (`update_token_bytes`,
    grown by `scale`) in a plan whose KV peak is its last step's, `context` - 1 tokens a row at most (its
    last token is never fed): a sliding run's KV peak comes while its window fills, its ids short (the tiny
    Llama at batch 2, context 206: 288 B of them where the full cache's last update held 6,560, 205 tokens a
    row), as many a row and token as the run's update held (`update_token_row_bytes`), where told: its peak
    elsewhere may have held more (5.17's concatenation). Before, `context` tokens a row: a sliding cache
    planned from a dynamic run at its own context was a token of ids above its recording (32 B at 2 rows).
    `held`: the token tensors of another update moment than the KV peak's (full_update's).

    `told`: how the plan grows the update's activations (`Gain`, the update's bytes a row and token, the
    share of them fewer rows keep); where those bytes are told, the held tensors follow the rows alone and
    each token attended more adds its token tensors' bytes, which the growth already counts. Before, the
    held tensors grew in proportion to the context there too, beside those bytes: the tiny Llama (4 rows,
    40-token prompt, 20 new tokens) planned `--cache fp8 --context 200` said 149 B over the fp8 recording
    (4 rows x 7/3 tokens x 16 B), a sliding run of that shape planned `--cache dynamic` as many."""
    per_token = rec.update_token_row_bytes or rec.token_row_bytes
    held = rec.update_token_bytes if held is None else held
    if not per_token or held is None:
        return 0
    priced = held * scale
    gain, token_bytes, kept = told if told is not None else (None, None, 1.0)
    if gain is not None and token_bytes is not None:
        priced = held * kept * gain.rows + min(token_bytes, per_token) * gain.row_count * gain.tokens
    return max(per_token * batch * (context - 1) - math.ceil(priced), 0)


def token_growth(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """Bytes generate()'s token tensors (input ids, attention mask, position ids: `token_row_bytes` a row
    and token) add at `batch` and `context` beyond what the activations' `context_growth` gives them: they
    grow by a token at every step whatever the cache, while a window stops the attended tokens. None where
    the growth is the context's (a full cache); `(context - window - 1)` tokens a row where every layer
    slides (before, none: the tiny Llama at batch 2, planned from context 12 at 206, was 6,208 B below
    its recording, 2 rows x 194 tokens x 16 B). And those of the prompt's length, by the tokens a longer
    prompt adds (`prompt_token_growth`)."""
    prompt_tokens = prompt_token_growth(req, rec, batch, context)
    per_token = rec.token_row_bytes
    if not per_token:
        return prompt_tokens
    attended, at_run = _attended(req, context), _attended(req, rec.context)
    # tokens a row the growth misses: context - rec.context * growth, over `at_run` to stay in integers;
    # where the activations grow by the tokens attended more (`Gain`), context - rec.context less those
    missed = context * at_run - rec.context * max(attended, at_run)
    missed = max(missed, (context - rec.context - max(attended - at_run, 0)) * at_run)
    return prompt_tokens + (-(-per_token * batch * missed // at_run) if missed > 0 else 0)


def prompt_token_growth(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """Bytes the decode peak's tensors of the prompt's length (`RecordedPeak.prompt_row_bytes` a row and
    token) add at a longer prompt, `batch` rows of the tokens added (the rows' growth is the activations'):
    a longer context alone leaves them, and their tokens are no context's (before, the tiny Llama 3 at
    batch 1 planned from a 16-token prompt at 64 was 384 B below its recording, 48 x 8 B)."""
    if not rec.prompt_row_bytes:
        return 0
    run = run_request(req, rec)
    added = kv_sizes(req, batch, context).prompt - kv_sizes(run, rec.batch, rec.context).prompt
    return rec.prompt_row_bytes * batch * added if added > 0 else 0


def prefill_peaks(rec: RecordedPeak, grown: float, prompt_grown: float) -> bool:
    """Whether a plan's peak is its prefill as far as the run tells: the run peaked at its own, or the plan's
    prefill grows more than its steps (a longer prompt). A quantized cache's prefill then makes the
    backend's quantize temporaries, which no run on another cache measured (`quantized_prefill_note`):
    such a plan keeps its update's copies on top of the peak's activations, a bound that covers them where
    measured (the tiny Llama, hqq, a 40-token prompt: recorded 1,908,648 B, planned 1,942,424)."""
    return rec.phase == "prefill" or prompt_grown > grown


def rows_freed(rec: RecordedPeak, batch: int) -> int:
    """Bytes of the run's peak moment's activations that `batch` rows, fewer than the run's, free: the
    batch-first ones (`RecordedPeak.row_activation_bytes`, diagnose_rows' split) in proportion to the rows
    dropped, as `kvtrace diagnose` prices its smaller batch, so that both give one figure. None freed where
    the recording does not tell them apart, or for as many rows or more."""
    row_bytes = rec.row_activation_bytes
    if row_bytes is None or batch >= rec.batch:
        return 0
    return round(min(row_bytes, rec.activations_bytes) * (rec.batch - batch) / rec.batch)


def decode_beside_fewer_rows(rec: RecordedPeak, batch: int) -> int | None:
    """What a decode step's end holds beside the weights and KV at `batch` rows, fewer than the run's, where
    the run peaked at its prefill: the most its decode steps held (`RecordedPeak.decode_activations_bytes`),
    their batch-first bytes freed in proportion, the rest (the logits processors' vectors over the
    vocabulary) kept. The peak's activations, scaled, leave those vectors out: the demo's Llama recorded
    with a static cache at 8 rows, planned at 1, said 55,172,433 B where the batch-1 static recording
    peaked at a step's end at 55,879,783. None where the run peaked decoding (its peak is that moment), at
    as many rows or more, or where the run does not tell."""
    decode, row_bytes = rec.decode_activations_bytes, rec.decode_row_bytes
    if rec.phase != "prefill" or decode is None or row_bytes is None or batch >= rec.batch:
        return None
    return beside_at_rows(decode, row_bytes, rec.batch, batch)  # as `kvtrace diagnose`'s batch remedy


def prefill_growth(run: PlanRequest, rec: RecordedPeak, prompt: int) -> float:
    """How much a prefill's activations grow from the run's to the plan's, for a row: they follow the
    prompt's length, whatever the window (a prefill attends over the whole prompt). A static cache's prefill
    may attend over all of its length too, yet only attention's tensors over it grow with it, where they do
    (`static_prefill_bytes`): before, all grew in proportion to it, and so did the decode steps' bound
    from them (the demo's tiny Llama 3, bf16, batch 1, 20-token prompt, static, planned from context 44 at
    220: 14.56 MiB of activations where the recording held 3.80 MiB)."""
    return max(prompt_ratio(run, rec, prompt), 1.0)


def prompt_ratio(run: PlanRequest, rec: RecordedPeak, prompt: int) -> float:
    """The plan's prompt over the run's, below 1 too: a shorter prompt's prefill (`shorter_prefill`)."""
    return prompt / kv_sizes(run, rec.batch, rec.context).prompt


def shorter_prefill(
    moments: tuple[PrefillMoment, ...],
    held: int | None,
    rows: float,
    shorter: float,
    squared: bool,
    at: PrefillMoment | None = None,
) -> int:
    """Bytes the run's prefill `moments` (`RecordedPeak.prefill_moments`) hold less at `rows` times the run's
    rows and a prompt `shorter` times its (below 1), each its prompt's bytes in proportion but for the `held`
    ones the step never frees (`RecordedPeak.prefill_held_bytes`), eager's mask and scores with the prompt
    squared where `squared` (`pairs_squared`), else in proportion: the same figure `kvtrace diagnose` prices a
    shorter prompt with at a prefill peak (analyzers.planning.diagnose_prompt_remedies). Where `at`, the
    peak's own moment (`RecordedPeak.prefill_peak_moment`), is told, what that moment holds less, as it is
    what the figure is taken from: the prefill's most beside the KV may be another layer's moment, holding
    less KV, whose shrink was larger (a tiny Qwen3-MoE with eager experts, 2 rows of 300 tokens peaking in its
    last layer, planned at a 150-token prompt, was 25,944 B under its recording, its first layer's shrink
    taken; 14,094 B over after, the step's ids kept).
    Before, a shorter prompt kept the prefill's activations as measured (an upper bound): the tiny Llama 3
    with an 8,192-wide MLP, 2 rows of 2,000 tokens, planned at a 983-token prompt, said 411,833,192 B where
    the recording at that prompt peaked at 209,507,144 (209,556,001 after: the step's ids and mask kept at
    the run's prompt). 0 at the run's prompt or longer."""
    if shorter >= 1:
        return 0
    shrunk = moments if at is None else (at,)
    return moments_grown(shrunk, rows, 1.0, squared) - moments_grown(
        shrunk, rows, shorter, squared, held or 0
    )


def static_mask_bytes(req: PlanRequest, run: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """Bytes a static cache's decode step holds in its attention mask, a row over every position of the
    cache, which the run's cache may not have made (a sliding cache's covers its window, a dynamic cache's
    sdpa takes none at a decode step): all of them, beyond a static run's own; a bool a position under
    sdpa, else an element of the compute dtype (eager's, a bound for another attention). The tiny Llama,
    2 rows, context 12, planned static from a run with a window of 4 was 22 B below the static recording,
    its mask over 11 positions (the static prefill's growth with its length had covered it before). 0 for
    another cache, or the run's own."""
    if req.cache != "static" or same_cache_as_run(req):
        return 0
    held = _attended(run, rec.context) if run.cache == "static" else 0
    more = _attended(req, context) - held
    element = 1 if rec.attn_implementation == "sdpa" else dtype_bytes_for(req.effective_compute_dtype, 1)
    return batch * more * element if more > 0 else 0
