"""Training-free recovery for block mode: selective recompute of context tokens at question time.

A model that was never block fine-tuned loses accuracy in block mode because no passage token saw the passages
before it. Here, at question time, a selected subset S of the context tokens is re-encoded with full attention to
everything before it, the cached (block) KV of every other token is kept, and the final block is prefilled over
the result. Exactly: at every layer, a selected token at position p attends to the KV of all context positions
<= p, where a position holds its block KV if it is not selected and its recomputed KV if it is; the final block
attends to all of it. One forward pass does it: the selected tokens and the final block are fed at their
positions with an explicit mask, and each layer writes the selected tokens' fresh KV into their slots of the
cache before attending (so later selected tokens see them).

* S = every context token: the cache equals a full causal prefill (full mode).
* S = empty: plain block mode.
* Block 0 (the instruction, first in the prompt) is exact in block mode already: no strategy selects it.

Selections (``Recompute.parse``; parts joined with "+" are unions, e.g. "first:4+deviation:0.1"):

* ``none``, ``all``;
* ``recommended`` -- the measured best selection for a model that was not block fine-tuned (``RECOMMENDED``); a
  block fine-tuned model needs none;
* ``first:K`` -- the first K tokens of every passage block (EPIC / LegoLink: the repeated attention sinks);
* ``deviation:R[@L]`` -- CacheBlend: the fraction R of passage tokens whose block KV deviates most from
  full-attention KV at check layer L (default 1), by a full prefill of layers 0..L only;
* ``query:R[@L]`` -- query-aware (ProphetKV-like): the fraction R of passage tokens the final block attends to most
  at layer L (default 1) in block mode, summed over heads and question tokens.

R is a fraction (0.1) or a percentage ("10%"). The selection work runs at question time and is part of TTFT.
Attention runs with the model's own "sdpa" or "eager" implementation (an explicit mask is required); other
implementations are refused with a clear reason, and the engine's fast paths (its attention and CUDA graphs) are
not used for a recompute prefill.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blockrag.errors import InvalidInputError, UnsupportedModelError
from blockrag.hf import (
    AttentionSwitch,
    CacheLayer,
    KVCache,
    attention_implementation,
    cache_from_layers,
    forward,
    new_cache,
    stacked_kv,
)

STRATEGIES = ("none", "all", "first", "deviation", "query")
# NOTE: what "recommended" stands for, from the measurements in the README (selective recompute): on SmolLM2-135M
# it removed 86% of block mode's first-token KL to full mode at 19% of the context (n = 35), more than any
# other selection at <= 20%; its demo answers contain the expected fact in 4 of 4 questions (plain block: 2 of 4),
# two of them muddled where full mode's are clean.
RECOMMENDED = "deviation:0.2"
DEFAULT_CHECK_LAYER = 1
MASKED_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class Part:
    """One selection strategy: ``first`` uses k; ``deviation`` and ``query`` use ratio and layer."""

    strategy: str
    k: int = 0
    ratio: float = 0.0
    layer: int = DEFAULT_CHECK_LAYER

    def __str__(self) -> str:
        if self.strategy in ("none", "all"):
            return self.strategy
        if self.strategy == "first":
            return f"first:{self.k}"
        layer = "" if self.layer == DEFAULT_CHECK_LAYER else f"@{self.layer}"
        return f"{self.strategy}:{self.ratio:g}{layer}"


@dataclass(frozen=True)
class Recompute:
    """A selection of context tokens to recompute: the union of its parts."""

    parts: tuple[Part, ...]

    def __str__(self) -> str:
        return "+".join(str(p) for p in self.parts)

    @property
    def is_none(self) -> bool:
        return all(p.strategy == "none" for p in self.parts)

    @classmethod
    def parse(cls, spec: str | Recompute | None) -> Recompute | None:
        """A Recompute from its text ("first:8", "deviation:15%@2", "first:4+query:0.1", "all", "none",
        "recommended")."""
        if spec is None or isinstance(spec, Recompute):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise InvalidInputError(f"expected a recompute selection such as 'first:8' or 'deviation:0.1', found "
                                    f"{spec!r}")
        if spec.strip().lower() == "recommended":
            spec = RECOMMENDED
        return cls(tuple(_parse_part(text.strip(), spec) for text in spec.split("+")))


_PART = re.compile(r"^(?P<name>[a-z]+)(?::(?P<amount>[0-9.]+%?))?(?:@(?P<layer>\d+))?$")


def _parse_part(text: str, spec: str) -> Part:
    match = _PART.match(text.lower())
    usage = ("'recommended', 'none', 'all', 'first:K' (K tokens per passage), 'deviation:R[@L]' or 'query:R[@L]' "
             "(R a fraction like 0.1 or 10%, L the check layer), joined by '+'")
    if match is None or match["name"] not in STRATEGIES:
        raise InvalidInputError(f"expected a recompute selection of {usage}, found {spec!r}")
    name, amount, layer = match["name"], match["amount"], match["layer"]
    if name in ("none", "all"):
        if amount is not None or layer is not None:
            raise InvalidInputError(f"expected '{name}' without an amount, found {text!r} in {spec!r}")
        return Part(name)
    if amount is None:
        raise InvalidInputError(f"expected an amount for {name!r} ({usage}), found {text!r} in {spec!r}")
    if name == "first":
        if layer is not None or not amount.isdigit() or int(amount) < 1:
            raise InvalidInputError(f"expected 'first:K' with an integer K >= 1, found {text!r} in {spec!r}")
        return Part("first", k=int(amount))
    ratio = float(amount[:-1]) / 100 if amount.endswith("%") else float(amount)
    if not 0 < ratio <= 1:
        raise InvalidInputError(f"expected a fraction 0 < R <= 1 (or a percentage) for {name!r}, found {text!r}")
    return Part(name, ratio=ratio, layer=int(layer) if layer is not None else DEFAULT_CHECK_LAYER)


# --- model facts ----------------------------------------------------------------------------------

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (the ModuleList with one entry per hidden layer)."""
    count = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise UnsupportedModelError(f"expected a list of {count} decoder layers in {type(model).__name__}, found none")


