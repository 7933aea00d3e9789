"""Triton kernels for the GPU fast path. Imported lazily: ``import blockrag`` never needs triton.

``gather_rotate``: copy many KVBlocks into one preallocated (L, H, cap, D) buffer pair, rotating each
block's keys by its offset on the way (fp32 math, stored dtype out; fp8 sources are dequantised with their
per-(layer, head) scales): one pass over the bytes. Blocks are addressed through a table of data
pointers, so one launch covers any number of blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gather_rotate_kernel(
    src_k_ptrs, src_v_ptrs, k_scale_ptrs, v_scale_ptrs, lengths, offsets, cos_tab, sin_tab,  # per block
    dst_k, dst_v,
    LH, cap, scale_base,  # dst is (LH, cap, D); scale index of dst row lh is scale_base + lh
    D: tl.constexpr, D_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
    REST: tl.constexpr, REST_P2: tl.constexpr, FP8: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    lh = tl.program_id(1).to(tl.int64)  # int64 offsets: L*H*cap*D may exceed 2**31
    tile = tl.program_id(2)
    length = tl.load(lengths + b)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    if tile * BLOCK_T >= length:
        return
    out_ty = dst_k.dtype.element_ty
    if FP8:  # e4m3 source with one float32 scale per (layer, head)
        src_k = tl.load(src_k_ptrs + b).to(tl.pointer_type(tl.float8e4nv))
        src_v = tl.load(src_v_ptrs + b).to(tl.pointer_type(tl.float8e4nv))
        k_scale = tl.load(tl.load(k_scale_ptrs + b).to(tl.pointer_type(tl.float32)) + scale_base + lh)
        v_scale = tl.load(tl.load(v_scale_ptrs + b).to(tl.pointer_type(tl.float32)) + scale_base + lh)
    else:
        src_k = tl.load(src_k_ptrs + b).to(tl.pointer_type(out_ty))
        src_v = tl.load(src_v_ptrs + b).to(tl.pointer_type(out_ty))
        k_scale = 1.0
        v_scale = 1.0
    offset = tl.load(offsets + b)
    rows = t < length
    d = tl.arange(0, HALF_P2)
    dmask = d < HALF
    c = tl.load(cos_tab + b * HALF + d, mask=dmask, other=1.0)[None, :]
    s = tl.load(sin_tab + b * HALF + d, mask=dmask, other=0.0)[None, :]
    dst_row = (lh * cap + offset + t)[:, None] * D
    src_row = (lh * length + t)[:, None] * D
    m = rows[:, None] & dmask[None, :]
    x1 = tl.load(src_k + src_row + d[None, :], mask=m, other=0.0).to(tl.float32) * k_scale
    x2 = tl.load(src_k + src_row + HALF + d[None, :], mask=m, other=0.0).to(tl.float32) * k_scale
    tl.store(dst_k + dst_row + d[None, :], (x1 * c - x2 * s).to(out_ty), mask=m)
    tl.store(dst_k + dst_row + HALF + d[None, :], (x2 * c + x1 * s).to(out_ty), mask=m)
    if REST > 0:  # partial rotary: dims 2*HALF..D pass through
        r = tl.arange(0, REST_P2)
        mr = rows[:, None] & (r < REST)[None, :]
        x = tl.load(src_k + src_row + 2 * HALF + r[None, :], mask=mr).to(tl.float32) * k_scale
        tl.store(dst_k + dst_row + 2 * HALF + r[None, :], x.to(out_ty), mask=mr)
    dv = tl.arange(0, D_P2)
    mv = rows[:, None] & (dv < D)[None, :]
    x = tl.load(src_v + src_row + dv[None, :], mask=mv).to(tl.float32) * v_scale
    tl.store(dst_v + dst_row + dv[None, :], x.to(out_ty), mask=mv)


class BlockTable(NamedTuple):
    """Per-block facts for a gather, on the device: built once per request, shared by every layer."""

    lengths: Tensor  # (nb,) int64
    offsets: Tensor  # (nb,) int64, start token in the destination
    cos: Tensor  # (nb, R/2) float32, cos(delta_b * inv_freq)
    sin: Tensor  # (nb, R/2) float32
    longest: int


def _upload(values, dtype, device) -> Tensor:
    # NOTE: a plain small copy; pinning a fresh host buffer per request costs more than the copy.
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def block_table(lengths: Sequence[int], offsets: Sequence[int], deltas: Sequence[int], inv_freq: Tensor,
                device) -> BlockTable:
    angles = torch.tensor(list(deltas), dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    return BlockTable(_upload(list(lengths), torch.int64, device), _upload(list(offsets), torch.int64, device),
                      angles.cos().float().to(device), angles.sin().float().to(device), max(lengths))


def pointers(tensors: Sequence[Sequence[Tensor]], device) -> Tensor:
    """(rows, nb) int64 table of data pointers: pointers([[t00, t01], [t10, t11]])."""
    return _upload([[t.data_ptr() for t in row] for row in tensors], torch.int64, device)


class GatherPlan(NamedTuple):
    """Everything one gather launch reads, on the device. ``keep`` holds tensors the pointers address."""

    table: BlockTable
    k_ptrs: Tensor  # (rows, nb): rows = 1 (sources hold all layers) or L (one source per layer)
    v_ptrs: Tensor
    scale_ptrs: Tensor | None  # (2, nb) pointers to (L, H) float32 key / value scales (fp8 sources)
    keep: tuple


def gather_rotate(plan: GatherPlan, row: int, dst_k: Tensor, dst_v: Tensor, scale_base: int = 0) -> None:
    """Copy blocks into dst at their offsets, rotating keys by each block's delta (fp32 math).

    Args:
        plan: the blocks' sources (row ``row`` of its pointer tables), lengths, offsets and rotations.
            Sources are (L', H, T_b, D) contiguous tensors of dst's dtype, or fp8 with scales.
        dst_k, dst_v: (L', H, cap, D) contiguous buffers (L' may be 1: one layer).
        scale_base: index of dst's first (layer, head) in the (L, H) scales (layer * H for one layer).
    """
    layers_heads, cap, dim = dst_k.shape[0] * dst_k.shape[1], dst_k.shape[2], dst_k.shape[3]
    table = plan.table
    half = table.cos.shape[1]
    block_t = 32
    grid = (table.lengths.numel(), layers_heads, triton.cdiv(table.longest, block_t))
    scales = plan.scale_ptrs if plan.scale_ptrs is not None else (plan.k_ptrs[row], plan.k_ptrs[row])
    _gather_rotate_kernel[grid](
        plan.k_ptrs[row], plan.v_ptrs[row], scales[0], scales[1], table.lengths, table.offsets, table.cos,
        table.sin, dst_k, dst_v, layers_heads, cap, scale_base,
        D=dim, D_P2=triton.next_power_of_2(dim), HALF=half, HALF_P2=triton.next_power_of_2(half),
        REST=dim - 2 * half, REST_P2=max(1, triton.next_power_of_2(max(1, dim - 2 * half))),
        FP8=plan.scale_ptrs is not None, BLOCK_T=block_t,
    )
