"""Blocks -> a transformers cache over one preallocated buffer per layer.

The buffer holds every block's keys (rotated to the block's offset) and values, with room for the final
block and the tokens to be generated, so neither the prefill nor decoding re-concatenates the context;
``blockrag.hf.buffer_cache`` wraps it as the cache the model takes.

Three ways to fill the buffer, same result:
* eager (CPU, or no triton): rotate each block straight into its slots (``rope.rotate_keys_into``);
* device-resident blocks on CUDA: one Triton pass gathers all blocks and rotates keys on the way;
* host-resident blocks on CUDA (pinned memory; device-resident ones may be mixed in): copies run on a
  side stream, group of layers by group, while earlier layers compute; each layer is gathered and rotated
  on the GPU right before its first use.

On the CPU the first token needs no buffer filled at all (``context_cache``): the final block's attention
reads every block where it is stored, rotating the query instead of the keys (``blockrag.attention.BlockContext``),
and the buffer's context slots are filled layer by layer only if decoding follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from blockrag.attention import BlockContext
from blockrag.hf import KVCache, buffer_cache
from blockrag.kv import KVBlock, same_device
from blockrag.rope import RopeSpec, rotate_keys_into, rotation_cos_sin


def block_offsets(blocks: Sequence[KVBlock]) -> list[int]:
    """Start position of each block in the assembled context."""
    offsets, total = [], 0
    for block in blocks:
        offsets.append(total)
        total += block.num_tokens
    return offsets


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fast_path(blocks: Sequence[KVBlock], device: torch.device) -> str:
    """Which fill applies: "gpu" (device-resident, Triton), "host" (pinned CPU -> CUDA, pipelined) or "eager"."""
    if device.type != "cuda" or not _triton_available():
        return "eager"
    if any(b.keys.shape[-1] != b.values.shape[-1] or not b.keys.is_contiguous() for b in blocks):
        return "eager"
    if all(same_device(b.device, device) for b in blocks):
        return "gpu"
    if all(same_device(b.device, device) or b.device.type == "cpu" for b in blocks):
        return "host"  # host blocks are copied in; blocks already on the device are read in place
    return "eager"


def gather_plans(blocks: Sequence[KVBlock], keys: Sequence[Tensor], values: Sequence[Tensor],
                 offsets: Sequence[int], deltas: Sequence[int], rope: RopeSpec, device: torch.device,
                 per_layer: bool = False):
    """Launch plans for ``kernels.gather_rotate``: one for plain blocks, one for fp8 blocks (if any).

    Args:
        blocks: the blocks (for lengths and fp8 scales).
        keys, values: per block, the device tensors to read: (L, H, T, D) each.
        per_layer: one pointer row per layer (sources addressed layer by layer) instead of one row.
    """
    from blockrag.kernels import GatherPlan, block_table, element_offsets, upload_rows

    plans = []
    for fp8 in (False, True):
        chosen = [i for i, b in enumerate(blocks) if b.quantized == fp8]
        if not chosen:
            continue
        table = block_table([blocks[i].num_tokens for i in chosen], [offsets[i] for i in chosen],
                            [deltas[i] for i in chosen], rope.inv_freq, device)
        k_base, v_base = keys[chosen[0]], values[chosen[0]]
        k_offs, k_align = element_offsets([keys[i] for i in chosen], k_base, device, per_layer)
        v_offs, v_align = element_offsets([values[i] for i in chosen], v_base, device, per_layer)
        scales, keep = None, ()
        if fp8:
            # NOTE: every block's scales go up as one tensor (nb, 2, L, H): a blocking copy per block and scale, 126
            # at 32K context, held the first host-to-device copy back by milliseconds.
            sides = [[blocks[i].key_scale for i in chosen], [blocks[i].value_scale for i in chosen]]
            if any(scale.device != sides[0][0].device for side in sides for scale in side):
                sides = [[scale.to(device, non_blocking=True) for scale in side] for side in sides]
            stacked = torch.stack([torch.stack(side) for side in sides], 1).float().to(device, non_blocking=True)
            step = stacked[0, 0].numel() * stacked.element_size()
            scales = upload_rows([[stacked.data_ptr() + (2 * j + side) * step for j in range(len(chosen))]
                                   for side in (0, 1)], device)
            keep = (stacked,)
        plans.append(GatherPlan(table, k_base, v_base, k_offs, v_offs, min(k_align, v_align), scales, keep))
    return plans


def assemble_cache(
    blocks: Sequence[KVBlock], rope: RopeSpec, config, device: torch.device, *, reencode: bool = True,
    capacity: int = 0, path: str | None = None, dtype: torch.dtype | None = None,
) -> tuple[KVCache, int]:
    """Concatenate blocks into a fresh cache, each block's keys rotated to its offset.

    Args:
        blocks: KVBlocks with (L, H, T_i, D) tensors, on ``device`` or on the CPU.
        rope: the model's rotary facts.
        config: the model config (decides the cache's layer types).
        device: where the cache lives.
        reencode: rotate keys to their offsets. False keeps every block at positions 0..T_i-1 (the
            paper's "w/o position re-encoding" ablation).
        capacity: extra room to preallocate after the context (final block + new tokens).
        path: force "eager", "gpu" or "host" (default: ``fast_path``).
        dtype: dtype of the cache (default: that of the first block that is not fp8).

    Returns:
        (cache, next_position): next_position = sum of T_i, the position of the first token after.
    """
    offsets = block_offsets(blocks)
    total = offsets[-1] + blocks[-1].num_tokens
    deltas = offsets if reencode else [0] * len(blocks)
    layers, heads, _, dim = blocks[0].keys.shape
    dim_v = blocks[0].values.shape[-1]
    dtype = dtype or next(b.dtype for b in blocks if not b.quantized)
    keys = torch.empty(layers, 1, heads, total + capacity, dim, dtype=dtype, device=device)
    values = torch.empty(layers, 1, heads, total + capacity, dim_v, dtype=dtype, device=device)
    path = path or fast_path(blocks, device)
    ready: list[Callable[[], None] | None] = [None] * layers
    if path == "gpu":
        from blockrag.kernels import gather_rotate

        for plan in gather_plans(blocks, [b.keys for b in blocks], [b.values for b in blocks], offsets, deltas, rope,
                                 device):
            gather_rotate(plan, 0, keys[:, 0], values[:, 0])
    elif path == "host":
        ready = _copy_from_host(blocks, offsets, deltas, rope, keys, values)
    else:
        _fill_eager(blocks, offsets, deltas, rope, dtype, keys[:, 0], values[:, 0])
    return buffer_cache(config, keys, values, total, ready), total


def _fill_eager(blocks: Sequence[KVBlock], offsets: Sequence[int], deltas: Sequence[int], rope: RopeSpec,
                dtype: torch.dtype, keys: Tensor, values: Tensor, layer: int | None = None) -> None:
    """Write every block into (L, H, cap, D) buffers (or, with ``layer``, that layer into (H, cap, D) ones)."""
    for block, offset, delta in zip(blocks, offsets, deltas):
        block = block.to(keys.device).dequantize(dtype)
        k, v = (block.keys, block.values) if layer is None else (block.keys[layer], block.values[layer])
        slots = slice(offset, offset + block.num_tokens)
        if delta:
            rotate_keys_into(keys[..., slots, :], k, delta, rope.inv_freq)
        else:
            keys[..., slots, :] = k
        values[..., slots, :] = v


class ContextCache(NamedTuple):
    """``context_cache``'s result: the cache, the position after the context, what the attention reads."""

    cache: KVCache
    next_position: int
    context: BlockContext


def reads_in_place(blocks: Sequence[KVBlock], device: torch.device, dtype: torch.dtype) -> bool:
    """``context_cache`` applies: CPU blocks of the engine's dtype (not fp8), keys and values of one head dim."""
    return device.type == "cpu" and bool(blocks) and all(
        b.device.type == "cpu" and not b.quantized and b.dtype == dtype and b.keys.shape[-1] == b.values.shape[-1]
        for b in blocks)


def context_cache(blocks: Sequence[KVBlock], rope: RopeSpec, config, *, reencode: bool = True,
                  capacity: int = 0) -> ContextCache:
    """A cache for a final block whose attention reads the blocks in place (see ``reads_in_place``).

    The buffer is allocated but its context slots stay empty through the prefill: the forward must get
    ``context`` (the ``blockrag_blocks`` keyword of ``blockrag.attention``). Each layer's slots are filled
    (rotated, as ``assemble_cache`` does) before that layer's next update, i.e. only if decoding follows.

    Args:
        blocks: KVBlocks with (L, H, T_i, D) tensors on the CPU.
        rope, config, reencode, capacity: as in ``assemble_cache``.
    """
    offsets = block_offsets(blocks)
    total = offsets[-1] + blocks[-1].num_tokens
    deltas = offsets if reencode else [0] * len(blocks)
    layers, heads, _, dim = blocks[0].keys.shape
    dtype = blocks[0].dtype
    # NOTE: untouched pages of a fresh buffer cost nothing: the prefill writes only the final block's slots.
    keys = torch.empty(layers, 1, heads, total + capacity, dim, dtype=dtype)
    values = torch.empty(layers, 1, heads, total + capacity, dim, dtype=dtype)

    def filler(layer: int):
        def fill(layer_keys: Tensor, layer_values: Tensor) -> None:
            _fill_eager(blocks, offsets, deltas, rope, dtype, layer_keys[0], layer_values[0], layer=layer)
        return fill

    cache = buffer_cache(config, keys, values, total, before_reuse=[filler(i) for i in range(layers)])
    cos, sin = rotation_cos_sin(-torch.tensor(deltas), rope.inv_freq)
    half = rope.inv_freq.numel()
    context = BlockContext(tuple(b.keys for b in blocks), tuple(b.values for b in blocks),
                           cos[:, :half].contiguous(), sin[:, :half].contiguous())
    return ContextCache(cache, total, context)


def copy_groups(layers: int) -> list[range]:
    """The groups of layers host-resident blocks are copied in (and the CUDA-graph pieces replayed in).

    Eight equal groups, the last one halved down to a single layer: the first layers start once their group has
    landed, and what follows the last copy (its group's gather and forward) is one layer's work, not an eighth's.
    """
    size = max(1, layers // 8)
    starts = list(range(0, layers, size))
    while layers - starts[-1] > 1:
        starts.append(starts[-1] + (layers - starts[-1]) // 2)
    return [range(a, b) for a, b in zip(starts, [*starts[1:], layers])]


STAGING_ALIGN = 256  # bytes: each staged tensor starts on this boundary (the gather's aligned loads need 16)


def staging_views(tensors: Sequence[Tensor], device: torch.device) -> tuple[Tensor, list[Tensor]]:
    """(buffer, views): one uninitialised byte buffer on ``device`` and, per tensor, a contiguous view of it with
    that tensor's shape and dtype, each starting on a ``STAGING_ALIGN``-byte boundary, none overlapping.

    NOTE: one allocation a request instead of one per block and side: at 32K context, 126 allocations (plus as
    many stream records) took ~2 ms of host time before the first host-to-device copy could be issued.
    """
    starts, total = [], 0
    for tensor in tensors:
        starts.append(total)
        total += -(-tensor.numel() * tensor.element_size() // STAGING_ALIGN) * STAGING_ALIGN
    buffer = torch.empty(total, dtype=torch.uint8, device=device)
    return buffer, [buffer.narrow(0, start, t.numel() * t.element_size()).view(t.dtype).view(t.shape)
                    for start, t in zip(starts, tensors)]


def _copy_from_host(blocks, offsets, deltas, rope, keys, values) -> list[Callable[[], None]]:
    """Start host->device copies, layer group by layer group, on a side stream; return per-layer 'ready' hooks.

    Each block is copied into a device staging tensor of its own shape, so every copy is one contiguous
    memcpy; layer l's hook waits for its group's copy, then gathers and rotates on the compute stream.
    """
    device = keys.device
    compute = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(compute)  # the buffers were allocated on the compute stream
    on_host = [b.device.type == "cpu" for b in blocks]
    staging, views = staging_views([t for b, h in zip(blocks, on_host) if h for t in (b.keys, b.values)], device)
    staging.record_stream(side)  # written on the side stream: not reusable before those copies finish
    views = iter(views)
    staged = [(next(views), next(views)) if h else (b.keys, b.values) for b, h in zip(blocks, on_host)]
    staged_k, staged_v = [k for k, _ in staged], [v for _, v in staged]
    layers = keys.shape[0]
    plans = gather_plans(blocks, staged_k, staged_v, offsets, deltas, rope, device, per_layer=True)
    # NOTE: copies go in groups of layers: one memcpy per block and group keeps the host's issue time well
    # under the transfer time, and a layer still starts as soon as its group has landed.
    events = []
    with torch.cuda.stream(side):
        for group in copy_groups(layers):
            first, last = group.start, group.stop
            for block, sk, sv, h in zip(blocks, staged_k, staged_v, on_host):
                if h:
                    sk[first:last].copy_(block.keys[first:last], non_blocking=True)
                    sv[first:last].copy_(block.values[first:last], non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
            events += [event] * len(group)
    return [_LayerFromHost(events[layer], (staged_k, staged_v), plans, layer, keys[layer], values[layer])
            for layer in range(layers)]


class _LayerFromHost:
    """``before_use`` hook of one layer: wait for its copy, then gather + rotate on the compute stream.

    It holds the staging tensors: the pointer tables address them, so they must outlive every layer's use.
    """

    def __init__(self, event, staging, plans, layer: int, keys: Tensor, values: Tensor) -> None:
        self.event, self.staging, self.plans, self.layer = event, staging, plans, layer
        self.keys, self.values = keys, values

    def __call__(self) -> None:
        from blockrag.kernels import gather_rotate

        torch.cuda.current_stream(self.keys.device).wait_event(self.event)
        for plan in self.plans:
            gather_rotate(plan, self.layer, self.keys, self.values, scale_base=self.layer * self.keys.shape[1])