def _attention_module(layer: nn.Module) -> nn.Module:
    for name in ("self_attn", "attention", "attn"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedModelError(f"expected a self-attention module in {type(layer).__name__}, found none")


def check_attention(model: nn.Module) -> str:
    """The model's attention implementation, if a recompute pass can run on it (it takes an explicit mask)."""
    implementation = attention_implementation(model) or "eager"
    if implementation not in MASKED_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"expected a model with attention implementation in {MASKED_IMPLEMENTATIONS} for selective recompute, "
            f"found {implementation!r}; it needs an explicit (non-causal-prefix) mask. Load the model with "
            "attn_implementation='sdpa'")
    return implementation


def explicit_mask(query_positions: Tensor, kv_length: int, model: nn.Module) -> Tensor:
    """(1, 1, Q, kv_length) mask: query at position p sees kv slots 0..p (slot j holds position j)."""
    slots = torch.arange(kv_length, device=query_positions.device)
    allowed = slots[None, :] <= query_positions[:, None]
    if check_attention(model) == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[None, None]
    return allowed[None, None]


class _Stop(Exception):
    """Raised by a hook to end a forward pass after the layers a probe needs."""


def _run_until(model: nn.Module, layer: int, **inputs) -> None:
    """Forward through layers 0..layer only (a pre-hook on layer + 1 ends the pass)."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise InvalidInputError(f"expected a check layer in 0..{len(layers) - 1}, found {layer}")
    if layer + 1 == len(layers):
        forward(model, **inputs)
        return

    def stop(*args, **kwargs):
        raise _Stop

    handle = layers[layer + 1].register_forward_pre_hook(stop)
    try:
        forward(model, **inputs)
    except _Stop:
        pass
    finally:
        handle.remove()


# --- caches ---------------------------------------------------------------------------------------

class _ContextLayer(CacheLayer):
    """Read-only view of a context for probes: returns context + new KV, stores nothing."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return torch.cat((self.keys, key_states), dim=-2), torch.cat((self.values, value_states), dim=-2)


