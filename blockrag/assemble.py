"""Blocks -> a transformers cache. The only module that knows the HF cache layout.

transformers 5.x: ``DynamicCache`` filled through its public ``update(k, v, layer_idx)``; each layer holds
``[B, H, T, D]`` keys (after RoPE) and values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from blockrag.kv import KVBlock
from blockrag.rope import RopeSpec, rotate_keys


def block_offsets(blocks: Sequence[KVBlock]) -> list[int]:
    """Start position of each block in the assembled context."""
    offsets, total = [], 0
    for block in blocks:
        offsets.append(total)
        total += block.num_tokens
    return offsets


def assemble_cache(
    blocks: Sequence[KVBlock], rope: RopeSpec, config, device: torch.device, *, reencode: bool = True
) -> tuple[DynamicCache, int]:
    """Concatenate blocks into a fresh cache, each block's keys rotated to its offset.

    Args:
        blocks: KVBlocks with (L, H, T_i, D) tensors, on ``device`` or on the CPU.
        rope: the model's rotary facts.
        config: the model config (decides the cache's layer types).
        device: where the cache lives.
        reencode: rotate keys to their offsets. False keeps every block at positions 0..T_i-1 (the
            paper's "w/o position re-encoding" ablation).

    Returns:
        (cache, next_position): next_position = sum of T_i, the position of the first token after.
    """
    keys, values = [], []
    for block, offset in zip(blocks, block_offsets(blocks)):
        k = block.keys.to(device, non_blocking=True)
        keys.append(rotate_keys(k, offset, rope.inv_freq) if reencode and offset else k)
        values.append(block.values.to(device, non_blocking=True))
    all_keys = torch.cat(keys, dim=2)  # (L, H, N, D)
    all_values = torch.cat(values, dim=2)
    cache = DynamicCache(config=config)
    for layer in range(all_keys.shape[0]):
        cache.update(all_keys[layer].unsqueeze(0), all_values[layer].unsqueeze(0), layer)
    return cache, all_keys.shape[2]
