"""The KV geometry of a model (layers, KV heads, head dim, dtype), read from whatever config it carries."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Collection
from typing import Any

from kvtrace.distributed import local_tensor


def kv_heads_of(get: Callable[[str], Any], heads: int | None) -> int | None:
    """KV heads under every name a config gives them: `num_key_value_heads` (Llama and most), Falcon's
    `num_kv_heads` (with `new_decoder_architecture`), or `multi_query` (Falcon 7B, GPT-BigCode: one KV head
    shared by all query heads); plain multi-head attention has as many as query heads. These are the model's
    own, as vLLM caches them; transformers' cache may hold more (`cached_kv_heads`)."""
    value = get("num_key_value_heads")
    if value:
        return int(value)
    if get("new_decoder_architecture") and get("num_kv_heads"):
        return int(get("num_kv_heads"))
    if get("multi_query"):
        return 1
    return heads


# The transformers release whose Falcon attention caches the model's own KV heads under
# `new_decoder_architecture` (Falcon-40B, 180B); earlier ones repeated them for every query head first
FALCON_OWN_KV_HEADS_SINCE = (5, 25)


def cached_kv_heads(
    get: Callable[[str], Any],
    heads: int | None,
    kv_heads: int | None,
    transformers_version: tuple[int, int] | None = None,
) -> int | None:
    """KV heads that transformers' cache holds per layer, of a model with `heads` query heads and
    `kv_heads` KV heads: those, as vLLM caches them, except under Falcon's `new_decoder_architecture` in a
    transformers before 5.25, whose attention repeated its KV heads for every query head before it wrote
    the cache (modeling_falcon.py: `num_kv_heads = self.num_heads if self.new_decoder_architecture else
    self.num_kv_heads`). `transformers_version` (major, minor) is the one the model runs under; None (a plan,
    with no model at hand) is the newest."""
    repeats = transformers_version is not None and transformers_version < FALCON_OWN_KV_HEADS_SINCE
    return heads if repeats and get("new_decoder_architecture") and heads else kv_heads


def major_minor(version: str | None) -> tuple[int, int] | None:
    """(major, minor) of a version string ("5.17.0", "5.25.0.dev0"); None where it does not begin so."""
    found = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def transformers_version() -> tuple[int, int] | None:
    """(major, minor) of the transformers this process has imported; None where it has not."""
    module = sys.modules.get("transformers")
    return major_minor(str(getattr(module, "__version__", ""))) if module is not None else None


def installed_transformers_version() -> tuple[int, int] | None:
    """(major, minor) of the transformers installed beside kvtrace, read from its metadata without importing
    it (a plan runs without torch); None where none is: a plan with no run lays caches out as the
    transformers that will run the model, here the installed one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return major_minor(version("transformers"))
    except PackageNotFoundError:
        return None


def kv_shared_layers(get: Callable[[str], Any], layers: int) -> frozenset[int]:
    """The layers of a config that reuse an earlier layer's K and V instead of caching their own: the last
    `num_kv_shared_layers` (Gemma 3n, Gemma 4). transformers gives each a `DummyLayer` that holds nothing
    (cache_utils `get_layer_types_and_kwargs`: sharing mode "reuse" -> "dummy"); none for other configs."""
    shared = get("num_kv_shared_layers")
    if not isinstance(shared, int) or isinstance(shared, bool) or shared <= 0:
        return frozenset()
    return frozenset(range(max(layers - shared, 0), layers))


def kv_layer_slides(layer_types: Any, reused: Collection[int] = ()) -> tuple[bool, ...] | None:
    """For each layer holding a KV cache, in order, whether it keeps only a window (sliding or chunked),
    from a config's `layer_types`; None without one. Linear-attention and state-space layers (Qwen3-Next,
    Jamba) hold no KV, nor do the `reused` ones (`kv_shared_layers`), which read another layer's."""
    if not isinstance(layer_types, list | tuple) or not all(isinstance(t, str) for t in layer_types):
        return None
    own = [t for i, t in enumerate(layer_types) if i not in reused]
    kv = [t for t in own if t.endswith("attention") and t != "linear_attention"]
    return tuple(t.startswith(("sliding", "chunked")) for t in kv)


def chunk_window(get: Callable[[str], Any], layer_types: Any) -> Any:
    """The window a config's chunked-attention layers keep (Llama 4's `attention_chunk_size`), None when no
    layer is chunked: transformers caches such a layer as a sliding one of that size (cache_utils: "from a
    cache point of view, sliding and chunked are the same"), so it is the model's window, whatever its
    `sliding_window` says. No family has both kinds, and the geometry's one window could not hold two."""
    kinds = layer_types if isinstance(layer_types, list | tuple) else ()
    if "chunked_attention" in kinds and "sliding_attention" not in kinds:
        return get("attention_chunk_size")
    return None


