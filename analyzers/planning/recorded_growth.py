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
from dataclasses import dataclass, replace

from analyzers.planning.encoder_pass import encoder_pass_bytes
from analyzers.planning.plan_kv import kv_sizes
from analyzers.planning.plan_types import PREALLOCATED_CACHES, PlanRequest, RecordedPeak
from analyzers.planning.presets import dtype_bytes_for
from analyzers.planning.recorded_dtype import in_compute_dtype
from analyzers.planning.sdpa_repeats import sdpa_copies_unmeasured, sdpa_repeats_kv
from analyzers.planning.static_prefill import attended as _attended
from analyzers.planning.static_prefill import (
    prefill_attention_bytes,
    unknown_padding_note,
    unpadded_prompts_note,
)

__all__ = [
    "padding_note",
    "prefill_bound_note",
    "quantized_prefill_note",
    "recorded_peak_at",
    "same_cache_as_run",
]


def recorded_peak_at(req: PlanRequest, batch: int, context: int) -> int:
    """`_recorded_peak_at`, and no less than a decode step's attention over the longer context holding its
    copies of the KV beside the final KV and the peak's activations (`_attention_floor`), nor than an
    encoder-decoder model's encoder pass at the planned encoder length, before any KV
    (`encoder_pass_bytes`)."""
    encoder = req.weights_bytes + encoder_pass_bytes(replace(req, batch=batch))
    return max(_recorded_peak_at(req, batch, context), _attention_floor(req, batch, context), encoder)


