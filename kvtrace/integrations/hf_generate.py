"""Where the recorded model's `generate()` calls begin, so that each call's first forward is its prefill.

A cache reused across `generate()` calls (a chat's next turn) is not empty when the next call begins: its
first forward writes the new prompt tokens, several per row, on top of what the cache holds. So do the
verification forwards of assisted and prompt-lookup decoding, which are decode steps (each writes its draft
tokens and keeps those accepted). The cache's state and the forward's input cannot tell the two apart
(both start at the cache's length and feed several positions); the call can: a call's first forward writes
its prompt. `GenerateCalls.install` wraps `GenerationMixin.generate` on the class (models whose own
`generate` calls `super().generate()` reach it too) and `uninstall` puts it back. Only the outermost call
on the recorded model counts: an assistant model's `generate()` runs inside the model's own. Calls are
counted per thread: two threads calling the model's `generate()` at once (a server's workers) make two
outermost calls, each with its own first forward, on its own thread.

A chunked prefill (`prefill_chunk_size`) writes the prompt over several forwards: the call's prompt length
(`prompt`) lets the recorder keep them in one prefill step, as they yield one token between them.

Each outermost call's requested length (`max_length`: the sequence length it stops at, prompt included) is
read once, as the call begins, from its arguments and the model's generation config: a run that ran out of
memory at step 300 of a `max_new_tokens=2048` call recorded 300 steps, and the planner needs the 2048. So is
its `num_beams`, for the whole call: a `reorder_cache` during a beam search says how many rows each prompt
has, and one outside it (a caller reordering its own rows) says nothing of beams (`beam_search`).

Whether a call's prompts were padded (its `attention_mask` masks a position out: a static cache's prefill over
padded prompts makes a mask over every cache position under sdpa, which the planner prices and nothing else
in the run tells) is not read here: reading the mask's values inside the call would wait for the device on
the model's thread, and any tensor made to read it later would sit in the memory being measured. The call
keeps a weak reference to its mask (`CallStart.mask`), which the recording reads once its block is over
(kvtrace.call_masks).
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

# transformers' length when neither the call nor the model's generation config sets one: 20 new tokens
_DEFAULT_MAX_LENGTH = 20


class CallStart(NamedTuple):
    """An outermost `generate()` call, as its first forward needs it."""

    prompt: int | None  # its input positions per row (`_prompt_length`)
    cache_passed: bool  # whether it was given a cache (else generate() makes an empty one)
    max_length: int | None  # the sequence length it stops at, prompt included (`_requested_length`)
    max_new_tokens: int | None  # its max_new_tokens, where that set `max_length`
    mask: Callable[[], Any] | None = None  # a weak reference to its attention_mask tensor (`_mask_ref`)
    keeps: tuple[str, ...] = ()  # the outputs it keeps for every step until it returns (`_kept_outputs`)


class GenerateCalls:
    """Counts the recorded model's `generate()` calls in progress, per thread; `began()` says, once per
    call, that the forward about to run on the calling thread is the call's first."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._mixin: Any = None
        self._original: Any = None
        self._lock = threading.Lock()
        self._depth: dict[int, int] = {}  # per thread: generate() calls on the model in progress, nested too
        # Per thread whose outermost call began and none of its forwards has run yet: that call
        self._pending: dict[int, CallStart] = {}
        self._beams: dict[int, int] = {}  # per thread: the num_beams of its outermost call in progress

    @staticmethod
    def available(model: Any) -> bool:
        """Whether `model` has transformers' `generate()` (a model of the library has loaded it already)."""
        utils = sys.modules.get("transformers.generation.utils")
        mixin = getattr(utils, "GenerationMixin", None)
        return mixin is not None and isinstance(model, mixin)

    def install(self) -> None:
        from transformers.generation.utils import GenerationMixin

        original = GenerationMixin.__dict__["generate"]
        self._mixin, self._original = GenerationMixin, original
        calls = self

        @functools.wraps(original)
        def generate(model: Any, *args: Any, **kwargs: Any) -> Any:
            if model is not calls.model:  # another model's (an assistant's), or a copy's
                return original(model, *args, **kwargs)
            if calls.in_call():  # a call inside the model's own on this thread: not outermost, read nothing
                calls._enter(None)
            else:
                passed = kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
                prompt = _prompt_length(model, args, kwargs)
                length = _requested_length(model, args, kwargs, prompt)
                keeps = _kept_outputs(model, args, kwargs)
                call = CallStart(prompt, passed, *length, _mask_ref(kwargs), keeps)
                calls._enter(call, _num_beams(model, args, kwargs))
            try:
                return original(model, *args, **kwargs)
            finally:
                calls._exit()

        GenerationMixin.generate = generate  # type: ignore[method-assign]

    def uninstall(self) -> None:
        if self._mixin is not None:
            self._mixin.generate = self._original
        self._mixin = self._original = None

    def _enter(self, call: CallStart | None, beams: int = 1) -> None:
        """`call`: the call beginning, None for one nested in a call in progress (which reads nothing);
        `beams`: its num_beams."""
        thread = threading.get_ident()
        with self._lock:
            depth = self._depth.get(thread, 0) + 1
            self._depth[thread] = depth
            if depth == 1 and call is not None:
                self._pending[thread] = call
                self._beams[thread] = beams

    def _exit(self) -> None:
        thread = threading.get_ident()
        with self._lock:
            depth = self._depth.get(thread, 1) - 1
            if depth > 0:
                self._depth[thread] = depth
            else:
                self._depth.pop(thread, None)
                self._beams.pop(thread, None)
                # A call whose forwards kvtrace did not see (continuous batching)
                self._pending.pop(thread, None)

    def in_call(self) -> bool:
        """Whether a call on the model is in progress on this thread."""
        return threading.get_ident() in self._depth

    def beam_search(self) -> bool:
        """Whether the model's outermost generate() call in progress on this thread beam-searches
        (num_beams > 1); False outside any call. A dict lookup: asked at each `reorder_cache`."""
        return self._beams.get(threading.get_ident(), 1) > 1

    def began(self) -> CallStart | None:
        """The call that began on this thread since its last forward: given once, to its first forward;
        None for any other forward."""
        if not self._pending:
            return None
        with self._lock:
            return self._pending.pop(threading.get_ident(), None)


