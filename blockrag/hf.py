"""The one place that touches transformers' call and cache internals.

Everything else in blockrag calls a model through ``forward``, builds caches with ``buffer_cache`` /
``slot_cache``, reads them with ``stacked_kv`` and switches attention with ``AttentionSwitch``. When
transformers changes a name or a cache layout, this module is what changes.

* The cache argument and output field: transformers >= 5.24 calls them ``cache`` (the older name is
  deprecated there, to be removed in 5.40); older 5.x only knows the older name. Which one a model takes
  is read once per model class from its ``forward`` signature, and once per output class from its fields.
* Caches from preallocated buffers: a ``DynamicCache`` whose layers are views into buffers we own, so a
  prefill and the decoding after it write in place instead of re-concatenating the context.
* The attention implementation: registering ours with transformers, and switching a model to it for the
  duration of a call (the model's own configured implementation is restored afterwards).
* The decoder layers: where a model keeps them, and recording (or replacing) the hidden states each one
  receives, for the RoPE probe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from blockrag.errors import UnsupportedModelError

NEW_CACHE_NAME = "cache"
KVCache = DynamicCache  # the cache type the engine hands to a model
CacheLayer = DynamicLayer  # base class of cache layers over our own buffers


@functools.cache
def _library_cache_name() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return NEW_CACHE_NAME if NEW_CACHE_NAME in fields else _old_cache_name()


def _old_cache_name() -> str:
    # NOTE: the compatibility branch for transformers < 5.24, the only place that spells the old name.
    return "past_key_values"


@functools.cache
def cache_argument(model_class: type) -> str:
    """Name of the cache keyword ``model_class.forward`` takes ("cache" or the pre-5.24 name)."""
    params = inspect.signature(model_class.forward).parameters
    if NEW_CACHE_NAME in params:
        return NEW_CACHE_NAME
    if _old_cache_name() in params:
        return _old_cache_name()
    return _library_cache_name()  # a forward that only takes **kwargs: what the installed library uses


@functools.cache
def _output_cache_field(output_class: type) -> str:
    fields = {f.name for f in dataclasses.fields(output_class)}
    return NEW_CACHE_NAME if NEW_CACHE_NAME in fields else _old_cache_name()


def output_cache(output) -> KVCache | None:
    """The cache a model call returned, read under the field name its output class has."""
    return getattr(output, _output_cache_field(type(output)))


def forward(model: nn.Module, input_ids: Tensor, *, position_ids: Tensor | None = None,
            attention_mask: Tensor | None = None, cache: KVCache | None = None, logits_to_keep: int | Tensor = 0,
            **kwargs) -> tuple[Tensor, KVCache]:
    """One forward pass that keeps its KV: ``(logits, cache)``.

    Args:
        model: a transformers causal LM.
        input_ids: (B, T) token ids.
        position_ids: (B, T) positions (default: after what ``cache`` holds).
        attention_mask: a 2D padding mask or a 4D mask the backend takes as given.
        cache: the cache to extend (None: a new one).
        logits_to_keep: as in transformers (0 keeps all; an int keeps the last n; a tensor selects rows).
        kwargs: passed through to the attention implementation (e.g. ``blockrag_graph``).

    Returns:
        (logits (B, T', V), the cache with this call's keys and values appended).
    """
    cache_kwargs = {cache_argument(type(model)): cache} if cache is not None else {}
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=True,
                logits_to_keep=logits_to_keep, **cache_kwargs, **kwargs)
    return out.logits, output_cache(out)


def stacked_kv(cache: KVCache) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer (B, H, T, D) keys and values held by a cache, layer order."""
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


# --- caches over buffers we own ------------------------------------------------------------------


class BufferLayer(DynamicLayer):
    """A cache layer over a preallocated (1, H, cap, D) buffer: ``update`` writes in place.

    ``before_use`` (optional) runs once before the first update, e.g. to wait for this layer's copy.
    ``before_reuse`` (optional) runs once before the second update, given the layer's (1, H, cap, D) key and value
    buffers: the first update was a prefill that read the context from elsewhere (``blockrag.attention.BlockContext``),
    so slots 0..length-1 are filled only then, by the hook; until it has run they hold no data, and only the slots
    after them may be read.
    The buffer grows (copied into one twice as large) if more tokens arrive than it has room for.
    """

    def __init__(self, keys: Tensor, values: Tensor, length: int, before_use: Callable[[], None] | None = None,
                 before_reuse: Callable[[Tensor, Tensor], None] | None = None):
        super().__init__()
        self._keys_buf, self._values_buf = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self._before_use, self._before_reuse, self._updates = before_use, before_reuse, 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self._before_use is not None:
            ready, self._before_use = self._before_use, None
            ready()
        if self._updates == 1 and self._before_reuse is not None:
            fill, self._before_reuse = self._before_reuse, None
            fill(self._keys_buf, self._values_buf)
        self._updates += 1
        start, added = self.keys.shape[-2], key_states.shape[-2]
        if start + added > self._keys_buf.shape[-2]:
            self._grow(start + added)
        self._keys_buf[:, :, start : start + added].copy_(key_states)
        self._values_buf[:, :, start : start + added].copy_(value_states)
        self.keys = self._keys_buf[:, :, : start + added]
        self.values = self._values_buf[:, :, : start + added]
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self._keys_buf.shape[-2])
        keys = self._keys_buf.new_empty(*self._keys_buf.shape[:2], capacity, self._keys_buf.shape[-1])
        values = self._values_buf.new_empty(*self._values_buf.shape[:2], capacity, self._values_buf.shape[-1])
        length = self.keys.shape[-2]
        keys[:, :, :length] = self.keys
        values[:, :, :length] = self.values
        self._keys_buf, self._values_buf = keys, values


