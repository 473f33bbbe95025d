"""What `kvtrace plan` is asked and what it answers: the request (checked when it is built), the result
with every figure in bytes, and the remedies. Frozen data, no torch.

A module of their own because the arithmetic (analyzers.planning.plan_kv, analyzers.planning.plan) and
the rendering (analyzers.planning.plan_render) all name these types without importing one another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from analyzers.planning.param_count import weights_bytes
from analyzers.planning.presets import DTYPE_BITS, ModelGeometry
from analyzers.planning.quantized_cache import DEFAULT_GROUP_SIZE, DEFAULT_RESIDUAL_LENGTH
from kvtrace.errors import KvtraceError
from kvtrace.llama import MIN_WINDOW

__all__ = [
    "CACHE_KINDS",
    "DEFAULT_RESERVE_FRACTION",
    "FLOAT_DTYPES",
    "GIB",
    "MIB",
    "PREALLOCATED_CACHES",
    "QUANTIZED_KV_DTYPES",
    "SLIDING_CACHES",
    "MeasuredPeak",
    "PlanRequest",
    "PlanResult",
    "PrefillMoment",
    "RecordedPeak",
    "Remedy",
]

# The names `kvtrace demo` and `record` give them: "sliding" is a DynamicCache whose every layer slides
# (DynamicSlidingWindowLayer: it holds the whole prompt until the first decode step and grows by cat),
# "static_sliding" a StaticCache whose every layer does (StaticSlidingWindowLayer: its window allocated at
# the start, written in place). One name, one cache, in every subcommand.
CACHE_KINDS = ("dynamic", "static", "sliding", "static_sliding", "quantized")
SLIDING_CACHES = ("sliding", "static_sliding")  # those that take a window
# transformers' dynamic sliding layer keeps `states[..., -window + 1:, :]`: at a window of 1, every token
DYNAMIC_MIN_WINDOW = MIN_WINDOW
PREALLOCATED_CACHES = ("static", "static_sliding")  # allocated whole at the first step, no growth copy
QUANTIZED_KV_DTYPES = ("int2", "int4", "int8", "fp8")  # quanto/HQQ, and the fp8 backend
FLOAT_DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_RESERVE_FRACTION = 0.1
GIB = 2**30
MIB = 2**20
# A recorded prefill moment beside the weights and KV, split by what its bytes follow: no row count or
# prompt, the rows alone, the rows and the prompt, the rows and the prompt squared (`MeasuredPeak`)
PrefillMoment = tuple[int, int, int, int]


@dataclass(frozen=True, kw_only=True)
class MeasuredPeak:
    """What a recorded transformers run measured at its peak, as `kvtrace report` and `kvtrace diagnose`
    find it (analyzers.planning.run_peak's `peak_moment` reads it): the memory beside its weights and KV
    (activations, logits, temporaries), which the planner cannot derive from a config, and the moments a
    plan prices apart from the peak. One field list: run_peak's `PeakMoment` is it with the moment's rows,
    `RecordedPeak` it with the settings the run ran with.

    phase and tokens place the moment, as `kvtrace diagnose` finds it: at prefill the cache held the prompt
    (a preallocated cache: all of it), later `tokens` a row.
    """

    peak_bytes: int  # the device's peak allocated bytes, the report's
    activations_bytes: int  # at that moment, beside the weights and the KV: the report's other
    phase: str | None  # the moment's step's phase: "prefill", "decode"
    tokens: int  # tokens a row the main cache held at the end of the moment's step
    # the run stopped before its end (an OOM, an exception, a cut step): its peak is what it reached, its
    # later, larger moments were never reached
    cut_short: bool = False
    # the KV the peak's moment held, the report's: above the run's final KV where the peak is inside a
    # cache update, its growth copy live (`recorded_growth`'s `_moment_kv`); None: not told
    kv_at_peak_bytes: int | None = None
    # of `activations_bytes`, those batch-first (logits, attention's copies), which fewer rows free in
    # proportion, as `kvtrace diagnose` finds them (analyzers.planning.diagnose_rows); None: not told apart
    row_activation_bytes: int | None = None
    # the most held beside the weights and KV during the run's prefill, which a larger prefill is priced
    # from (analyzers.planning.run_moments' `prefill_beside`); None: not told, the peak's remainder bounds it
    prefill_activations_bytes: int | None = None
    # held beside the weights and KV while the run's last prefill layer attended, its K and V expanded to the
    # query heads (analyzers.planning.attention_moment): what a static prefill's attention over the cache
    # goes beside (static_prefill's `static_prefill_beside`); None: not told, beside the prefill's most
    prefill_attention_bytes: int | None = None
    # bytes a key position adds to that moment's CPU flash kernel blocks (attention_moment's `key_bytes`)
    prefill_attention_key_bytes: int | None = None
    # of the prefill's, the most beside the logits over its last position and the vectors over the
    # vocabulary, which stay at a longer prompt: what a longer prompt's prefill grows in proportion to it
    # (run_moments' `PrefillSplit.prompt_bytes`); None: not told, all of the prefill's grow with the prompt
    prefill_prompt_bytes: int | None = None
    # the prefill's moments, each (bytes no row count or prompt changes, bytes following the rows alone,
    # bytes following the rows and the prompt, bytes following the rows and the prompt squared: eager
    # attention's mask and scores), those no other exceeds in all four: a longer prompt's prefill is the
    # most of them grown, not its logits' moment plus another's growth, nor its MLP's plus the scores
    # (run_moments' `PrefillSplit.moments`); None: not told, `prefill_prompt_bytes` bounds it
    prefill_moments: tuple[PrefillMoment, ...] | None = None
    # of the prefill moments' bytes that follow the prompt, those a prefill step still holds at its end
    # (run_moments' `PrefillSplit.held_bytes`), which a shorter prompt keeps; None: not told, all shrink
    prefill_held_bytes: int | None = None
    # the peak's own moment split as `prefill_moments` are, where the run peaked inside a whole prefill step
    # (run_moments' `PrefillSplit.moment_at`): what a shorter prompt shrinks at the peak, which the prefill's
    # most beside the KV need not be (an earlier layer's, holding less KV); None: not told
    prefill_peak_moment: PrefillMoment | None = None
    # the most held beside the weights and KV in the run's decode steps, and the batch-first bytes of it
    # (run_moments' `decode_beside_at`): where the run peaked at its prefill, a step's end at fewer rows,
    # whose vocabulary-long vectors stay, can hold more than the prefill's scaled; None: not told
    decode_activations_bytes: int | None = None
    decode_row_bytes: int | None = None
    # what a row and token of the context adds to `decode_activations_bytes` (run_peak's
    # `context_token_bytes` at that moment: generate()'s ids and mask, which every step grows), the rest a
    # step's fixed share; None: not told, all grow with the context in proportion (an upper bound)
    decode_context_token_bytes: int | None = None
    # held beside the weights and KV at the run's KV peak, inside a cache update making its transient copies
    # (run_moments' `update_beside`): what another cache's update copies are priced beside, rather than the
    # peak moment's activations (the logits at a step's end); None: not told
    update_activations_bytes: int | None = None
    # of `activations_bytes`, `prefill_activations_bytes` and `update_activations_bytes`, those in no model
    # dtype (generate's float32 logits, the vocabulary-long vectors: run_moments' `dtype_fixed_bytes`), which
    # another compute dtype leaves as they are; None: not told apart, all follow the dtype
    dtype_fixed_bytes: int | None = None
    prefill_dtype_fixed_bytes: int | None = None
    update_dtype_fixed_bytes: int | None = None
    # of `activations_bytes`, `prefill_activations_bytes` and `update_activations_bytes`, those a larger
    # batch keeps: the logits processors' vectors over the vocabulary (run_moments' `batch_fixed_bytes`);
    # None: not told apart, all grow with the rows
    batch_fixed_bytes: int | None = None
    prefill_batch_fixed_bytes: int | None = None
    update_batch_fixed_bytes: int | None = None
    # at a decode peak, the bytes generate()'s token tensors (ids, mask) gain per row and token, which grow
    # with the context whatever the cache's window (run_peak's `token_row_bytes`); None: not told
    token_row_bytes: int | None = None
    # at a decode peak, the bytes its tensors of the prompt's length (generate()'s int64 copy of it) hold per
    # row and token of the prompt, which grow with the prompt alone (run_peak's `prompt_row_bytes`); None:
    # not told
    prompt_row_bytes: int | None = None
    # of `update_activations_bytes`, generate()'s token tensors (run_peak's `token_tensors`): the update of a
    # sliding run's KV peak comes early, when they were short; None: not told
    update_token_bytes: int | None = None
    # of `activations_bytes`, at a decode peak, generate()'s token tensors: a run cut short held them at the
    # tokens it reached, not the context's (run_peak's `token_tensors`); None: not told
    peak_token_bytes: int | None = None
    # of those, the bytes a row and token adds at the update (run_peak's `update_token_row_bytes`); None:
    # not told (`token_row_bytes` stands for it)
    update_token_row_bytes: int | None = None
    # bytes the activations at a decode peak and at the update (`update_activations_bytes`) gain per row and
    # token attended (ids, masks, attention over the context: run_peak's `context_token_bytes`); the rest
    # are a step's fixed share (the logits, a position's hidden states), following the rows alone; None:
    # not told apart, all grow with the context in proportion (an upper bound)
    context_token_bytes: int | None = None
    update_context_token_bytes: int | None = None
    # beside the weights and KV at the run's last cache update (its last layer's, last step), of it
    # generate()'s token tensors, and what a row and token of the context adds there (run_moments'
    # `last_update_beside_at`): where a full cache's KV peak comes, which a sliding run's KV peak (as its
    # window fills, in its first layer) is not; None: not told
    last_update_activations_bytes: int | None = None
    last_update_token_bytes: int | None = None
    last_update_context_token_bytes: int | None = None
    # the attention the run's model ran (the manifest's `attn_implementation`: eager, sdpa...); None: not told
    attn_implementation: str | None = None
    # an encoder-decoder run's encoder pass: (bytes growing with the encoder length squared, with it)
    # beside the weights at each of its moments (analyzers.planning.encoder_pass); None: not told
    encoder_pass: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True, kw_only=True)
class RecordedPeak(MeasuredPeak):
    """The peak a recorded transformers run reached (`MeasuredPeak`) and the settings it ran with: what a
    plan from the run prices the memory beside its weights and KV from (analyzers.planning.plan_kv's
    `peak_at`). The measured figures that follow the moment's rows are None where those are not the run's
    (kvtrace.commands.plan's `_recorded`)."""

    weights_bytes: int  # the weights the run held, the plan's measured figure
    # the run's own settings, which the plan of the run itself repeats
    batch: int
    context: int
    prompt: int | None
    cache: str
    kv_dtype: str
    window: int | None
    beams: int
    quant_group_size: int
    residual_length: int
    # the float dtype the run computed in (its model's: bf16, fp16, fp32), that of its activations; a plan
    # in a wider one grows them (analyzers.planning.recorded_dtype); None: not known, kept as measured
    compute_dtype: str | None = None
    # an encoder-decoder run's encoder input length, the tokens a row its cross-attention cache held
    encoder_tokens: int | None = None
    # whether the run's generate() call had padded prompts (the manifest's `generate_calls`): under sdpa a
    # static prefill then makes a mask and K and V expanded over the cache (analyzers.planning
    # .static_prefill's `static_prefill_bytes`); None: not told (planned as padded, with a note)
    padded: bool | None = None
    # the transformers the run was recorded under (the manifest's `transformers_version`), whose attention
    # code decides what a step copies (analyzers.planning.sdpa_repeats); None: not told
    transformers_version: str | None = None
    # the run's device type ("cuda", "cpu"): a CPU's kernels hold what no GPU's does (torch's flash
    # attention's per-thread blocks, analyzers.planning.recorded_notes' `cpu_flash_note`); None: not told
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What to plan for. Invalid combinations raise KvtraceError when the request is built.

    reserve_bytes / reserve_fraction: memory kept out of the plan; give at most one (neither: 10% of
    the GPU, which stands for the CUDA context, a decode step's activations and the rest the plan does not
    estimate: the prefill's it does; `kvtrace plan --from-run` measures them and keeps no reserve unless one
    is typed, or, for a CUDA run without allocator events, keeps what its samples' allocator peaks exceed
    the arithmetic by: analyzers.planning.sampled_reserve). A larger reserve makes the answer safer and the
    batch smaller.
    window: tokens a sliding cache keeps on every layer (default: the model's own `sliding_window`); only for
    "sliding" (the dynamic one kvtrace demo and record name so) and "static_sliding".
    quant_group_size / residual_length: QuantizedCache's `q_group_size` (64) and `residual_length` (128);
    a smaller group means more scales, a longer residual more full-precision tokens. The fp8 backend
    (kv_dtype "fp8") takes neither: one scale per tensor, no residual.
    quant_backend: "quanto" pads each tensor's packed groups to a whole byte row (2 groups at int4, 4 at
    int2), "hqq" does not; None (not known) prices quanto's, the larger.
    compute_dtype: dtype of a quantized cache's scales and residual; default the weights dtype when it is
    a float type, else bf16.
    block_size: tokens per block when counting paged KV blocks (vLLM's default is 16).
    batch: rows decoded together, prompts x beams under beam search (generate() expands the prompts to that
    many rows before the prefill). beams: `num_beams`; above 1, each step's `reorder_cache` copies every
    layer's K and V beside the old ones, and leaves a dynamic cache's sliding layers in compact storages of
    their window - 1 tokens. Not planned for a quantized cache, whose reorder is deferred to the next step.
    context: tokens per sequence as generate() counts them, prompt plus new tokens, at least 2; the cache
    holds context - 1 of them (the last new token is never fed back).
    prompt: the prompt's tokens, below the context; None plans the worst prompt for the context. It
    matters for a dynamic cache's sliding layers (they hold the whole prompt until the first decode step)
    and a quantized cache's residual.
    encoder_tokens: an encoder-decoder model's (`geometry.cross_kv_layers`) encoder input length, which its
    cross-attention KV follows (`effective_encoder_tokens`); refused for any other model.
    """

    geometry: ModelGeometry
    weights_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    batch: int = 1
    context: int = 8192
    gpu_memory_bytes: int = 80 * GIB
    reserve_bytes: int | None = None
    reserve_fraction: float | None = None
    cache: str = "dynamic"
    window: int | None = None
    quant_group_size: int = DEFAULT_GROUP_SIZE
    residual_length: int = DEFAULT_RESIDUAL_LENGTH
    # the QuantizedCache's backend ("quanto", "hqq"); None: not known, priced at quanto's packing, the larger
    quant_backend: str | None = None
    compute_dtype: str | None = None
    block_size: int = 16
    prompt: int | None = None
    beams: int = 1
    encoder_tokens: int | None = None
    # The weights as a run measured them (`plan --from-run`); None: from the geometry and weights_dtype
    measured_weights_bytes: int | None = None
    # The run's measured peak (`plan --from-run` of a run recorded with allocator events): the plan's peak
    # then counts the run's activations, scaled to the batch and context planned, beside weights and KV
    recorded: RecordedPeak | None = None
    # The transformers release ("5.17") whose layout of caches and weights the geometry follows where
    # releases differ (`plan --transformers`, else the run's or the installed one); None: a preset's
    transformers_layout: str | None = None
    # The settings the plan took as defaults, neither typed nor a run's ("context", "gpu_memory"): the output
    # says so, since 8,192 tokens or 80 GiB read as the user's choice otherwise
    defaults: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for label, dtype in (("weights", self.weights_dtype), ("KV", self.kv_dtype)):
            if dtype not in DTYPE_BITS:
                raise KvtraceError(f"unknown {label} dtype {dtype!r}; choose one of: {', '.join(DTYPE_BITS)}")
        if self.compute_dtype is not None and self.compute_dtype not in FLOAT_DTYPES:
            raise KvtraceError(f"compute dtype must be one of {', '.join(FLOAT_DTYPES)}")
        if self.cache not in CACHE_KINDS:
            raise KvtraceError(f"unknown cache {self.cache!r}; choose one of: {', '.join(CACHE_KINDS)}")
        if self.context < 2:  # generate() makes at least one token after a prompt of at least one
            raise KvtraceError(
                f"context must be at least 2 (a prompt of at least 1 token plus one new token), "
                f"got {self.context}"
            )
        for label, value in (
            ("batch", self.batch),
            ("beams", self.beams),
            ("GPU memory", self.gpu_memory_bytes),
            ("block size", self.block_size),
            ("quantization group size", self.quant_group_size),
            ("residual length", self.residual_length),
        ):
            if value < 1:
                raise KvtraceError(f"{label} must be at least 1, got {value}")
        if self.batch % self.beams:
            raise KvtraceError(
                f"batch {self.batch} is not a whole number of prompts of {self.beams} beams: the batch is "
                f"the rows decoded together, prompts x beams (2 prompts of {self.beams} beams: --batch "
                f"{2 * self.beams} --beams {self.beams})"
            )
        if self.beams > 1 and self.cache == "quantized":
            raise KvtraceError(
                "beam search is not planned for a quantized cache: its reorder is deferred to the next "
                "step's dequantized copies; plan it with --beams 1, or record a run"
            )
        if self.prompt is not None and not 1 <= self.prompt < self.context:
            raise KvtraceError(
                f"prompt must be at least 1 and below the context ({self.context}: prompt plus at least one "
                f"new token), got {self.prompt}"
            )
        if self.reserve_bytes is not None and self.reserve_fraction is not None:
            raise KvtraceError("give a reserve in bytes or as a fraction, not both")
        if self.reserve_bytes is not None and self.reserve_bytes < 0:
            raise KvtraceError(f"reserve cannot be negative, got {self.reserve_bytes}")
        if self.reserve_fraction is not None and not 0 <= self.reserve_fraction < 1:
            raise KvtraceError(f"reserve fraction must be in [0, 1), got {self.reserve_fraction}")
        if self.cache == "quantized" and self.kv_dtype not in QUANTIZED_KV_DTYPES:
            raise KvtraceError(
                f"a quantized cache stores int2, int4 or int8 (quanto, HQQ) or fp8 (its fp8 backend), "
                f"not {self.kv_dtype}"
            )
        if self.cache not in SLIDING_CACHES and self.window is not None:
            raise KvtraceError("a window only applies to a sliding cache (sliding, static_sliding)")
        if self.cache in SLIDING_CACHES and self.effective_window is None:
            raise KvtraceError(
                f"{self.geometry.name} has no sliding window: give one with --window (tokens kept)"
            )
        if self.window is not None and self.window < 1:
            raise KvtraceError(f"window must be at least 1, got {self.window}")
        if self.cache == "sliding" and self.window is not None and self.window < DYNAMIC_MIN_WINDOW:
            # as `kvtrace demo --window` refuses it: the plan read "KV cache 128.00 KiB (1 x 0 tokens)"
            raise KvtraceError(
                f"--window must be at least {DYNAMIC_MIN_WINDOW} for --cache sliding, got {self.window}: "
                "transformers' sliding cache keeps every token at a window of 1"
            )
        if self.encoder_tokens is not None and not self.geometry.cross_kv_layers:
            raise KvtraceError(
                f"{self.geometry.name} is not an encoder-decoder model: it has no encoder input length"
            )
        if self.encoder_tokens is not None and self.encoder_tokens < 1:
            raise KvtraceError(f"encoder tokens must be at least 1, got {self.encoder_tokens}")

    @property
    def weights_bytes(self) -> int:
        """The weights the plan holds: the run's measured figure where given, else the geometry's."""
        if self.measured_weights_bytes is not None:
            return self.measured_weights_bytes
        return weights_bytes(self.geometry, self.weights_dtype)

    @property
    def written_tokens(self) -> int:
        """Tokens the cache holds at the end: generate() never writes its last new token."""
        return self.context - 1

    @property
    def effective_reserve_bytes(self) -> int:
        if self.reserve_bytes is not None:
            return self.reserve_bytes
        fraction = DEFAULT_RESERVE_FRACTION if self.reserve_fraction is None else self.reserve_fraction
        return math.floor(self.gpu_memory_bytes * fraction)

    @property
    def effective_window(self) -> int | None:
        if self.cache not in SLIDING_CACHES:
            return None
        return self.window if self.window is not None else self.geometry.sliding_window

    @property
    def effective_encoder_tokens(self) -> int:
        """The encoder input length an encoder-decoder plan's cross-attention KV is held at: the request's,
        else the model's fixed one (Whisper's), else the context, an input as long as the decoder's
        sequence; 0 for a decoder-only model. Fixed whatever context the planner tries: the cross-attention
        KV does not follow the tokens generated."""
        if not self.geometry.cross_kv_layers:
            return 0
        return self.encoder_tokens or self.geometry.encoder_length or self.context

    @property
    def effective_compute_dtype(self) -> str:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return self.weights_dtype if self.weights_dtype in FLOAT_DTYPES else "bf16"


@dataclass(frozen=True)
class Remedy:
    """One change that would make a plan fit (or the best the change can do).

    kind: "batch" | "context" | "quantized_kv" | "static_cache" | "sliding_window" | "weights".
    setting: the batch, context or window to use, the bits of a quantized_kv's cache (4: int4, as
    `kvtrace diagnose` names them), None otherwise; peak_bytes and fits: the plan with that change.
    """

    kind: str
    setting: int | None
    peak_bytes: int
    fits: bool


@dataclass(frozen=True)
class PlanResult:
    """Every figure of a plan, in bytes. `max_context` is None when any context fits (every layer keeps a
    window, and the prompt, when the cache holds it, is given); 0 when none does.

    prompt_tokens: the prompt the figures assume (the request's, else the worst for this context).
    kv_tokens / kv_bytes: what the cache holds at the end; kv_prefill_bytes: once the prompt is in;
    kv_peak_bytes: the most the cache's storages hold at once, as a recorded run's KV peak counts them.
    dynamic_realloc_peak_bytes: what the moment of that peak holds above kv_bytes: the cache's growth copies
    (kv_peak_bytes - kv_bytes), and, for a quanto or HQQ QuantizedCache, its update's dequantized and
    returned K and V too, which are not the cache's storages and so not in kv_peak_bytes.
    """

    request: PlanRequest
    kv_bytes_per_token: int
    kv_scale_bytes_per_token: int
    prompt_tokens: int
    kv_tokens: int
    kv_bytes: int
    kv_prefill_bytes: int
    kv_peak_bytes: int
    kv_scale_bytes: int
    kv_residual_bytes: int
    kv_preallocated_bytes: int
    weights_bytes: int
    reserve_bytes: int
    total_bytes: int
    dynamic_realloc_peak_bytes: int
    peak_bytes: int
    headroom_bytes: int
    fits: bool
    max_batch: int
    max_context: int | None
    kv_budget_bytes: int
    kv_blocks: int
    remedies: tuple[Remedy, ...] = field(default=())
    # What the figures do not say: a context beyond the positions the model takes (they still hold)
    notes: tuple[str, ...] = field(default=())
    # An encoder-decoder model's cross-attention KV (in kv_bytes, kv_prefill_bytes and kv_peak_bytes): the
    # encoder's `encoder_tokens` a row, at `kv_cross_attention_bytes_per_token` a token and row; 0 otherwise
    kv_cross_attention_bytes: int = 0
    kv_cross_attention_bytes_per_token: int = 0
    encoder_tokens: int | None = None
    # Beside the weights, the reserve and the KV the peak's moment holds (`kv_at_peak_bytes`): a recorded
    # run's activations, scaled to this batch and context (`PlanRequest.recorded`); without a recording, the
    # prefill's estimated ones where its moment is the peak (`prefill_activations_bytes`), else 0
    activations_bytes: int = 0
    # The KV held at the peak's moment: `kv_peak_bytes` at the KV peak's, the prompt's (`kv_prefill_bytes`) at
    # the prefill's, what a recorded run's peak moment holds (a step's end: the KV without its growth copy)
    kv_at_peak_bytes: int = 0
    # With a recording, the moment `activations_bytes` are the run's of: "run_peak" (the run's peak moved to
    # this plan), "prefill" (the plan's prefill, with the most the run held beside its weights and KV during
    # its own), "last_update" (the plan's KV peak, its last cache update, with what the run held at its own
    # KV peak; before, these two were said "run_peak"), "decode_step_end" (fewer rows than a run that
    # peaked at its prefill: its decode steps' most, their rows' share freed), "decode_attention" (the
    # peak's, and one layer's copies of the KV as the last decode step attends over a longer context),
    # "encoder_pass"; None without a recording
    activations_moment: str | None = None
    # The prefill's activations at its worst moment, estimated from the geometry (analyzers.planning
    # .prefill_activations) for the prompt given, else the longest (context - 1), under sdpa, unpadded; None
    # with a recording (measured instead, in `activations_bytes`) or for a model the estimate does not cover
    # (a note says why)
    prefill_activations_bytes: int | None = None
    # DeepSeek-V4's kv_bytes by part (`compressed_kv`): "window", "compressed_entries", "indexer_keys",
    # "compressor_state"; None for any other model
    kv_parts: dict[str, int] | None = None
