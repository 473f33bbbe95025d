"""A plan from a recorded run's peak (`kvtrace plan --from-run`): the run's measured peak moved to another
batch, context or cache, its activations grown with the rows and the tokens attended (`recorded_peak_at`),
and floors for the plan's own worst moments the run never reached (its prefill, its last decode step's
attention copies, an encoder pass). Pure arithmetic, no torch.

A module of its own because it prices a measurement, not a config: it reads a `RecordedPeak` and leans on
the KV arithmetic of each cache kind (analyzers.planning.plan_kv's `kv_sizes`) for the KV at each moment,
whereas plan_kv derives all from the geometry. plan_kv's `peak_at` calls `recorded_peak_at` when the request
carries a recording (imported there at call time: this module imports plan_kv).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal, NamedTuple

from analyzers.planning.beam_tensors import beam_search_growth
from analyzers.planning.encoder_pass import encoder_pass_bytes
from analyzers.planning.fp8_update import fp8_update_bytes
from analyzers.planning.full_update import full_update_beside, full_update_mask_bytes
from analyzers.planning.plan_kv import kv_sizes
from analyzers.planning.plan_types import PREALLOCATED_CACHES, PlanRequest, RecordedPeak
from analyzers.planning.presets import dtype_bytes_for
from analyzers.planning.recorded_dtype import in_compute_dtype
from analyzers.planning.recorded_run import run_request, same_cache_as_run
from analyzers.planning.recorded_terms import (
    Gain,
    attended_gain,
    attention_copies,
    beside_at_end,
    context_growth,
    covering_moments,
    decode_beside_fewer_rows,
    fp8_prefill_attending,
    grown_with_prompt,
    moments_grown,
    pairs_squared,
    prefill_growth,
    prefill_moment_kv,
    prefill_peaks,
    prompt_bytes_kept,
    prompt_ratio,
    rows_freed,
    scaled_activations,
    shorter_prefill,
    static_mask_bytes,
    step_end_beside,
    step_end_token_bytes,
    token_growth,
    unseen_at_end,
    update_token_growth,
)
from analyzers.planning.sdpa_repeats import sdpa_copies_unmeasured, sdpa_repeats_kv
from analyzers.planning.static_prefill import (
    prefill_attention_bytes,
    static_prefill_beside,
    static_prefill_parts,
)

__all__ = ["ActivationsMoment", "RecordedMoment", "recorded_peak_at", "recorded_peak_moment"]

# A moment of a plan from a recording: (bytes beside the reserve, of which the KV it holds)
Moment = tuple[int, int]

# Which moment a plan's activations come from (`PlanResult.activations_moment`): the run's peak moved to the
# plan (`_recorded_peak_at`), the plan's prefill or its KV peak (its last decode step's cache update) with
# what the run held at its own (`_moment_floors`, and another cache's moments), a decode step's end at fewer
# rows than a run that peaked at its prefill (`_decode_floor`), the last decode step attending over a longer
# context (`_attention_floor`), an encoder-decoder's encoder pass. Before, the prefill's and the update's
# were said "run_peak": the text called them "the run's at the peak's moment"
ActivationsMoment = Literal[
    "run_peak", "prefill", "last_update", "decode_step_end", "decode_attention", "encoder_pass"
]
# a moment and which it is, as `_recorded_peak_at` weighs them
NamedMoment = tuple[ActivationsMoment, Moment]


class RecordedMoment(NamedTuple):
    """The plan's worst moment from a recording: its bytes beside the reserve, the KV it holds, and which
    moment it is, so that the plan says where its activations came from (a decode step's end is not the
    run's peak scaled)."""

    peak_bytes: int
    kv_bytes: int
    activations_moment: ActivationsMoment


def _larger(*moments: NamedMoment) -> NamedMoment:
    """The moment that needs the most bytes (the first of equals)."""
    return max(moments, key=lambda named: named[1][0])


def recorded_peak_at(req: PlanRequest, batch: int, context: int) -> int:
    """The bytes of `recorded_peak_moment`."""
    return recorded_peak_moment(req, batch, context).peak_bytes


def recorded_peak_moment(req: PlanRequest, batch: int, context: int) -> RecordedMoment:
    """The plan's worst moment, its bytes beside the reserve and the KV it holds: `_recorded_peak_at`, and
    no less than a decode step's attention over the longer context holding its copies of the KV beside the
    final KV and the peak's activations (`_attention_floor`), nor than an
    encoder-decoder model's encoder pass at the planned encoder length, before any KV
    (`encoder_pass_bytes`); a beam search's, with the growth of its tensors over the generation's length,
    which every moment of it holds (`beam_search_growth`). The KV is the moment's: a step's end or a
    prefill holds no growth copy, and the encoder pass no KV. Of equals, the first in that order."""
    assert req.recorded is not None
    encoder = (req.weights_bytes + encoder_pass_bytes(replace(req, batch=batch)), 0)
    prompt = kv_sizes(req, batch, context).prompt
    beams = beam_search_growth(req.recorded, req.beams, batch, prompt, context)
    moments: tuple[tuple[ActivationsMoment, Moment], ...] = (
        _recorded_peak_at(req, batch, context),
        ("decode_attention", _attention_floor(req, batch, context)),
        ("encoder_pass", encoder),
        ("decode_step_end", _decode_floor(req, batch, context)),
    )
    name, (peak, kv) = max(moments, key=lambda named: named[1][0])
    return RecordedMoment(peak + beams, kv, name)


def _decode_floor(req: PlanRequest, batch: int, context: int) -> Moment:
    """A decode step's end at fewer rows than a run that peaked at its prefill: the weights, the final KV
    and what the run's decode steps held beside theirs, its rows' share freed (`decode_beside_fewer_rows`).
    (0, 0) where the run does not call for it."""
    assert req.recorded is not None
    beside = decode_beside_fewer_rows(req.recorded, batch)
    if beside is None:
        return 0, 0
    kv = kv_sizes(req, batch, context).end_bytes
    return req.weights_bytes + kv + beside, kv


def _recorded_peak_at(req: PlanRequest, batch: int, context: int) -> NamedMoment:
    """The peak a recorded run would reach at `batch` and `context`, priced as `kvtrace diagnose` prices
    its remedies from the run's peak moment (analyzers.planning.diagnose_remedies): the KV of that moment
    moves as the arithmetic says; a smaller batch frees the moment's batch-first activations in proportion
    (`rows_freed`, diagnose's figure for that batch), the rest stay as measured, as all do where the rows
    are not told apart and when the context shrinks (they shrink too: an upper bound); they grow in
    proportion when the batch or context grows (an upper bound where they are a fixed part plus parts per
    row and per token). The run's own settings give its own peak exactly.

    The plan's own worst moments can be unlike the run's (a longer prompt's prefill, a last decode step the
    run never reached): each carries the activations the run allows it (`_moment_floors`).

    Another cache kind, KV dtype, window or beams moves the moment (a static cache's prefill attends over
    all of its length, a dynamic cache peaks at its growth copy): its KV with the run's peak activations, or
    its KV peak with what the run held at its own KV peak (`RecordedPeak.update_activations_bytes`), the
    larger, an estimate (analyzers.planning.run_peak's note says so). Either grows from the run's context as
    the planned cache's attended tokens do (`context_growth`), and generate()'s token tensors with every
    token where that is less (`token_growth`).

    A compute dtype wider than the run's (`--dtype fp32` of a bf16 run) grows the activations first, all
    but those in no model dtype (`in_compute_dtype`)."""
    assert req.recorded is not None
    rec = in_compute_dtype(req.recorded, req.effective_compute_dtype)  # a wider dtype's activations
    run = run_request(req, rec)
    rows = max(batch / rec.batch, 1.0)
    stretch = context_growth(req, rec, context)
    grown = rows * stretch
    gain = Gain(rows, stretch, max(batch, rec.batch), attended_gain(req, rec, context))
    tokens = token_growth(req, rec, batch, context)  # generate()'s ids and mask, where `grown` misses them
    freed = rows_freed(rec, batch)
    activations = rec.activations_bytes - freed  # at the plan's rows, before the context grows them
    fixed = rec.batch_fixed_bytes  # the vocabulary-long vectors, which more rows keep
    growth = gain.grown(activations, rec.context_token_bytes, fixed) - activations
    floors = _moment_floors(req, run, rec, batch, context)
    if not same_cache_as_run(req):
        sizes = kv_sizes(req, batch, context)
        at_end_most = beside_at_end(run, rec)  # once: three terms read it
        unseen = unseen_at_end(rec, at_end_most)
        longer = prefill_growth(run, rec, sizes.prompt)
        prompt_grown = rows * longer
        # a static cache's prefill: the run's prefill activations grown with the prompt, and attention's
        # tensors over the cache's length, which the run's prefill did not make
        at_prefill = grown_with_prompt(activations + unseen, fixed, rows, longer, rec.prefill_prompt_bytes)
        kept_prefill = 1 - freed / max(rec.activations_bytes, 1)  # fewer rows keep this share of them
        prefill_named: ActivationsMoment = "run_peak"  # the peak's, grown with the prompt
        if rec.prefill_activations_bytes is not None and rec.phase == "decode":
            prefill_named = "prefill"
            # measured during its prefill, as `kvtrace diagnose`'s static cache remedy takes them: not its
            # decode step's end (the logits processors' vectors). Before, the demo's Llama (8 rows, 20-token
            # padded prompt, 64 new tokens) planned static from its dynamic run said 126.22 MiB where
            # diagnose priced at most 122.29 MiB "as plan prices it" (the recording: 111.87 MiB)
            beside_prefill, prefill_fixed = _beside_prefill(run, rec)
            kept_prompt = prompt_bytes_kept(rec, kept_prefill)
            at_prefill = grown_with_prompt(
                beside_prefill * kept_prefill, prefill_fixed, rows, longer, kept_prompt
            )
        at_prefill = _with_attention(req, run, rec, batch, context, at_prefill, kept_prefill, prompt_grown)
        # a step's end, holding this cache's KV, holds what the run held at its own step's end: where the
        # run peaked elsewhere (a dynamic cache's growth copy), at most its peak less its weights and final
        # KV, the logits it ended with unseen at its peak (a sliding cache planned from a dynamic run at its
        # context 206 was 27,740 B, 4.4%, below the recording), grown as all are (an upper bound)
        mask = static_mask_bytes(req, run, rec, batch, context)
        at_end = activations + growth + gain.grown(unseen, None) + mask
        ended = step_end_beside(rec, activations, at_end_most)
        if ended < activations:
            # a run that peaked at its prefill ended its steps beside less than the prefill held: at most
            # its peak less its weights and final KV. Before, the prefill's went beside this cache's final
            # KV: the tiny Llama (8 rows, 20-token prompt, 40 new tokens) planned fp8 from its dynamic run
            # said 1,045,416 B where the fp8 recording peaked at its prefill at 1,005,480
            # grown by what a token adds to it where the run tells it (`step_end_token_bytes`)
            at_end = gain.grown(ended, step_end_token_bytes(rec, at_end_most), fixed) + mask
        at_peak = max(at_end, at_prefill)
        update = full_update_beside(req, rec)
        quantize_unpriced = req.cache == "quantized" and req.kv_dtype != "fp8"
        if update is None or (quantize_unpriced and prefill_peaks(rec, grown, prompt_grown)):
            # the update's copies beside: a bound
            named = prefill_named if at_prefill > at_end else "run_peak"  # `at_peak`'s
            return named, (
                req.weights_bytes + sizes.step_peak_bytes + at_peak + tokens,
                sizes.step_peak_bytes,
            )
        # Two moments, never live together: the run's peak (a step's end, its logits) holding this cache's
        # KV, and this cache's KV peak (inside an update, or a beam search's reorder) beside what the run
        # held at its own KV peak; fewer rows keep the share of them that `rows_freed` keeps at the peak
        kept = 1 - rows_freed(rec, batch) / max(rec.activations_bytes, 1)
        update_fixed = rec.update_batch_fixed_bytes
        beside_update = update.activations_bytes * kept
        in_update = max(
            gain.grown(beside_update, update.context_token_bytes, update_fixed),
            grown_with_prompt(beside_update, update_fixed, rows, longer, prompt_bytes_kept(rec, kept)),
        )
        scale = kept * max(grown, prompt_grown)
        told = (gain, update.context_token_bytes, kept)
        in_update += update_token_growth(rec, batch, context, scale, update.token_bytes, told)
        in_update += full_update_mask_bytes(req, rec, batch, context)
        # the step's end holds the final KV beside the step's activations, the prefill the prompt's KV
        # beside the prefill's: a sliding cache's prompt, held whole until its first decode step, goes
        # beside its prefill's activations, not a step's end's. Before, the larger KV went beside the
        # larger activations: the demo's Llama planned at --cache sliding --window 10 said 78.67 MiB where
        # the recording peaked at its prefill at 74.74 MiB
        moment_kv = prefill_moment_kv(req, rec, batch, context)
        at_prefill_moment = moment_kv + at_prefill + fp8_prefill_attending(req, rec, batch, context) + tokens
        step_end = _larger(
            ("run_peak", (sizes.end_bytes + at_end + tokens, sizes.end_bytes)),
            (prefill_named, (at_prefill_moment, moment_kv)),
        )
        named, (peak, kv) = _larger(
            step_end, ("last_update", (sizes.step_peak_bytes + in_update, sizes.step_peak_bytes))
        )
        return named, (req.weights_bytes + peak, kv)
    moment_kv = _moment_kv(req, rec, batch, context)
    moved = moment_kv - _moment_kv(run, rec, rec.batch, rec.context)
    if rec.phase == "prefill":
        # The run peaked at its prefill: that moment's activations follow the rows and the prompt, not the
        # context, and its ids are the prompt's; the longer context's decode steps are `floors`. Before, they
        # grew with the context: the tiny Llama at batch 2, a 40-token prompt, planned from context 44 at
        # 206 was 1,606,175 B where the recording peaked at 840,504 (+91%)
        prompt = kv_sizes(req, batch, context).prompt
        longer = prefill_growth(run, rec, prompt)
        kept = 1 - freed / max(rec.activations_bytes, 1)
        # and attention's prompt x prompt tensors beyond the run's (`prefill_attention_bytes`)
        quadratic = prefill_attention_bytes(req, run, rec, batch, context, prompt)
        grown_at_prefill = grown_with_prompt(activations, fixed, rows, longer, prompt_bytes_kept(rec, kept))
        moments = covering_moments(rec, rec.activations_bytes)
        if moments:
            # the peak is one of the prefill's moments: by what their most grows (the floor prices each),
            # eager's mask and scores within the moments that hold them, where the run tells them
            squared = pairs_squared(req, rec)
            grown_at_prefill = activations + moments_grown(moments, rows * kept, longer, squared)
            grown_at_prefill -= moments_grown(moments, 1.0, 1.0)
            quadratic = 0 if squared else quadratic
        # a shorter prompt's prefill holds less of what follows the prompt, where the run's moments tell it
        shorter = prompt_ratio(run, rec, prompt)
        squared = pairs_squared(req, rec)
        shrunk = (
            shorter_prefill(
                moments, rec.prefill_held_bytes, rows * kept, shorter, squared, rec.prefill_peak_moment
            )
            if moments
            else 0
        )
        growth, tokens = max(grown_at_prefill - activations, 0) + quadratic - shrunk, 0
    grew = (req.weights_bytes - rec.weights_bytes) + moved - freed + growth + tokens
    return _larger(("run_peak", (rec.peak_bytes + grew, moment_kv)), *floors)


def _attention_floor(req: PlanRequest, batch: int, context: int) -> Moment:
    """A plan's last decode step while one layer attends over a longer context than the run's: its weights,
    the final KV, the run's peak activations grown as `_recorded_peak_at` grows them (an upper bound: the
    logits are not live then) and that layer's copies of the KV (`attention_copies`). The run's peak
    moment need not hold those copies: at a short context they are smaller than the logits, and the
    tokens a row its activations gain (`context_token_bytes`) leave them out, yet at a long one they are
    the peak (the tiny Llama with eager attention, planned from context 12 at 240, was 13.3% below its
    recording; an fp8 cache 4.9%, 19.2% planned from a dynamic run). At the run's context too where the
    planned cache makes copies the run's never did (an fp8 cache's; a static cache's under an older
    transformers' sdpa, `sdpa_repeats_kv`). (0, 0) at the run's context and cache: its peak is measured. The
    moment holds the final KV."""
    assert req.recorded is not None
    rec = in_compute_dtype(req.recorded, req.effective_compute_dtype)
    fp8_new = (
        req.cache == "quantized"
        and req.kv_dtype == "fp8"
        and not (rec.cache == "quantized" and rec.kv_dtype == "fp8")
    )
    # a static cache's decode steps repeat K and V under an older transformers' sdpa; a run on another cache
    # never did, so its peak leaves them out at its own context too
    repeats_new = sdpa_copies_unmeasured(req, rec) and not sdpa_repeats_kv(rec.cache, rec)
    copies = attention_copies(req, rec, batch, context)
    if not copies or (not attended_gain(req, rec, context) and not fp8_new and not repeats_new):
        return 0, 0
    kv = kv_sizes(req, batch, context).end_bytes
    if rec.phase == "prefill" and same_cache_as_run(req):
        # A prefill's activations are no decode step's: the step's are those the run held at its KV peak,
        # grown to the plan (`_beside_late`). Before, the prefill's grew with the context: the tiny Llama,
        # eager, batch 2, a 40-token prompt, planned from context 44 at 206 was 2,305,491 B where the
        # recording peaked at 1,012,460 (+128%)
        beside = _beside_late(req, run_request(req, rec), rec, batch, context)
        beside -= _new_token_states(req, rec, batch) if rec.update_activations_bytes is not None else 0
        return req.weights_bytes + kv + beside + copies, kv
    rows, more = max(batch / rec.batch, 1.0), attended_gain(req, rec, context)
    gain = Gain(rows, context_growth(req, rec, context), max(batch, rec.batch), more)
    activations = gain.grown(
        rec.activations_bytes - rows_freed(rec, batch), rec.context_token_bytes, rec.batch_fixed_bytes
    )
    tokens = token_growth(req, rec, batch, context)
    eager_after = _new_token_states(req, rec, batch) > 0  # beside eager's copies, the update's
    update = full_update_beside(req, rec)
    if (repeats_new or fp8_new or eager_after) and update is not None:
        # The copies come right after a layer's update, mid-forward: beside them, what the run held at its
        # KV peak (a dynamic cache's last update), not at its peak, which may be a step's end (its logits
        # processors' vectors) or its prefill. The tiny Llama (bf16, 8 rows, 20-token prompt, 100 new
        # tokens) planned static from its dynamic run under 5.17 with the peak's said 1,000,996 B where
        # the static recording peaked at 862,148 B, 16.1% over; the H200's Llama 3 8B shape, batch 24,
        # 8,192-token prompt, with its prefill's 23.5 GB, 68.60 GB where the static run peaked at 65.35 GB
        kept = 1 - rows_freed(rec, batch) / max(rec.activations_bytes, 1)
        activations = gain.grown(
            update.activations_bytes * kept, update.context_token_bytes, rec.update_batch_fixed_bytes
        )
        told = (gain, update.context_token_bytes, kept)
        scale = kept * rows * gain.stretch
        tokens = update_token_growth(rec, batch, context, scale, update.token_bytes, told)
        tokens += full_update_mask_bytes(req, rec, batch, context)
        activations -= _new_token_states(req, rec, batch)
        if fp8_new:
            # An fp8 cache dequantizes inside its update (`Fp8QuantizedLayer.update`), while the layer's
            # old K and V are still held beside their torch.cat copy: its KV peak, not its final KV. Before,
            # the copies went beside the peak's step-end activations (the logits): the demo's Llama (8 rows,
            # 20-token prompt, 64 new tokens, fp32) planned fp8 from its dynamic run said 99,402,684 B where
            # the fp8 recording peaked at 84,634,640 (+17.4%). Beside them, the update's 8-bit K and V of the
            # new token, which no KV log counts (they are no cache storage) and the run's update never held:
            # `fp8_update_bytes`, as diagnose prices the update (before, 32,768 B under the recording)
            sizes = kv_sizes(req, batch, context)
            kv = sizes.step_peak_bytes
            layer = max(k + v for k, v in req.geometry.layer_kv_widths)
            held, _ = fp8_update_bytes(batch * layer, 0, sizes.kv_tokens)
            copies += max(sizes.kv_bytes + held - kv, 0)
    return req.weights_bytes + kv + activations + tokens + copies, kv


def _new_token_states(req: PlanRequest, rec: RecordedPeak, batch: int) -> int:
    """Bytes of a decode step's new K and V (one position of a layer, every row) that the run's KV peak, a
    dynamic cache's update, held and eager attention's copies do not: the update returns the layer's whole K
    and V, the attention rebinds its names to them, and the new token's are freed before `repeat_kv` copies
    the returned ones. So beside those copies a plan puts what the run held at its KV peak less these, not
    its peak's activations (the logits a step ends with, which no layer's attention holds). 0 but for an
    eager run planned on its own dynamic cache. Before, the peak's: the tiny Llama (fp32, 2 rows, 3-token
    prompt), eager, planned from context 12 at 240 said 1,393,436 B where the recording peaked at 1,341,036
    in its last layer's attention (+3.9%)."""
    if rec.attn_implementation != "eager" or rec.cache != "dynamic" or not same_cache_as_run(req):
        return 0
    compute = dtype_bytes_for(req.effective_compute_dtype, 1)
    return batch * max(k + v for k, v in req.geometry.layer_kv_widths) * compute


def _moment_floors(
    req: PlanRequest, run: PlanRequest, rec: RecordedPeak, batch: int, context: int
) -> list[NamedMoment]:
    """The plan's prefill and its KV peak, each with the activations the run allows that moment, grown as
    it grows. The prefill's are what the run held beside its weights and KV during its prefill, where the
    allocator's events tell it (`RecordedPeak.prefill_activations_bytes`); else at most its peak less its
    weights and prefill KV (`prefill_bound_note`). A finished run reached its KV peak, so the memory beside
    its weights and KV there was at most its peak less those. A run cut short never reached its last steps:
    a decode step it did reach stands for them (`_beside_late`), and, where it peaked at one, the plan's last
    step's end holds the context's KV beside that peak's activations (`_cut_step_end`); cut in or right
    after its prefill, its measured activations stand for theirs (an estimate: a step's activations are a
    prefill's at most where the prefill processes more tokens than a step, as in the tour's runs)."""
    sizes = kv_sizes(req, batch, context)
    kept = 1 - rows_freed(rec, batch) / max(rec.activations_bytes, 1)
    beside_prefill, prefill_fixed = _beside_prefill(run, rec)
    late = req.weights_bytes + sizes.step_peak_bytes + _beside_late(req, run, rec, batch, context)
    floors: list[NamedMoment] = [("last_update", (late, sizes.step_peak_bytes))]
    if rec.cut_short and rec.phase == "decode" and not _held_growth_copy(run, rec):
        floors.append(("run_peak", _cut_step_end(req, rec, batch, context)))  # the peak's, at a step's end
    rows, longer = max(batch / rec.batch, 1.0), prefill_growth(run, rec, sizes.prompt)
    early = rows * longer
    attention = prefill_attention_bytes(req, run, rec, batch, context, sizes.prompt)
    # A run that peaked decoding, planned at a shorter context: its decode steps shrink, its prefill stays,
    # and may be the peak. Before, it was left out: the walkthrough's 3-layer Llama at batch 2, 200 new
    # tokens, planned at context 20, said 2,760,504 B where that run peaked at its prefill, 2,843,624 B
    shorter = rec.phase == "decode" and context < rec.context
    if early > 1.0 or attention or shorter:
        # A prefill of more rows or tokens than the run's, or over a longer static cache: its own moment.
        # Not otherwise: the run's own prefill is within its peak, and the measured figure is the most
        # beside the KV at any moment of it, with the whole prefill KV beside that (an upper bound where its
        # KV was still filling then)
        prefill = grown_with_prompt(
            beside_prefill * kept, prefill_fixed, rows, longer, prompt_bytes_kept(rec, kept)
        )
        moments = covering_moments(rec, beside_prefill)
        if moments:
            squared = pairs_squared(req, rec)  # eager's mask and scores within their moments
            # more rows of a shorter prompt: each moment's prompt bytes shrink with it, but for what the
            # step never frees (`moments_grown`), as `shorter_prefill` shrinks the peak's. Before, they
            # stayed at the run's prompt: the eager Qwen3-MoE's 2 rows of 300 tokens planned at 3 of 200
            # said 2,992,292 B where the recording peaked at 2,253,696 (+32.8%), 3 rows of 300 priced
            ratio = prompt_ratio(run, rec, sizes.prompt)
            prefill = moments_grown(moments, rows * kept, ratio, squared, rec.prefill_held_bytes or 0)
            attention = 0 if squared else attention
        if attention:
            prefill = _with_attention(req, run, rec, batch, context, prefill, kept, early)
        floors.append(("prefill", (req.weights_bytes + sizes.prefill_bytes + prefill, sizes.prefill_bytes)))
    return floors


def _cut_step_end(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> Moment:
    """The plan's last decode step's end for a run cut short that peaked at a decode step: the context's KV
    beside that step's activations, grown as the run's peak grows them (`_recorded_peak_at`). The run's peak
    holds the tokens it reached, not the context's, so the peak moved by the KV (`_moment_kv`) stays at
    them; a run whose peak was a step's end (its logits, the logits processors' vectors) may hold more
    there than at its cache updates (`_beside_late`)."""
    sizes = kv_sizes(req, batch, context)
    rows = max(batch / rec.batch, 1.0)
    more = attended_gain(req, rec, context)
    gain = Gain(rows, context_growth(req, rec, context), max(batch, rec.batch), more)
    activations = rec.activations_bytes - rows_freed(rec, batch)
    at_end = gain.grown(activations, rec.context_token_bytes, rec.batch_fixed_bytes)
    at_end += token_growth(req, rec, batch, context)
    kept = 1 - rows_freed(rec, batch) / max(rec.activations_bytes, 1)
    at_end += _reached_token_growth(rec, batch, context, rows * kept, at_update=False)
    return req.weights_bytes + sizes.end_bytes + at_end, sizes.end_bytes


def _reached_token_growth(rec: RecordedPeak, batch: int, context: int, scale: float, at_update: bool) -> int:
    """Bytes generate()'s token tensors (ids, mask: int64 a row and token) lack at a run cut short's decode
    moment, measured at the tokens it reached, against the plan's last decode step, whose tensors hold
    `context` - 1 tokens a row (the last token is never fed) up to the run's own context (beyond it
    `token_growth` adds them, as for a finished run). `at_update`: the moment measured is the run's last
    cache update (`update_token_bytes`), else its peak (`peak_token_bytes`); `scale`: the rows the plan
    grows them by. 0 for a finished run, whose last step held them whole. Before, a run killed in step 150
    of 200 (the walkthrough's 3-layer Llama at batch 2) planned as launched kept them at 160 tokens a row,
    1,632 B below the whole run's recording."""
    if not rec.cut_short or rec.phase != "decode":
        return 0
    held = rec.update_token_bytes if at_update else rec.peak_token_bytes
    per_token = (rec.update_token_row_bytes if at_update else None) or rec.token_row_bytes
    if held is None or not per_token:
        return 0
    tokens = min(context, rec.context) - 1
    return max(per_token * batch * tokens - math.ceil(held * scale), 0)


def _with_attention(
    req: PlanRequest,
    run: PlanRequest,
    rec: RecordedPeak,
    batch: int,
    context: int,
    prefill: int,
    kept: float,
    grown: float,
) -> int:
    """The plan's prefill with attention's tensors over the positions the run's prefill did not attend
    over (`prefill_attention_bytes`): a static cache's beside the run's last layer's attention, grown as the
    prefill grows (`grown`, the rows times the prompt; the share `kept` of fewer rows), or its prefill's
    most, the larger (`static_prefill_beside`, the figure `kvtrace diagnose`'s static cache remedy gives);
    another cache's beside the prefill's most (`prefill`)."""
    prompt = kv_sizes(req, batch, context).prompt
    if req.cache != "static":
        return prefill + prefill_attention_bytes(req, run, rec, batch, context, prompt)
    across, in_layer = static_prefill_parts(req, run, rec, batch, context, prompt)
    measured = rec.prefill_attention_bytes if run.cache != "static" else None
    attention = None if measured is None else scaled_activations(measured * kept, None, grown)
    return static_prefill_beside(prefill, attention, across, in_layer)


def _beside_prefill(run: PlanRequest, rec: RecordedPeak) -> tuple[int, int | None]:
    """What the run held beside its weights and KV at its prefill (`_moment_floors`), and the
    vocabulary-long vectors of it, which more rows keep (None: not told)."""
    beside_prefill = rec.prefill_activations_bytes
    if beside_prefill is None:
        run_sizes = kv_sizes(run, rec.batch, rec.context)
        beside_prefill = max(rec.peak_bytes - rec.weights_bytes - run_sizes.prefill_bytes, 0)
    # at a prefill peak, measured there: its KV may differ from the arithmetic's prompt (taken below)
    prefill_fixed = rec.prefill_batch_fixed_bytes if rec.prefill_activations_bytes is not None else None
    if rec.phase == "prefill" and beside_prefill < rec.activations_bytes:
        prefill_fixed = rec.batch_fixed_bytes
    beside_prefill = max(beside_prefill, rec.activations_bytes) if rec.phase == "prefill" else beside_prefill
    return beside_prefill, prefill_fixed


def _beside_late(req: PlanRequest, run: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """The activations beside the weights and KV at the plan's KV peak, its last decode steps
    (`_moment_floors`): what the run held at its own KV peak, or the bound of it, grown to the plan."""
    sizes = kv_sizes(req, batch, context)
    run_sizes = kv_sizes(run, rec.batch, rec.context)
    rows = max(batch / rec.batch, 1.0)
    # fewer rows keep the share of the peak moment's activations that stays (`rows_freed`), at each moment
    kept = 1 - rows_freed(rec, batch) / max(rec.activations_bytes, 1)
    beside_prefill, prefill_fixed = _beside_prefill(run, rec)
    token_bytes: int | None = None  # what a token adds to `beside_peak`; None: not told, all grow
    peak_fixed: int | None = None
    at_update = (
        False  # `beside_peak` is the update's (its token tensors `update_token_bytes`), not the peak's
    )
    if rec.update_activations_bytes is not None and rec.update_context_token_bytes is not None:
        # measured at the run's KV peak, a decode step's cache update, which the plan's KV peak repeats (the
        # bound also holds the logits of the step's end, which come after the update); a run cut short
        # measured it at the last update it reached
        beside_peak, token_bytes = rec.update_activations_bytes, rec.update_context_token_bytes
        peak_fixed = rec.update_batch_fixed_bytes
        at_update = True
        if _held_growth_copy(run, rec) and rec.activations_bytes > beside_peak:
            # its peak, inside another update, held more: a run stopped inside a step (a SIGTERM, an OOM)
            # last logged an early layer's update of it, which holds less than a later layer's (the
            # walkthrough's Llama stopped as layer 1 of step 150 began: 25,464 B there, 26,456 at its peak)
            beside_peak, token_bytes = rec.activations_bytes, rec.context_token_bytes
            peak_fixed = rec.batch_fixed_bytes
            at_update = False
    elif rec.cut_short and rec.phase == "decode":
        # a decode step's, at the run's peak: never its prefill's, which no decode step's KV sits beside.
        # Before, the more of the two: the walkthrough's 3-layer Llama at batch 2, stopped inside step 150
        # of 200, planned 3,203,048 B, its prefill's 126,376 B beside the KV peak, where the run stopped
        # between two steps planned 3,102,968 B
        beside_peak, token_bytes = rec.activations_bytes, rec.context_token_bytes
        peak_fixed = rec.batch_fixed_bytes
    elif rec.cut_short:
        # cut in or right after its prefill, no decode step measured: the most it held stands for theirs
        beside_peak = max(rec.activations_bytes, beside_prefill)
        peak_fixed = rec.batch_fixed_bytes if beside_peak == rec.activations_bytes else prefill_fixed
    else:
        beside_peak = max(rec.peak_bytes - rec.weights_bytes - run_sizes.step_peak_bytes, 0)
        if rec.update_activations_bytes is None and _moment_kv(run, rec, rec.batch, rec.context) >= (
            run_sizes.step_peak_bytes
        ):
            token_bytes = rec.context_token_bytes  # the peak moment held the KV peak: its activations
        # the peak's activations are within it (the run's peak less its weights and KV there): its vectors
        peak_fixed = rec.batch_fixed_bytes if beside_peak >= rec.activations_bytes else None
    stretch = context_growth(req, rec, context)
    gain = Gain(rows, stretch, max(batch, rec.batch), attended_gain(req, rec, context))
    longer = prefill_growth(run, rec, sizes.prompt)
    early = grown_with_prompt(beside_peak * kept, peak_fixed, rows, longer, prompt_bytes_kept(rec, kept))
    if rec.prefill_moments:
        # a moment of the prefill (a sliding cache's KV peak) grows as the prefill's most does
        moments = rec.prefill_moments
        early = scaled_activations(beside_peak * kept, peak_fixed, rows) + max(
            moments_grown(moments, rows * kept, longer) - moments_grown(moments, rows * kept, 1.0), 0
        )
    late = max(gain.grown(beside_peak * kept, token_bytes, peak_fixed), early)
    reached = _reached_token_growth(rec, batch, context, rows * kept, at_update)
    return late + token_growth(req, rec, batch, context) + reached


def _moment_kv(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """KV held at the run's peak moment, at `batch` and `context`: at prefill the prompt's (a preallocated
    cache's: all of it); later, a moment holding all of the run's tokens holds all of this context's, with
    the growth copy of its last update where the run's peak held the run's own KV peak (`_held_kv_peak`),
    and one earlier in the run its tokens, at most this context's."""
    sizes = kv_sizes(req, batch, context)
    if rec.phase == "prefill":
        return sizes.prefill_bytes
    if req.cache in PREALLOCATED_CACHES or rec.tokens >= rec.context - 1:
        return sizes.step_peak_bytes if _held_kv_peak(req, rec) else sizes.end_bytes
    tokens = min(rec.tokens, context - 1)
    return kv_sizes(replace(req, prompt=None), batch, tokens + 1).end_bytes if tokens >= 1 else 0


def _held_kv_peak(req: PlanRequest, rec: RecordedPeak) -> bool:
    """Whether the run peaked inside its last cache update, its KV peak live (a dynamic cache's growth copy:
    the report's KV at the peak is the run's KV peak by the arithmetic, above its final KV), rather than at a
    step's end. Its peak's activations are then beside that KV: before, the copy was counted in them too,
    the walkthrough's 3-layer Llama at batch 2, 200 new tokens, said 79.74 KiB of activations beside the KV
    and its "cache growth peak" row where the run held 27.24 KiB, its rows 53,760 B over its peak."""
    held = rec.kv_at_peak_bytes
    if held is None or rec.cache != "dynamic":
        return False
    run = kv_sizes(run_request(req, rec), rec.batch, rec.context)
    return run.step_peak_bytes > run.kv_bytes and held >= run.step_peak_bytes


def _held_growth_copy(run: PlanRequest, rec: RecordedPeak) -> bool:
    """Whether the run's peak is a decode step's cache update, a dynamic cache's growth copy live: the
    report's KV at the peak above what the cache holds at the end of the peak's step (the arithmetic's at
    its tokens), not its step's end (its logits and the logits processors' vectors, beside no copy)."""
    held = rec.kv_at_peak_bytes
    if held is None or rec.phase != "decode" or rec.cache != "dynamic":
        return False
    at_end = kv_sizes(replace(run, prompt=None), rec.batch, min(rec.tokens, rec.context - 1) + 1).kv_bytes
    return held > at_end