def _recorded_peak_at(req: PlanRequest, batch: int, context: int) -> int:
    """The peak a recorded run would reach at `batch` and `context`, priced as `kvtrace diagnose` prices
    its remedies from the run's peak moment (analyzers.planning.diagnose_remedies): the KV of that moment
    moves as the arithmetic says; a smaller batch frees the moment's batch-first activations in proportion
    (`_rows_freed`, diagnose's figure for that batch), the rest stay as measured, as all do where the rows
    are not told apart and when the context shrinks (they shrink too: an upper bound); they grow in
    proportion when the batch or context grows (an upper bound where they are a fixed part plus parts per
    row and per token). The run's own settings give its own peak exactly.

    The plan's own worst moments can be unlike the run's (a longer prompt's prefill, a last decode step the
    run never reached): each carries the activations the run allows it (`_moment_floors`).

    Another cache kind, KV dtype, window or beams moves the moment (a static cache's prefill attends over
    all of its length, a dynamic cache peaks at its growth copy): its KV with the run's peak activations, or
    its KV peak with what the run held at its own KV peak (`RecordedPeak.update_activations_bytes`), the
    larger, an estimate (analyzers.planning.run_peak's note says so). Either grows from the run's context as
    the planned cache's attended tokens do (`_context_growth`), and generate()'s token tensors with every
    token where that is less (`_token_growth`).

    A compute dtype wider than the run's (`--dtype fp32` of a bf16 run) grows the activations first, all
    but those in no model dtype (`in_compute_dtype`)."""
    assert req.recorded is not None
    rec = in_compute_dtype(req.recorded, req.effective_compute_dtype)  # a wider dtype's activations
    run = _run_request(req, rec)
    rows = max(batch / rec.batch, 1.0)
    stretch = _context_growth(req, rec, context)
    grown = rows * stretch
    gain = _Gain(rows, stretch, max(batch, rec.batch), _attended_gain(req, rec, context))
    tokens = _token_growth(req, rec, batch, context)  # generate()'s ids and mask, where `grown` misses them
    freed = _rows_freed(rec, batch)
    activations = rec.activations_bytes - freed  # at the plan's rows, before the context grows them
    fixed = rec.batch_fixed_bytes  # the vocabulary-long vectors, which more rows keep
    growth = gain.grown(activations, rec.context_token_bytes, fixed) - activations
    floors = _moment_floors(req, run, rec, batch, context)
    if not same_cache_as_run(req):
        sizes = kv_sizes(req, batch, context)
        unseen = _unseen_at_end(run, rec)
        longer = _prefill_growth(run, rec, sizes.prompt)
        prompt_grown = rows * longer
        # a static cache's prefill: the run's step-end activations grown with the prompt, and attention's
        # tensors over the cache's length, which the run's prefill did not make
        at_prefill = _prompt_grown(
            activations + unseen, fixed, rows, longer, rec.prefill_prompt_bytes
        ) + prefill_attention_bytes(req, run, rec, batch, context, sizes.prompt)
        # a step's end, holding this cache's KV, holds what the run held at its own step's end: where the
        # run peaked elsewhere (a dynamic cache's growth copy), at most its peak less its weights and final
        # KV, the logits it ended with unseen at its peak (a sliding cache planned from a dynamic run at its
        # context 206 was 27,740 B, 4.4%, below the recording), grown as all are (an upper bound)
        mask = _static_mask_bytes(req, run, rec, batch, context)
        at_end = activations + growth + gain.grown(unseen, None) + mask
        at_peak = max(at_end, at_prefill)
        beside_update = rec.update_activations_bytes
        if beside_update is None or (req.cache == "quantized" and _prefill_peaks(rec, grown, prompt_grown)):
            # the update's copies beside: a bound
            return req.weights_bytes + sizes.step_peak_bytes + at_peak + tokens
        # Two moments, never live together: the run's peak (a step's end, its logits) holding this cache's
        # KV, and this cache's KV peak (inside an update, or a beam search's reorder) beside what the run
        # held at its own KV peak; fewer rows keep the share of them that `_rows_freed` keeps at the peak
        kept = 1 - _rows_freed(rec, batch) / max(rec.activations_bytes, 1)
        update_fixed = rec.update_batch_fixed_bytes
        in_update = max(
            gain.grown(beside_update * kept, rec.update_context_token_bytes, update_fixed),
            _prompt_grown(beside_update * kept, update_fixed, rows, longer, _kept(rec, kept)),
        )
        in_update += _update_token_growth(rec, batch, context, kept * max(grown, prompt_grown))
        held = max(sizes.kv_bytes, sizes.prefill_bytes)
        return req.weights_bytes + max(held + at_peak + tokens, sizes.step_peak_bytes + in_update)
    moved = _moment_kv(req, rec, batch, context) - _moment_kv(run, rec, rec.batch, rec.context)
    if rec.phase == "prefill":
        # The run peaked at its prefill: that moment's activations follow the rows and the prompt, not the
        # context, and its ids are the prompt's; the longer context's decode steps are `floors`. Before, they
        # grew with the context: the tiny Llama at batch 2, a 40-token prompt, planned from context 44 at
        # 206 was 1,606,175 B where the recording peaked at 840,504 (+91%)
        prompt = kv_sizes(req, batch, context).prompt
        longer = _prefill_growth(run, rec, prompt)
        kept = 1 - freed / max(rec.activations_bytes, 1)
        # and attention's prompt x prompt tensors beyond the run's (`prefill_attention_bytes`)
        quadratic = prefill_attention_bytes(req, run, rec, batch, context, prompt)
        grown_at_prefill = _prompt_grown(activations, fixed, rows, longer, _kept(rec, kept))
        moments = _covering(rec, rec.activations_bytes)
        if moments:
            # the peak is one of the prefill's moments: by what their most grows (the floor prices each)
            grown_at_prefill = activations + _moments_grown(moments, rows * kept, longer)
            grown_at_prefill -= _moments_grown(moments, 1.0, 1.0)
        growth, tokens = max(grown_at_prefill - activations, 0) + quadratic, 0
    grew = (req.weights_bytes - rec.weights_bytes) + moved - freed + growth + tokens
    return max(rec.peak_bytes + grew, *floors)