class RecomputeLayer(CacheLayer):
    """A cache layer over a (1, H, cap, D) buffer holding the context in slots 0..N-1.

    Its first update writes the fed tokens' KV at ``slots`` (recomputed context tokens at their own positions,
    then the final block at N...), leaving the other context slots as they were, and returns slots 0..N+F-1.
    Later updates (decoding) append after that, growing the buffer if needed.
    """

    def __init__(self, keys: Tensor, values: Tensor, length: int, slots: Tensor, end: int) -> None:
        super().__init__()
        self._keys, self._values = keys, values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self._slots, self._end = slots, end

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self._slots is not None:
            slots, self._slots = self._slots, None
            self._keys.index_copy_(2, slots, key_states.to(self._keys.dtype))
            self._values.index_copy_(2, slots, value_states.to(self._values.dtype))
            end = self._end
        else:
            start, added = self.keys.shape[-2], key_states.shape[-2]
            end = start + added
            if end > self._keys.shape[-2]:
                self._grow(end)
            self._keys[:, :, start:end].copy_(key_states)
            self._values[:, :, start:end].copy_(value_states)
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self._keys.shape[-2])
        keys = self._keys.new_empty(*self._keys.shape[:2], capacity, self._keys.shape[-1])
        values = self._values.new_empty(*self._values.shape[:2], capacity, self._values.shape[-1])
        length = self.keys.shape[-2]
        keys[:, :, :length], values[:, :, :length] = self.keys, self.values
        self._keys, self._values = keys, values


def _cache(config, layers: list[CacheLayer]) -> KVCache:
    return cache_from_layers(config, layers)


def _context_kv(cache) -> tuple[list[Tensor], list[Tensor]]:
    return stacked_kv(cache)


# --- selection ------------------------------------------------------------------------------------

def block_offsets(block_lengths: Sequence[int]) -> list[int]:
    offsets, total = [], 0
    for length in block_lengths:
        offsets.append(total)
        total += length
    return offsets


def _passage_range(block_lengths: Sequence[int]) -> tuple[int, int]:
    """[start, end) of the context after block 0 (the tokens a strategy may select)."""
    return (block_lengths[0] if block_lengths else 0), sum(block_lengths)


def _top(scores: Tensor, start: int, ratio: float) -> set[int]:
    candidates = scores[start:]
    count = min(candidates.numel(), math.ceil(ratio * candidates.numel()))
    if count == 0:
        return set()
    return {start + int(i) for i in torch.topk(candidates.float(), count).indices.tolist()}