class SlotLayer(DynamicLayer):
    """A cache layer for graph capture: writes new keys at the slots in ``slots`` (a device tensor read at
    replay time) and returns the whole buffer, so no shape depends on the request."""

    def __init__(self, keys: Tensor, values: Tensor, slots: Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.slots = keys, values, slots
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.keys.index_copy_(2, self.slots, key_states)
        self.values.index_copy_(2, self.slots, value_states)
        return self.keys, self.values


class KeepLayer(DynamicLayer):
    """A cache layer for one prefill whose keys and values are read afterwards: the first update keeps the given
    tensors (``DynamicLayer`` concatenates them onto an empty one, a copy of every key and value); later updates
    concatenate as it does. ``stop`` (optional) is raised once the first update has kept its tensors."""

    def __init__(self, stop: BaseException | None = None) -> None:
        super().__init__()
        self._stop = stop

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.is_initialized and self.keys is not None and self.keys.numel():
            return super().update(key_states, value_states, *args, **kwargs)
        self.keys, self.values = key_states, value_states
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        if self._stop is not None:
            stop, self._stop = self._stop, None
            raise stop
        return self.keys, self.values


class _KeysComplete(Exception):
    """Ends a forward once its last layer's keys and values are cached (what follows is not needed)."""


def prefill_kv(model: nn.Module, input_ids: Tensor, *, position_ids: Tensor | None = None,
               attention_mask: Tensor | None = None) -> KVCache:
    """The cache of one forward over ``input_ids``, computed only as far as the keys and values need.

    The model's own cache layout (``new_cache``) with each plain ``DynamicLayer`` made a ``KeepLayer``: nothing is
    copied into the cache, and once the last decoder layer has cached its keys and values the forward stops,
    so that layer's attention output, its MLP, the final norm and the LM head are not computed. Where the last
    layer's cache is of another kind (a sliding window, a recurrent state), the forward runs to the end.

    Args:
        model: a transformers causal LM.
        input_ids: (B, T) token ids.
        position_ids, attention_mask: as in ``forward``.
    Returns:
        The cache, holding (B, H, T, D) keys and values per layer; read it with ``stacked_kv``.
    """
    cache = new_cache(model.config)
    done = _KeysComplete()
    cache.layers = [KeepLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if cache.layers and type(cache.layers[-1]) is KeepLayer:
        cache.layers[-1] = KeepLayer(stop=done)
    try:
        forward(model, input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                logits_to_keep=1)
    except _KeysComplete as stopped:
        if stopped is not done:  # another prefill's (a model called inside a model): not ours to end
            raise
        # NOTE: its traceback holds the forward's frames (activations) and this one, which holds it: a cycle
        # that would keep them until the garbage collector runs
        done.__traceback__ = None
    return cache


def new_cache(config) -> KVCache:
    """An empty cache for a model config (the model fills it)."""
    return DynamicCache(config=config)


def cache_from_layers(config, layers: list[CacheLayer]) -> KVCache:
    """A cache whose layers are the given ``CacheLayer`` objects (one per decoder layer, in order)."""
    cache = DynamicCache(config=config)
    cache.layers = layers
    return cache


def buffer_cache(config, keys: Tensor, values: Tensor, length: int,
                 before_use: Sequence[Callable[[], None] | None] | None = None,
                 before_reuse: Sequence[Callable[[Tensor, Tensor], None] | None] | None = None) -> KVCache:
    """A cache over (L, 1, H, cap, D) buffers whose first ``length`` slots hold the context.

    Args:
        config: the model config.
        keys, values: the buffers (kept, not copied); later tokens are written into slots length...
        length: tokens already in the buffers (or, with ``before_reuse``, filled before the second update).
        before_use: per layer, an optional hook run before that layer's first update.
        before_reuse: per layer, an optional hook run before that layer's second update (see ``BufferLayer``).
    """
    none = [None] * keys.shape[0]
    hooks, fills = before_use or none, before_reuse or none
    return cache_from_layers(config, [BufferLayer(keys[i], values[i], length, hooks[i], fills[i])
                                      for i in range(keys.shape[0])])


def slot_cache(config, keys: Tensor, values: Tensor, slots: Tensor) -> KVCache:
    """A cache over (L, 1, H, cap, D) buffers that writes each call's keys at ``slots`` (see ``SlotLayer``)."""
    return cache_from_layers(config, [SlotLayer(keys[i], values[i], slots) for i in range(keys.shape[0])])


# --- attention implementation ---------------------------------------------------------------------


def register_attention(name: str, attention: Callable, mask: Callable) -> str:
    """Register an attention function and its mask builder with transformers (idempotent); returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    return name


def sdpa_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """transformers' own SDPA attention (the fallback where a custom implementation does not apply)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation a model is configured with ("sdpa", "eager", ...)."""
    return getattr(model.config, "_attn_implementation", None)


class AttentionSwitch:
    """Switches a model to another attention implementation while any call is inside ``with switch:``.

    Reference-counted under a lock: with concurrent requests on several threads, the model's own
    implementation is restored only when the last one leaves. ``name=None``: a no-op switch.
    """

    def __init__(self, model: nn.Module, name: str | None) -> None:
        self.model, self.name = model, name
        self._lock, self._users, self._previous = threading.Lock(), 0, None

    def __enter__(self) -> AttentionSwitch:
        if self.name is None:
            return self
        config = self.model.config
        with self._lock:
            if self._users == 0:
                self._previous = config._attn_implementation
                config._attn_implementation = self.name
            self._users += 1
        return self

    def __exit__(self, *exc) -> None:
        if self.name is None:
            return
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self.model.config._attn_implementation = self._previous


# --- decoder layers ---------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM, in call order.

    Raises:
        UnsupportedModelError: no ``layers`` list on the base model and no module list as long as
            ``num_hidden_layers``.
    """
    layers = getattr(model.base_model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise UnsupportedModelError(
        f"expected the decoder layers at model.base_model.layers (or a module list of num_hidden_layers={count}), "
        f"found neither in {type(model).__name__}"
    )


@contextlib.contextmanager
def layer_inputs(model: nn.Module, feed: Sequence[Tensor] | None = None) -> Iterator[list[Tensor]]:
    """Record the hidden states each decoder layer receives in the calls made inside ``with``.

    Args:
        model: a transformers causal LM.
        feed: per layer, the (B, T, hidden) states to give it instead of what it receives (None: change
            nothing). What it would have received is still what is recorded.

    Yields:
        A list that fills, in call order, with a copy of each (B, T, hidden) layer input.

    Only calls on the thread that entered are recorded or fed; the hooks are removed on exit.
    """
    recorded: list[Tensor] = []
    thread = threading.get_ident()

    def hook(index: int):
        def pre_forward(module, args, kwargs):
            if threading.get_ident() != thread:
                return None
            # NOTE: decoder layers take the hidden states first; transformers passes them positionally.
            by_name = "hidden_states" in kwargs
            recorded.append((kwargs["hidden_states"] if by_name else args[0]).clone())
            if feed is None:
                return None
            if by_name:
                return args, {**kwargs, "hidden_states": feed[index]}
            return (feed[index], *args[1:]), kwargs

        return pre_forward

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(decoder_layers(model))]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


# --- training ---------------------------------------------------------------------------------------


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant checkpoints).

    transformers >= 5.24 calls this ``activation_checkpointing_enable`` (the older name is deprecated).
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