def _attention_floor(req: PlanRequest, batch: int, context: int) -> int:
    """A plan's last decode step while one layer attends over a longer context than the run's: its weights,
    the final KV, the run's peak activations grown as `_recorded_peak_at` grows them (an upper bound: the
    logits are not live then) and that layer's copies of the KV (`_attention_copies`). The run's peak
    moment need not hold those copies: at a short context they are smaller than the logits, and the
    tokens a row its activations gain (`context_token_bytes`) leave them out, yet at a long one they are
    the peak (the tiny Llama with eager attention, planned from context 12 at 240, was 13.3% below its
    recording; an fp8 cache 4.9%, 19.2% planned from a dynamic run). At the run's context too where the
    planned cache makes copies the run's never did (an fp8 cache's; a static cache's under an older
    transformers' sdpa, `sdpa_repeats_kv`). 0 at the run's context and cache: its peak is measured."""
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
    copies = _attention_copies(req, rec, batch, context)
    if not copies or (not _attended_gain(req, rec, context) and not fp8_new and not repeats_new):
        return 0
    if rec.phase == "prefill" and same_cache_as_run(req):
        # A prefill's activations are no decode step's: the step's are those the run held at its KV peak,
        # grown to the plan (`_beside_late`). Before, the prefill's grew with the context: the tiny Llama,
        # eager, batch 2, a 40-token prompt, planned from context 44 at 206 was 2,305,491 B where the
        # recording peaked at 1,012,460 (+128%)
        beside = _beside_late(req, _run_request(req, rec), rec, batch, context)
        return req.weights_bytes + kv_sizes(req, batch, context).kv_bytes + beside + copies
    rows, more = max(batch / rec.batch, 1.0), _attended_gain(req, rec, context)
    gain = _Gain(rows, _context_growth(req, rec, context), max(batch, rec.batch), more)
    activations = gain.grown(
        rec.activations_bytes - _rows_freed(rec, batch), rec.context_token_bytes, rec.batch_fixed_bytes
    )
    tokens = _token_growth(req, rec, batch, context)
    if repeats_new and rec.update_activations_bytes is not None:
        # The copies come right after a layer's update, mid-forward: beside them, what the run held at its
        # KV peak (a dynamic cache's last update), not at its peak, which may be a step's end (its logits
        # processors' vectors) or its prefill. The tiny Llama (bf16, 8 rows, 20-token prompt, 100 new
        # tokens) planned static from its dynamic run under 5.17 with the peak's said 1,000,996 B where
        # the static recording peaked at 862,148 B, 16.1% over; the H200's Llama 3 8B shape, batch 24,
        # 8,192-token prompt, with its prefill's 23.5 GB, 68.60 GB where the static run peaked at 65.35 GB
        kept = 1 - _rows_freed(rec, batch) / max(rec.activations_bytes, 1)
        activations = gain.grown(
            rec.update_activations_bytes * kept, rec.update_context_token_bytes, rec.update_batch_fixed_bytes
        )
        tokens = _update_token_growth(rec, batch, context, kept * rows * gain.stretch)
    return req.weights_bytes + kv_sizes(req, batch, context).kv_bytes + activations + tokens + copies


