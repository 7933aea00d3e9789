"""The block attention mask and block positions: one source for training and for test references.

Blocks 0..n-1 attend causally within themselves only; the final block (and any response after it)
attends causally to everything before it. With position re-encoding, positions are contiguous 0..N-1;
without it (the paper's ablation), every context block restarts at 0 and the final block starts after
the sum of block lengths, exactly as the engine assembles it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def block_attention_mask(block_lengths: Sequence[int], final_length: int, device=None, *,
                         shared_prefix: bool = False) -> Tensor:
    """Boolean (N, N) mask, True where query i may attend to key j.

    Args:
        block_lengths: lengths of the context blocks (block 0 and passages), in order.
        final_length: tokens of the final block plus any response tokens (they attend to everything).
        shared_prefix: every passage also attends to block 0, as if each were encoded after the instruction
            block (block 0 is the same in every prompt of a template, so such passages could still be cached).
    """
    total = sum(block_lengths) + final_length
    block_id = torch.empty(total, dtype=torch.long, device=device)
    start = 0
    for index, length in enumerate(block_lengths):
        block_id[start : start + length] = index
        start += length
    block_id[start:] = -1  # the final block
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    same_block = block_id[:, None] == block_id[None, :]
    is_final = (block_id == -1)[:, None]
    if shared_prefix:
        same_block = same_block | (block_id == 0)[None, :]
    return causal & (same_block | is_final)


def block_position_ids(block_lengths: Sequence[int], final_length: int, *, reencode: bool = True,
                       device=None) -> Tensor:
    """(N,) positions: contiguous 0..N-1, or (reencode=False) each context block restarting at 0.

    Without re-encoding the final block still starts at sum(block_lengths), as the engine does.
    """
    context = sum(block_lengths)
    if reencode:
        return torch.arange(context + final_length, device=device)
    parts = [torch.arange(n, device=device) for n in block_lengths]
    parts.append(torch.arange(context, context + final_length, device=device))
    return torch.cat(parts)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean mask -> additive float mask (0 where allowed, dtype min where not), for eager attention."""
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~mask, torch.finfo(dtype).min)