def layer_kinds(layer_types: Any, reused: Collection[int] = ()) -> tuple[int, int] | None:
    """(layers holding a KV cache, of which sliding or chunked) from a config's `layer_types`, less the
    `reused` ones (`kv_shared_layers`); None without one."""
    slides = kv_layer_slides(layer_types, reused)
    return None if slides is None else (len(slides), sum(slides))


def cross_attention_layers(get: Callable[[str], Any]) -> tuple[int, ...]:
    """The layers of a decoder's one cache that hold cross-attention KV (Mllama's `cross_attention_layers`:
    the image's vision tokens, written at prefill and never grown) rather than its tokens' own; () for any
    other config."""
    layers = get("cross_attention_layers")
    if not isinstance(layers, list | tuple):
        return ()
    return tuple(sorted({i for i in layers if isinstance(i, int) and not isinstance(i, bool) and i >= 0}))


def model_cross_attention_layers(model: Any) -> frozenset[int]:
    """`cross_attention_layers` of a Hugging Face model's text config (Mllama); empty for any other model."""
    config = getattr(model, "config", None)
    if config is None:
        return frozenset()
    text = getattr(config, "get_text_config", lambda: config)()
    return frozenset(cross_attention_layers(lambda name: getattr(text, name, None)))


def _first(get: Callable[[str], Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def decoder_attention(get: Callable[[str], Any]) -> tuple[int | None, int | None, int | None] | None:
    """(layers, query heads, KV heads) of an encoder-decoder config's decoder, the half that holds the KV
    cache (its self-attention KV, and the cross-attention KV of the encoder's output, both at its head
    shape); None for any other config. The generic names are the encoder's in most of them (BART's and
    Whisper's `attribute_map` sends `num_hidden_layers` and `num_attention_heads` to `encoder_*`, Whisper's
    `num_key_value_heads` too; T5's `num_hidden_layers` is `num_layers`): the decoder's are BART's,
    Whisper's and Marian's `decoder_layers`/`decoder_attention_heads`, T5's and ProphetNet's
    `num_decoder_layers` (T5's heads, `num_heads`, are shared), ProphetNet's `num_decoder_attention_heads`,
    Moonshine's `decoder_num_*`."""
    if not get("is_encoder_decoder"):
        return None
    layers = _first(get, ("decoder_layers", "num_decoder_layers", "decoder_num_hidden_layers"))
    own_heads = _first(
        get, ("decoder_attention_heads", "num_decoder_attention_heads", "decoder_num_attention_heads")
    )
    heads: int | None = own_heads
    kv_heads: int | None = own_heads
    if own_heads is not None:  # no decoder-only KV head count but Moonshine's: multi-head attention
        kv_heads = _first(get, ("decoder_num_key_value_heads",)) or own_heads
    else:
        heads = get("num_attention_heads")
        kv_heads = kv_heads_of(get, heads)
    return layers or get("num_hidden_layers"), heads, kv_heads


def _reused_layers(get: Callable[[str], Any], layers: Any) -> frozenset[int]:
    """The layers of a live config whose cache layer is a `DummyLayer`: those its `kv_sharing_modes` marks
    "reuse", as transformers' cache reads them (any family that shares KV: Gemma 3n and 4, Mistral Large 4's
    `kv_source_layers`), else `kv_shared_layers`."""
    modes = get("kv_sharing_modes")
    if isinstance(modes, list | tuple):
        return frozenset(i for i, mode in enumerate(modes) if mode == "reuse")
    return kv_shared_layers(get, layers) if isinstance(layers, int) else frozenset()


KvShape = tuple[Any, Any]  # (KV heads, head_dim) of a layer's cache, as its config gives them


def kv_shapes_by_kind(
    layer_get: Callable[[int], Callable[[str], Any]],
    layer_types: Any,
    heads: int | None,
    reused: Collection[int] = (),
) -> dict[bool, set[KvShape]] | None:
    """For the layers holding a KV cache, by whether they slide, the (KV heads, head_dim) each caches, read
    from that layer's own config (`layer_get(i)`): a heterogeneous config's layers may differ (Gemma 4's
    full layers are `global_head_dim` wide, with `num_global_key_value_heads` under `attention_k_eq_v`).
    None without `layer_types`."""
    if kv_layer_slides(layer_types, reused) is None:
        return None
    shapes: dict[bool, set[KvShape]] = {}
    for i, kind in enumerate(layer_types):
        if i in reused or not kind.endswith("attention") or kind == "linear_attention":
            continue
        get = layer_get(i)
        shape = (kv_heads_of(get, heads), get("head_dim"))
        shapes.setdefault(kind.startswith(("sliding", "chunked")), set()).add(shape)
    return shapes


def split_kv_shapes(shapes: dict[bool, set[KvShape]] | None) -> tuple[KvShape, KvShape | None] | None:
    """(the sliding layers' shape, or every layer's when none slides; the full layers' where it differs,
    else None) of `kv_shapes_by_kind`. None when layers of one kind differ among themselves: one geometry
    cannot say that, so its head figures are left unknown."""
    if not shapes or any(len(kind) != 1 for kind in shapes.values()):
        return None
    full = next(iter(shapes[False])) if False in shapes else None
    base = next(iter(shapes[True])) if True in shapes else full
    assert base is not None
    return base, full if full != base else None


class _ConfigReader:
    """A config's attributes, read so that none stops a recording: one whose read raises (transformers'
    `AmbiguousGlobalPerLayerAttributeError` for an attribute that varies by layer, a broken property) is
    None, and remembered so that the manifest says why the figure is unknown."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.unread: dict[str, str] = {}

    def __call__(self, name: str) -> Any:
        try:
            return getattr(self.config, name, None)
        except Exception as exc:  # anything a config does must not end the user's generate()
            first = next(iter(str(exc).splitlines()), "").split(". ")[0][:200]
            self.unread.setdefault(name, f"{type(exc).__name__}: {first}")
            return None


def _text_config(config: Any) -> Any:
    """The config holding the language model's attributes (a multimodal config's text one), or the config
    itself when asking raises."""
    try:
        return config.get_text_config()
    except Exception:
        return config


def _layer_shapes(
    get: Callable[[str], Any], heads: Any, reused: frozenset[int]
) -> tuple[KvShape, KvShape | None] | None:
    """`split_kv_shapes` of a live heterogeneous config (transformers' `per_layer_config`), from each layer's
    own config; None for a homogeneous one, whose global attributes say it all."""
    if not get("is_heterogeneous"):
        return None
    per_layer = get("per_layer_config")

    def layer_get(i: int) -> Callable[[str], Any]:
        try:
            return _ConfigReader(per_layer[i])
        except Exception:
            return lambda name: None

    return split_kv_shapes(kv_shapes_by_kind(layer_get, get("layer_types"), heads, reused))


# A config's count of routed experts under each family's name: a mixture of experts
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _experts_implementation(config: Any, get: Callable[[str], Any]) -> str | None:
    """The experts' forward a mixture-of-experts model ran (transformers 5.x's `_experts_implementation`:
    "grouped_mm", its default, "eager", "batched_mm"...), which a config.json need not name (it may come
    from `from_pretrained(experts_implementation=...)` and is not saved): a prefill's tensors are grouped_mm's
    rows whatever the routing, eager's loop's as the router chose, so `kvtrace plan --from-run` must know
    which it measured. None for a model without experts (transformers says "eager" for a Llama too)."""
    counts = [get(name) for name in _EXPERT_COUNTS]
    if not any(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts):
        return None
    try:
        implementation = getattr(config, "_experts_implementation", None)
    except Exception:  # a config's property must not end the user's generate()
        return None
    return implementation if isinstance(implementation, str) else None


def model_geometry(model: Any, notes: list[str] | None = None) -> dict[str, Any] | None:
    """Geometry of a Hugging Face model (`model.config`) or Meta's reference model (`model.params`). A
    config attribute that cannot be read leaves its figure unknown, with a line in `notes` saying why."""
    if model is None:
        return None
    geometry: dict[str, Any] = {"class": type(model).__name__}
    config = getattr(model, "config", None)
    if config is not None:
        get = _ConfigReader(_text_config(config))
        heads = get("num_attention_heads")
        layers = get("num_hidden_layers")
        decoder = decoder_attention(get)
        if decoder is not None:
            layers, heads, kv_heads = decoder
        reused = _reused_layers(get, layers)
        shapes = _layer_shapes(get, heads, reused) if decoder is None else None
        full: KvShape | None = None
        if shapes is not None:  # the sliding layers' widths as the model's, the full layers' beside them
            (kv_heads, head_dim), full = shapes
        else:
            if decoder is None:
                kv_heads = kv_heads_of(get, heads)
            head_dim = get("head_dim")
        hidden = get("hidden_size")
        head_dim = head_dim or (hidden // heads if hidden and heads else None)
        geometry.update(
            num_layers=layers,
            num_attention_heads=heads,
            # as the cache holds them
            num_kv_heads=cached_kv_heads(get, heads, kv_heads, transformers_version()),
            head_dim=head_dim,
            hidden_size=hidden,
            vocab_size=get("vocab_size"),
            sliding_window=chunk_window(get, get("layer_types")) or get("sliding_window"),
            model_type=get("model_type"),
        )
        if full is not None:
            geometry.update(global_kv_heads=full[0], global_head_dim=full[1])
        # which attention ran: eager's decode step holds K and V expanded to the query heads and the scores
        # over the whole context, which a plan at a longer context must price (`kvtrace plan --from-run`)
        implementation = getattr(config, "_attn_implementation", None)
        if isinstance(implementation, str):
            geometry.update(attn_implementation=implementation)
        experts = _experts_implementation(config, get)
        if experts is not None:
            geometry.update(experts_implementation=experts)
        kinds = layer_kinds(get("layer_types"), reused)
        if kinds is not None:
            geometry.update(kv_layers=kinds[0], sliding_layers=kinds[1])
        elif reused and isinstance(layers, int):
            geometry.update(kv_layers=layers - len(reused))
        cross = cross_attention_layers(get)
        if cross and isinstance(layers, int) and len(cross) < layers:
            # Their KV is the image's, a fixed cost: a token of text costs the other layers only
            own = geometry.get("kv_layers", layers) - len(cross)
            geometry.update(cross_attention_layers=list(cross), kv_layers=own)
        for name, error in get.unread.items():
            note = f"model config: {name} could not be read ({error}); its figures are left unknown"
            if notes is not None and note not in notes:
                notes.append(note)
    else:
        params = getattr(model, "params", None)
        if params is not None and hasattr(params, "n_layers"):
            heads = params.n_heads
            geometry.update(
                num_layers=params.n_layers,
                num_attention_heads=heads,
                num_kv_heads=params.n_kv_heads or heads,
                head_dim=params.dim // heads,
                hidden_size=params.dim,
                vocab_size=params.vocab_size,
                max_seq_len=getattr(params, "max_seq_len", None),
                max_batch_size=getattr(params, "max_batch_size", None),
            )
    try:
        first = next(model.parameters())
        geometry["dtype"] = str(first.dtype).removeprefix("torch.")
        # A DTensor's numel() is its global size; its local tensor is what this rank holds (metadata only)
        own = sum(local_tensor(p).numel() for p in model.parameters())
        whole = sum(p.numel() for p in model.parameters()) + _unseen_shares(model)
        geometry["parameters"] = whole
        if whole != own:
            geometry["parameters_per_rank"] = own
    except (StopIteration, AttributeError, TypeError):
        pass
    return geometry


# Tensor-parallel layers (fairscale's and Megatron's) keep the whole size beside this rank's share: the
# attribute of the share, the names of the whole, and the dimension of their weight it splits. A 1-D
# parameter of a layer split along its input (a row-parallel bias) is whole on every rank.
_SPLIT_SIZES = (
    ("output_size_per_partition", ("out_features", "output_size"), 0),
    ("num_embeddings_per_partition", ("num_embeddings",), 0),
    ("input_size_per_partition", ("in_features", "input_size"), 1),
    ("embedding_dim_per_partition", ("embedding_dim",), 1),
)


def _unseen_shares(model: Any) -> int:
    """Parameters the other tensor-parallel ranks of fairscale or Megatron layers hold and this one does
    not (a Hugging Face `tp_plan`'s DTensor weights count their global size already), so that the model's
    count is its whole, consistent with the whole model's heads beside it. Each split layer's own
    parameters cut along the split dimension count once per share."""
    unseen = 0
    for module in model.modules():
        for share_name, whole_names, dim in _SPLIT_SIZES:
            share = getattr(module, share_name, None)
            wholes = (getattr(module, name, None) for name in whole_names)
            whole = next((size for size in wholes if isinstance(size, int)), 0)
            if not (isinstance(share, int) and 0 < share < whole and whole % share == 0):
                continue
            for param in module.parameters(recurse=False):
                if param.dim() > dim and param.shape[dim] == share:
                    unseen += param.numel() * (whole // share - 1)
            break
    return unseen