def _attention_copies(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """Bytes one layer's attention holds over the attended tokens at a decode step beyond the cache's own
    storages, where they grow with the context: eager attention (the run's `attn_implementation`) expands K
    and V to the query heads (`repeat_kv`, where there are fewer KV heads) and makes the scores, its
    softmax in float32 (3 copies of heads x tokens, at 4 bytes: a bound); an fp8 cache dequantizes K and V
    to float32 (`Fp8QuantizedLayer._dequantize`: 3 of K's or V's copies live at once, measured), a
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
    if req.cache == "quantized" and req.kv_dtype == "fp8":
        per_token += 3 * side * 4
    eager = rec.attn_implementation == "eager"
    if eager:
        head_dim = max(geom.head_dim, geom.global_head_dim or 0)
        expanded = geom.num_attention_heads * head_dim
        if req.cache == "quantized" and req.kv_dtype != "fp8":
            per_token += 2 * side * compute
        per_token += (2 * expanded * compute if expanded > side else 0) + 3 * geom.num_attention_heads * 4
    elif sdpa_copies_unmeasured(req, rec):
        # beside the copies, the step's bool mask a position, torch's copy of it in the compute dtype (sdpa
        # takes a float mask) and the kernel's own buffers, bounded by the scores' float32 row a head (on the
        # CPU, flash attention's per-thread buffers: 4,100 B of the tiny Llama's 8 rows x 319 positions)
        expanded = geom.num_attention_heads * max(geom.head_dim, geom.global_head_dim or 0)
        if expanded > side:
            per_token += 2 * expanded * compute + 1 + compute + geom.num_attention_heads * 4
    return batch * attended * per_token


def _context_growth(req: PlanRequest, rec: RecordedPeak, context: int) -> float:
    """How much a row's activations grow from the run's context to `context`: as the tokens the planned
    cache attends over at each (at least 1: a shorter context keeps them, an upper bound). Measured from the
    run's context in the planned cache, not in the run's: at one context a step ends holding the same
    logits, ids and mask whatever the cache, so a sliding run planned on a full cache at its own context
    keeps its activations (before, they grew by context / (window + 1): on the tiny Llama at batch 2,
    context 12, window 8, +19,186 B, +3.1%, over the full cache's recording; the demo's, +88%)."""
    return max(_attended(req, context) / _attended(req, rec.context), 1.0)


def _unseen_at_end(run: PlanRequest, rec: RecordedPeak) -> int:
    """Bytes a finished run may have held beside its weights and KV at its last step's end beyond those it
    held at its peak moment: its peak less its weights, final KV and the peak's activations (none where the
    peak was that moment, or the run was cut short and never reached it)."""
    if rec.cut_short:
        return 0
    final_kv = kv_sizes(run, rec.batch, rec.context).kv_bytes
    return max(rec.peak_bytes - rec.weights_bytes - final_kv - rec.activations_bytes, 0)


@dataclass(frozen=True)
class _Gain:
    """How a plan grows a moment's activations from the run's: `rows` times the run's rows, `stretch`
    times the tokens it attends over (`_context_growth`), `row_count` rows of `tokens` tokens more."""

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
            return _scaled(activations, fixed, self.rows * self.stretch)
        return _scaled(activations, fixed, self.rows) + token_bytes * self.row_count * self.tokens


def _prompt_grown(
    activations: float, fixed: int | None, rows: float, longer: float, prompt_bytes: float | None
) -> int:
    """A prefill's `activations` at `rows` times the run's rows (all but `fixed` grow with them, `_scaled`)
    and a prompt `longer` times the run's: where the run tells what its prefill held that grows with the
    prompt (`prompt_bytes`, run_peak's `prefill_prompt_bytes`), those grow by the tokens added, the logits
    over the last position and the vectors over the vocabulary stay, as generate() makes them whatever the
    prompt; not told, all but `fixed` grow with it. Before, all grew: the tiny Llama 3 (128,256-token
    vocabulary) at batch 1, planned from a 16-token prompt at 256, said 111,149,568 B where the recording
    peaked at 73,190,324 (+51.9%), its 2.45 MiB of float32 logits over one position grown 16-fold. Each
    moment of the prefill is within the run's most beside its KV plus its most growing (a moment inside a
    layer, not the logits', may hold the latter): an upper bound."""
    if prompt_bytes is None:
        return _scaled(activations, fixed, rows * longer)
    return _scaled(activations, fixed, rows) + math.ceil(prompt_bytes * rows * (longer - 1))


def _moments_grown(moments: tuple[tuple[int, int, int], ...], rows: float, longer: float) -> int:
    """The most of the prefill's `moments` (`RecordedPeak.prefill_moments`) at `rows` times the run's rows
    and a prompt `longer` times its: each its fixed bytes, its rows' grown with them, its prompt's with
    both. Before, the logits' moment was priced with another moment's growth beside it: the tiny Llama 3
    with eager attention, batch 2, planned from a 16-token prompt at 256, +9.6% over its recording."""
    return max(fixed + math.ceil((row_only + grows * longer) * rows) for fixed, row_only, grows in moments)


def _covering(rec: RecordedPeak, beside: int) -> tuple[tuple[int, int, int], ...] | None:
    """The run's prefill moments (`RecordedPeak.prefill_moments`) where the most of them is at least
    `beside`, the prefill's most as the plan takes it: not where the run peaked in a prefill step it did
    not finish (cut short), which no moment counts. None: not told, or not covering."""
    moments = rec.prefill_moments
    return moments if moments and _moments_grown(moments, 1.0, 1.0) >= beside else None


def _kept(rec: RecordedPeak, kept: float) -> float | None:
    """The run's prefill bytes that grow with the prompt (`RecordedPeak.prefill_prompt_bytes`) at fewer
    rows, the share `kept` of them that `_rows_freed` keeps; None: not told."""
    return None if rec.prefill_prompt_bytes is None else rec.prefill_prompt_bytes * kept


def _scaled(activations: float, fixed: int | None, factor: float) -> int:
    """`activations` grown by `factor` (more rows, a longer prompt), all but `fixed` of them, which no row
    count changes (the logits processors' vectors over the vocabulary: run_peak's `batch_fixed_bytes`);
    the run's own figure where `factor` is 1."""
    kept = min(fixed or 0, math.floor(activations))
    return kept + math.ceil((activations - kept) * factor)


def _attended_gain(req: PlanRequest, rec: RecordedPeak, context: int) -> int:
    """Tokens a step attends over more at `context` than at the run's, in the planned cache (none fewer:
    a shorter context keeps the activations, an upper bound)."""
    return max(_attended(req, context) - _attended(req, rec.context), 0)


def _update_token_growth(rec: RecordedPeak, batch: int, context: int, scale: float) -> int:
    """Bytes generate()'s token tensors add to what the run held at its KV peak (`update_token_bytes`,
    grown by `scale`) in a plan whose KV peak is its last step's, `context` tokens a row at most: a sliding
    run's KV peak comes while its window fills, its ids short (the tiny Llama at batch 2, context 206: 288 B
    of them where the full cache's last update held 6,560)."""
    if not rec.token_row_bytes or rec.update_token_bytes is None:
        return 0
    return max(rec.token_row_bytes * batch * context - math.ceil(rec.update_token_bytes * scale), 0)


def _token_growth(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """Bytes generate()'s token tensors (input ids, attention mask, position ids: `token_row_bytes` a row
    and token) add at `batch` and `context` beyond what the activations' `_context_growth` gives them: they
    grow by a token at every step whatever the cache, while a window stops the attended tokens. None where
    the growth is the context's (a full cache); `(context - window - 1)` tokens a row where every layer
    slides (before, none: the tiny Llama at batch 2, planned from context 12 at 206, was 6,208 B below
    its recording, 2 rows x 194 tokens x 16 B). And those of the prompt's length, by the tokens a longer
    prompt adds (`_prompt_token_growth`)."""
    prompt_tokens = _prompt_token_growth(req, rec, batch, context)
    per_token = rec.token_row_bytes
    if not per_token:
        return prompt_tokens
    attended, at_run = _attended(req, context), _attended(req, rec.context)
    # tokens a row the growth misses: context - rec.context * growth, over `at_run` to stay in integers;
    # where the activations grow by the tokens attended more (`_Gain`), context - rec.context less those
    missed = context * at_run - rec.context * max(attended, at_run)
    missed = max(missed, (context - rec.context - max(attended - at_run, 0)) * at_run)
    return prompt_tokens + (-(-per_token * batch * missed // at_run) if missed > 0 else 0)


def _prompt_token_growth(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """Bytes the decode peak's tensors of the prompt's length (`RecordedPeak.prompt_row_bytes` a row and
    token) add at a longer prompt, `batch` rows of the tokens added (the rows' growth is the activations'):
    a longer context alone leaves them, and their tokens are no context's (before, the tiny Llama 3 at
    batch 1 planned from a 16-token prompt at 64 was 384 B below its recording, 48 x 8 B)."""
    if not rec.prompt_row_bytes:
        return 0
    run = _run_request(req, rec)
    added = kv_sizes(req, batch, context).prompt - kv_sizes(run, rec.batch, rec.context).prompt
    return rec.prompt_row_bytes * batch * added if added > 0 else 0


def _prefill_peaks(rec: RecordedPeak, grown: float, prompt_grown: float) -> bool:
    """Whether a plan's peak is its prefill as far as the run tells: the run peaked at its own, or the plan's
    prefill grows more than its steps (a longer prompt). A quantized cache's prefill then makes the
    backend's quantize temporaries, which no run on another cache measured (`quantized_prefill_note`):
    such a plan keeps its update's copies on top of the peak's activations, a bound that covers them where
    measured (the tiny Llama, hqq, a 40-token prompt: recorded 1,908,648 B, planned 1,942,424)."""
    return rec.phase == "prefill" or prompt_grown > grown


def _rows_freed(rec: RecordedPeak, batch: int) -> int:
    """Bytes of the run's peak moment's activations that `batch` rows, fewer than the run's, free: the
    batch-first ones (`RecordedPeak.row_activation_bytes`, diagnose_rows' split) in proportion to the rows
    dropped, as `kvtrace diagnose` prices its smaller batch, so that both give one figure. None freed where
    the recording does not tell them apart, or for as many rows or more."""
    row_bytes = rec.row_activation_bytes
    if row_bytes is None or batch >= rec.batch:
        return 0
    return round(min(row_bytes, rec.activations_bytes) * (rec.batch - batch) / rec.batch)


def _prefill_growth(run: PlanRequest, rec: RecordedPeak, prompt: int) -> float:
    """How much a prefill's activations grow from the run's to the plan's, for a row: they follow the
    prompt's length, whatever the window (a prefill attends over the whole prompt). A static cache's prefill
    may attend over all of its length too, yet only attention's tensors over it grow with it, where they do
    (`static_prefill_bytes`): before, all grew in proportion to it, and so did the decode steps' bound
    from them (the demo's tiny Llama 3, bf16, batch 1, 20-token prompt, static, planned from context 44 at
    220: 14.56 MiB of activations where the recording held 3.80 MiB)."""
    run_prompt = kv_sizes(run, rec.batch, rec.context).prompt
    return max(prompt / run_prompt, 1.0)


def _static_mask_bytes(
    req: PlanRequest, run: PlanRequest, rec: RecordedPeak, batch: int, context: int
) -> int:
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


def _moment_floors(
    req: PlanRequest, run: PlanRequest, rec: RecordedPeak, batch: int, context: int
) -> list[int]:
    """The plan's prefill and its KV peak, each with the activations the run allows that moment, grown as
    it grows. The prefill's are what the run held beside its weights and KV during its prefill, where the
    allocator's events tell it (`RecordedPeak.prefill_activations_bytes`); else at most its peak less its
    weights and prefill KV (`prefill_bound_note`). A finished run reached its KV peak, so the memory beside
    its weights and KV there was at most its peak less those. A run cut short never reached its last steps:
    its measured activations stand for theirs (an estimate: a step's activations are a prefill's at most
    where the prefill processes more tokens than a step, as in the tour's runs)."""
    sizes = kv_sizes(req, batch, context)
    kept = 1 - _rows_freed(rec, batch) / max(rec.activations_bytes, 1)
    beside_prefill, prefill_fixed = _beside_prefill(run, rec)
    floors = [req.weights_bytes + sizes.step_peak_bytes + _beside_late(req, run, rec, batch, context)]
    rows, longer = max(batch / rec.batch, 1.0), _prefill_growth(run, rec, sizes.prompt)
    early = rows * longer
    attention = prefill_attention_bytes(req, run, rec, batch, context, sizes.prompt)
    if early > 1.0 or attention:
        # A prefill of more rows or tokens than the run's, or over a longer static cache: its own moment.
        # Not otherwise: the run's own prefill is within its peak, and the measured figure is the most
        # beside the KV at any moment of it, with the whole prefill KV beside that (an upper bound where its
        # KV was still filling then)
        prefill = _prompt_grown(beside_prefill * kept, prefill_fixed, rows, longer, _kept(rec, kept))
        moments = _covering(rec, beside_prefill)
        if moments:
            prefill = _moments_grown(moments, rows * kept, longer)
        prefill += attention
        floors.append(req.weights_bytes + sizes.prefill_bytes + prefill)
    return floors


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
    # fewer rows keep the share of the peak moment's activations that stays (`_rows_freed`), at each moment
    kept = 1 - _rows_freed(rec, batch) / max(rec.activations_bytes, 1)
    beside_prefill, prefill_fixed = _beside_prefill(run, rec)
    token_bytes: int | None = None  # what a token adds to `beside_peak`; None: not told, all grow
    peak_fixed: int | None = None
    if rec.cut_short:
        beside_peak = max(rec.activations_bytes, beside_prefill)
        peak_fixed = rec.batch_fixed_bytes if beside_peak == rec.activations_bytes else prefill_fixed
    elif rec.update_activations_bytes is not None and rec.update_context_token_bytes is not None:
        # measured at the run's KV peak, which the plan's KV peak repeats (the bound also holds the logits
        # of the step's end, which come after the update)
        beside_peak, token_bytes = rec.update_activations_bytes, rec.update_context_token_bytes
        peak_fixed = rec.update_batch_fixed_bytes
    else:
        beside_peak = max(rec.peak_bytes - rec.weights_bytes - run_sizes.step_peak_bytes, 0)
        if rec.update_activations_bytes is None and _moment_kv(run, rec, rec.batch, rec.context) >= (
            run_sizes.step_peak_bytes
        ):
            token_bytes = rec.context_token_bytes  # the peak moment held the KV peak: its activations
        # the peak's activations are within it (the run's peak less its weights and KV there): its vectors
        peak_fixed = rec.batch_fixed_bytes if beside_peak >= rec.activations_bytes else None
    stretch = _context_growth(req, rec, context)
    gain = _Gain(rows, stretch, max(batch, rec.batch), _attended_gain(req, rec, context))
    longer = _prefill_growth(run, rec, sizes.prompt)
    early = _prompt_grown(beside_peak * kept, peak_fixed, rows, longer, _kept(rec, kept))
    if rec.prefill_moments:
        # a moment of the prefill (a sliding cache's KV peak) grows as the prefill's most does
        moments = rec.prefill_moments
        early = _scaled(beside_peak * kept, peak_fixed, rows) + max(
            _moments_grown(moments, rows * kept, longer) - _moments_grown(moments, rows * kept, 1.0), 0
        )
    late = max(gain.grown(beside_peak * kept, token_bytes, peak_fixed), early)
    return late + _token_growth(req, rec, batch, context)


def prefill_bound_note(req: PlanRequest) -> str | None:
    """Why the plan's prefill may be priced high: its rows or prompt outgrow the run's, and the run does not
    tell what it held beside the KV at its prefill, so the bound for it, the run's peak less its weights and
    prefill KV, holds whatever KV the run held later too (its decode steps' and their growth copies)."""
    rec = req.recorded
    if rec is None or rec.prefill_activations_bytes is not None or not same_cache_as_run(req):
        return None
    run = _run_request(req, rec)
    prompt = kv_sizes(req, req.batch, req.context).prompt
    rows = max(req.batch / rec.batch, 1.0)
    if rows * _prefill_growth(run, rec, prompt) <= 1.0 and not prefill_attention_bytes(
        req, run, rec, req.batch, req.context, prompt
    ):
        return None
    return (
        "the run does not tell what it held beside its KV at its prefill (no whole prefill step in its KV "
        "log): this larger prefill counts the run's peak less its weights and prefill KV as activations, "
        "which holds the KV the run held later too (an upper bound, far above where its peak came late)"
    )


def padding_note(req: PlanRequest) -> str | None:
    """Why a plan of an sdpa run that does not tell whether its prompts were padded is priced as padded
    (`unknown_padding_note`), or what padded prompts add where its were not (`unpadded_prompts_note`)."""
    if req.recorded is None:
        return None
    return unknown_padding_note(req, _run_request(req, req.recorded)) or unpadded_prompts_note(req)


def quantized_prefill_note(req: PlanRequest) -> str | None:
    """Why a quantized plan from a run on another cache may be priced low: the prefill's quantize
    temporaries are the backend's own (hqq's grow to a few times the layer's K), never in such a run."""
    if req.recorded is None or req.cache != "quantized" or same_cache_as_run(req):
        return None
    return (
        "the quantized cache's prefill quantizes each layer's prompt K and V through temporaries that depend "
        "on the backend (hqq, quanto, fp8), which this run did not make: they are not priced (where this "
        "run peaked at its prefill, or the plan's prompt is longer, its update's copies are kept on top of "
        "the run's activations instead, a bound); record a run with the quantized cache to be sure"
    )


def same_cache_as_run(req: PlanRequest) -> bool:
    """Whether the request keeps the recorded run's cache (kind, KV dtype, window, beams, quantization) and
    weights, whose peak moment then stays where the run's was: only its batch, context or prompt differ.
    Compared field by field: the run's beams with the plan's batch need not make a valid request."""
    rec = req.recorded
    if rec is None:
        return False
    run = (rec.cache, rec.kv_dtype, rec.window, rec.beams, rec.quant_group_size, rec.residual_length)
    planned = (req.cache, req.kv_dtype, req.window, req.beams, req.quant_group_size, req.residual_length)
    return planned == run and req.measured_weights_bytes == rec.weights_bytes


def _run_request(req: PlanRequest, rec: RecordedPeak) -> PlanRequest:
    """The request of the recorded run itself: the plan's model, weights and memory, the run's settings."""
    return replace(
        req,
        batch=rec.batch,
        context=rec.context,
        prompt=rec.prompt,
        cache=rec.cache,
        kv_dtype=rec.kv_dtype,
        window=rec.window,
        beams=rec.beams,
        quant_group_size=rec.quant_group_size,
        residual_length=rec.residual_length,
        measured_weights_bytes=rec.weights_bytes,
        encoder_tokens=rec.encoder_tokens if rec.encoder_tokens is not None else req.encoder_tokens,
    )


def _moment_kv(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """KV held at the run's peak moment, at `batch` and `context`: at prefill the prompt's (a preallocated
    cache's: all of it); later, a moment holding all of the run's tokens holds all of this context's, and
    one earlier in the run its tokens, at most this context's."""
    sizes = kv_sizes(req, batch, context)
    if rec.phase == "prefill":
        return sizes.prefill_bytes
    if req.cache in PREALLOCATED_CACHES or rec.tokens >= rec.context - 1:
        return sizes.kv_bytes
    tokens = min(rec.tokens, context - 1)
    return kv_sizes(replace(req, prompt=None), batch, tokens + 1).kv_bytes if tokens >= 1 else 0