@torch.inference_mode()
def deviation_scores(model: nn.Module, context_ids: Sequence[int], cache, layer: int) -> Tensor:
    """(N,) per-token deviation at ``layer`` between the block KV in ``cache`` and full-attention KV.

    ||K_full - K_block|| / mean ||K_full|| + ||V_full - V_block|| / mean ||V_full||, over heads and dims (keys of
    both are at the same positions, after RoPE). Costs a full prefill of layers 0..layer over the context.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(context_ids)], device=device)
    probe = new_cache(model.config)
    positions = torch.arange(ids.shape[1], device=device)
    _run_until(model, layer, input_ids=ids, position_ids=positions[None], cache=probe,
               attention_mask=explicit_mask(positions, ids.shape[1], model), logits_to_keep=1)
    (probe_k, probe_v), (cache_k, cache_v) = stacked_kv(probe), stacked_kv(cache)
    full_k, full_v = probe_k[layer][0].float(), probe_v[layer][0].float()
    block_k, block_v = cache_k[layer][0].float(), cache_v[layer][0].float()
    dk = (full_k - block_k).transpose(0, 1).flatten(1).norm(dim=-1)
    dv = (full_v - block_v).transpose(0, 1).flatten(1).norm(dim=-1)
    nk = full_k.transpose(0, 1).flatten(1).norm(dim=-1).mean().clamp_min(1e-12)
    nv = full_v.transpose(0, 1).flatten(1).norm(dim=-1).mean().clamp_min(1e-12)
    return (dk / nk + dv / nv).cpu()


@torch.inference_mode()
def query_scores(model: nn.Module, cache, final_ids: Sequence[int], layer: int) -> Tensor:
    """(N,) attention mass the final block puts on each context token at ``layer``, in block mode.

    Runs the final block over the block-mode context through layers 0..layer with eager attention (to read the
    attention probabilities), summed over heads and final-block tokens. The cache is not modified.
    """
    device = next(model.parameters()).device
    keys, values = _context_kv(cache)
    n = keys[0].shape[-2]
    probe = _cache(model.config, [_ContextLayer(k, v) for k, v in zip(keys, values)])
    captured: list[Tensor] = []

    def keep(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise UnsupportedModelError(f"expected attention probabilities from {type(module).__name__} under "
                                        "eager attention, found none; query-aware selection needs them")
        captured.append(weights)

    attention = _attention_module(decoder_layers(model)[layer])
    handle = attention.register_forward_hook(keep)
    positions = torch.arange(n, n + len(final_ids), device=device)
    try:
        with AttentionSwitch(model, "eager"):
            _run_until(model, layer, input_ids=torch.tensor([list(final_ids)], device=device),
                       position_ids=positions[None], cache=probe,
                       attention_mask=explicit_mask(positions, n + len(final_ids), model), logits_to_keep=1)
    finally:
        handle.remove()
    weights = captured[0][0].float()  # (H, F, N + F)
    return weights[..., :n].sum(dim=(0, 1)).cpu()


def select_positions(model: nn.Module, recompute: Recompute | str, block_lengths: Sequence[int],
                     context_ids: Sequence[int], cache, final_ids: Sequence[int]) -> list[int]:
    """Sorted context positions to recompute.

    Args:
        model: the model.
        recompute: the selection.
        block_lengths: tokens per context block (block 0 first).
        context_ids: all context token ids, blocks concatenated.
        cache: the assembled block-mode cache of the context (keys rotated to their positions).
        final_ids: the final block's ids (for query-aware selection).
    """
    recompute = Recompute.parse(recompute)
    start, end = _passage_range(block_lengths)
    chosen: set[int] = set()
    for part in recompute.parts:
        if part.strategy == "all":
            chosen.update(range(start, end))
        elif part.strategy == "first":
            for offset, length in zip(block_offsets(block_lengths)[1:], block_lengths[1:]):
                chosen.update(range(offset, offset + min(part.k, length)))
        elif part.strategy == "deviation":
            chosen |= _top(deviation_scores(model, context_ids, cache, part.layer), start, part.ratio)
        elif part.strategy == "query":
            chosen |= _top(query_scores(model, cache, final_ids, part.layer), start, part.ratio)
    return sorted(chosen)


# --- the recompute prefill ------------------------------------------------------------------------

@torch.inference_mode()
def recompute_prefill(model: nn.Module, cache, context_ids: Sequence[int], positions: Sequence[int],
                      final_ids: Sequence[int], *, capacity: int = 0,
                      keep: int | None = None) -> tuple[Tensor, KVCache]:
    """Recompute the context tokens at ``positions`` and prefill the final block, in one forward pass.

    Args:
        model: the model (attention "sdpa" or "eager").
        cache: the assembled block-mode cache of the context (N tokens, keys rotated to positions 0..N-1).
        context_ids: the N context token ids.
        positions: sorted context positions to recompute (see ``select_positions``).
        final_ids: the final block's ids (F >= 1).
        capacity: extra room for tokens generated afterwards.
        keep: None (default): the last final-block token's logits, (V,); K in 1..F: the last K final-block tokens'
            logits, (K, V) (e.g. to score an answer fed at the end of the final block).

    Returns:
        (logits float32, (V,) or (K, V) as ``keep`` says; the cache: N + F tokens, ready for decoding).
    """
    check_attention(model)
    device = next(model.parameters()).device
    keys, values = _context_kv(cache)
    n, f = keys[0].shape[-2], len(final_ids)
    if n != len(context_ids):
        raise InvalidInputError(f"expected {n} context ids for a cache of {n} tokens, found {len(context_ids)}")
    if f < 1:
        raise InvalidInputError("expected a non-empty final block")
    if keep is not None and not 1 <= keep <= f:
        raise InvalidInputError(f"expected keep in 1..{f} (the final block's length) or None, found {keep}")
    selected = torch.as_tensor(list(positions), dtype=torch.long, device=device)
    if selected.numel() and (int(selected.min()) < 0 or int(selected.max()) >= n):
        raise InvalidInputError(f"expected recompute positions in 0..{n - 1}, found {positions[:5]}...")
    slots = torch.cat((selected, torch.arange(n, n + f, device=device)))
    ids = torch.tensor(list(context_ids), dtype=torch.long, device=device)[selected].tolist() + list(final_ids)
    layers = []
    for k, v in zip(keys, values):
        buf_k = k.new_empty(*k.shape[:2], n + f + capacity, k.shape[-1])
        buf_v = v.new_empty(*v.shape[:2], n + f + capacity, v.shape[-1])
        buf_k[:, :, :n], buf_v[:, :, :n] = k, v
        layers.append(RecomputeLayer(buf_k, buf_v, n, slots, n + f))
    out_cache = _cache(model.config, layers)
    logits, _ = forward(model, torch.tensor([ids], device=device), position_ids=slots[None],
                        attention_mask=explicit_mask(slots, n + f, model), cache=out_cache,
                        logits_to_keep=1 if keep is None else keep)
    return (logits[0, -1] if keep is None else logits[0]).float(), out_cache