def _prompt_length(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The positions per row a `generate()` call's cache holds once its prompt is written: its input's
    length (a shape, read without a sync), which includes what a cache passed in holds already (else the
    call passed its new tokens only, which the recorder tells by the cache's count). None for
    encoder-decoder models (the input is the encoder's), or when the call does not show its input."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    fed = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if fed is None:
        fed = kwargs.get("inputs_embeds")
    shape = getattr(fed, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


def _mask_ref(kwargs: dict[str, Any]) -> Callable[[], Any] | None:
    """A weak reference to a `generate()` call's `attention_mask` tensor: nothing of it is read, nothing is
    allocated but the reference, and the mask is not kept alive (a mask the caller drops is told as unknown).
    None where the call passes no mask tensor (transformers may still infer one from the pad token)."""
    mask = kwargs.get("attention_mask")
    torch = sys.modules.get("torch")  # loaded: the model is a torch module
    if torch is None or not isinstance(mask, torch.Tensor):
        return None
    try:
        return weakref.ref(mask)
    except TypeError:  # a tensor subclass that takes no weak reference: never kept strongly
        return None


def _setting(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
    """A generation setting of a `generate()` call as transformers resolves it (5.x,
    `_prepare_generation_config`): the call's keyword, even None (GenerationConfig.update sets it), else
    the `generation_config` it was passed, else the model's; None where none sets it (its global default)."""
    if name in kwargs:
        return kwargs[name]
    passed = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
    configs = (passed, getattr(model, "generation_config", None))
    return next((value for c in configs if (value := getattr(c, name, None)) is not None), None)


# generate()'s settings whose tensors it keeps for every step, returned with the sequences
KEPT_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def _kept_outputs(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The `KEPT_OUTPUTS` a `generate()` call sets (`_setting`), where it sets `return_dict_in_generate`
    (without it transformers keeps none): each step's tensors stay held until the call returns, beside the
    KV, 128k floats a row and step for Llama 3's scores alone. `output_attentions` only where the model's
    attention returns its weights (`_returns_attention_weights`): else the call keeps none, and naming it
    would have the remedy credit `output_attentions=False` with what the other settings hold. () where none,
    or where they cannot be read: read inside the user's call, this must never raise."""
    try:
        if not _setting(model, args, kwargs, "return_dict_in_generate"):
            return ()
        named = [name for name in KEPT_OUTPUTS if _setting(model, args, kwargs, name)]
        if "output_attentions" in named and not _returns_attention_weights(model):
            named.remove("output_attentions")
        return tuple(named)
    except Exception:
        return ()


def _returns_attention_weights(model: Any) -> bool:
    """Whether the model's attention returns its weights for `output_attentions`: transformers' sdpa and
    flash attention (paged or not) return none, with a warning (5.17, 5.25), so the call's `attentions` stay
    empty. True for eager and for an implementation not known here (flex returns its log-sum-exp, a hub
    kernel may return anything): what those keep is measured all the same."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not isinstance(implementation, str):
        return True
    return "sdpa" not in implementation and "flash_attention" not in implementation


def _num_beams(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """A `generate()` call's num_beams (`_setting`; transformers' default 1). 1 where it cannot be read:
    read inside the user's call, this must never raise."""
    try:
        beams = _setting(model, args, kwargs, "num_beams")
        return int(beams) if beams is not None else 1
    except Exception:
        return 1


def _requested_length(
    model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], prompt: int | None
) -> tuple[int | None, int | None]:
    """(max_length, max_new_tokens) of a `generate()` call: the sequence length, prompt included, at which it
    stops whatever its tokens (an end-of-sequence token may stop it sooner), and its max_new_tokens where
    that set it. transformers' rule (5.x, `_prepare_generation_config` and `_prepare_generated_length`):
    each setting comes from the call's keyword arguments, else the `generation_config` it was passed, else
    the model's `generation_config`; a max_new_tokens counts from the input, and wins over a max_length;
    a max_length counts the whole sequence; with neither set anywhere, 20 new tokens, capped at the model's
    max_position_embeddings. (None, None) where the call does not show its input (`prompt` None, an
    encoder-decoder model) or anything fails: read inside the user's call, this must never raise."""
    if prompt is None:
        return None, None
    try:
        # A call fed inputs_embeds alone counts transformers' lengths from an empty input_ids
        embeds_only = not args and kwargs.get("input_ids", kwargs.get("inputs")) is None
        ids = 0 if embeds_only else prompt
        new = _setting(model, args, kwargs, "max_new_tokens")
        length = _setting(model, args, kwargs, "max_length")
        if new is not None:
            return int(new) + prompt, int(new)
        if length is None:  # transformers' default: 20 new tokens, within the model's positions
            length = ids + _DEFAULT_MAX_LENGTH
            positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            if isinstance(positions, int) and positions > 0:
                length = min(length, positions)
            return int(length) + prompt - ids, None
        return int(length), None  # the whole sequence's (less the embeddings fed, counted in it)
    except Exception:
        return None, None
