"""Triton kernels for the GPU fast path. Imported lazily: ``import blockrag`` never needs triton.

``gather_rotate``: copy many KVBlocks into one preallocated (L, H, cap, D) buffer pair, rotating each
block's keys by its offset on the way (fp32 math, stored dtype out; fp8 sources are dequantised with their
per-(layer, head) scales): one pass over the bytes. Blocks are addressed through a table of element offsets
from one base tensor (the first block's), so one launch covers any number of blocks.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gather_rotate_kernel(
    src_k, src_v,  # base tensors: block b's keys start src_k_offs[b] elements after src_k (values: src_v)
    src_k_offs, src_v_offs, k_scale_ptrs, v_scale_ptrs, lengths, offsets, cos_tab, sin_tab,  # per block
    dst_k, dst_v,
    LH, cap, scale_base,  # dst is (LH, cap, D); scale index of dst row lh is scale_base + lh
    D: tl.constexpr, D_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
    REST: tl.constexpr, REST_P2: tl.constexpr, FP8: tl.constexpr,
    BLOCK_T: tl.constexpr, ALIGN: tl.constexpr,
):
    b = tl.program_id(0)
    lh = tl.program_id(1).to(tl.int64)  # int64 offsets: L*H*cap*D may exceed 2**31
    tile = tl.program_id(2)
    length = tl.load(lengths + b)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    if tile * BLOCK_T >= length:
        return
    out_ty = dst_k.dtype.element_ty
    # NOTE: a base pointer plus an offset with an alignment hint: a pointer made from an address read from a table
    # carries no alignment, and every load became a 2-byte access (the gather ran at ~2.3 of the 2.9 TB/s a copy
    # reaches on an H100).
    src_k += tl.multiple_of(tl.load(src_k_offs + b), ALIGN)
    src_v += tl.multiple_of(tl.load(src_v_offs + b), ALIGN)
    if FP8:  # e4m3 source with one float32 scale per (layer, head)
        k_scale = tl.load(tl.load(k_scale_ptrs + b).to(tl.pointer_type(tl.float32)) + scale_base + lh)
        v_scale = tl.load(tl.load(v_scale_ptrs + b).to(tl.pointer_type(tl.float32)) + scale_base + lh)
    else:
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


def _rotations(angles_of: Sequence[int], inv_freq: Tensor, device) -> tuple[Tensor, Tensor]:
    """(cos, sin) of ``angles_of[i] * inv_freq`` as (n, R/2) float32 on ``device``, float64 math there.

    NOTE: computed where the table is used: on a GPU host, the same cos and sin on the CPU took 0.3-3 ms a request
    at 64 blocks, while the GPU sat idle waiting for them.
    """
    angles = _upload(list(angles_of), torch.float64, device)[:, None] * inv_freq.to(device, torch.float64)[None, :]
    return angles.cos().float(), angles.sin().float()


def block_table(lengths: Sequence[int], offsets: Sequence[int], deltas: Sequence[int], inv_freq: Tensor,
                device) -> BlockTable:
    cos, sin = _rotations(deltas, inv_freq, device)
    return BlockTable(_upload(list(lengths), torch.int64, device), _upload(list(offsets), torch.int64, device),
                      cos, sin, max(lengths))


def upload_rows(rows: Sequence[Sequence[int]], device) -> Tensor:
    """(rows, n) int64 table of computed addresses on ``device`` (e.g. rows of fp8 scales)."""
    return _upload(rows, torch.int64, device)


def element_offsets(tensors: Sequence[Tensor], base: Tensor, device, per_layer: bool = False) -> tuple[Tensor, int]:
    """((rows, nb) int64 table, alignment): each tensor's first element as an offset in elements from ``base``'s,
    and the largest power of two (up to 16 bytes' worth of elements) dividing every offset and ``base``'s address.

    per_layer: L rows, row l for ``tensors[b][l]`` (computed from each tensor's address and first stride, without
    making L x nb views: ~1 us each, 4,000 of them for 32 layers of 63 blocks, keys and values, cost milliseconds
    a request); else one row.
    """
    size, origin = base.element_size(), base.data_ptr()
    if any(t.dtype != base.dtype for t in tensors):
        raise ValueError(f"expected sources of one dtype, found {sorted({str(t.dtype) for t in tensors})}")
    first = [(t.data_ptr() - origin, t.stride(0) * size) for t in tensors]
    rows = [[address for address, _ in first]]
    if per_layer:
        rows = [[address + layer * step for address, step in first] for layer in range(tensors[0].shape[0])]
    align = 16 // size
    while align > 1 and (origin % (align * size) or any(a % (align * size) for row in rows for a in row)):
        align //= 2
    return _upload([[a // size for a in row] for row in rows], torch.int64, device), max(align, 1)


class GatherPlan(NamedTuple):
    """Everything one gather launch reads, on the device. ``keep`` holds tensors the pointers address."""

    table: BlockTable
    k_base: Tensor  # the sources' keys are addressed from here (a source's dtype)
    v_base: Tensor
    k_offs: Tensor  # (rows, nb) element offsets from the base: rows = 1 (sources hold all layers) or L (per layer)
    v_offs: Tensor
    align: int  # elements every offset (and base address) is a multiple of (an alignment hint for the kernel)
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
    scales = plan.scale_ptrs if plan.scale_ptrs is not None else (plan.k_offs[row], plan.k_offs[row])
    _gather_rotate_kernel[grid](
        plan.k_base, plan.v_base, plan.k_offs[row], plan.v_offs[row], scales[0], scales[1], table.lengths,
        table.offsets, table.cos, table.sin, dst_k, dst_v, layers_heads, cap, scale_base,
        D=dim, D_P2=triton.next_power_of_2(dim), HALF=half, HALF_P2=triton.next_power_of_2(half),
        REST=dim - 2 * half, REST_P2=max(1, triton.next_power_of_2(max(1, dim - 2 * half))),
        FP8=plan.scale_ptrs is not None, BLOCK_T=block_t, ALIGN=plan.align,
    )


# --- split-KV attention of a final block over a long context (flash-decoding style) ------------------------
#
# The final block's q queries attend to n context keys (all of them) and, causally, to their own q keys:
# query token t sees context coordinates 0 .. n + t. The G query heads of one KV group are folded into rows
# (row = t * G + g), so one program's BLOCK_M rows share every KV tile it loads, and the programs that work on
# one KV split run side by side (row tiles vary fastest), so each tile comes from memory about once. The keys
# are cut into splits (lengths read from device tensors, so one launch shape serves any context inside a CUDA
# graph); each split writes a normalised partial output and its log2-sum-exp, and a second kernel merges the
# splits and writes the result in the (q, Hq, D) layout the model expects. Rows of padding tokens
# (t >= q_real) are skipped and come out as zeros: no real token sees them.
#
# Where the keys are read from:
# * the buffer (``final_block_attention``): the context gathered into slots 0..n-1 (keys already rotated to
#   their positions), the final block in slots n..n+q-1;
# * a segment table (``table_attention``): each segment is a tensor read in place, for example a stored
#   block (L, H, T, D) whose keys sit at positions 0..T-1. Segment s covers context coordinates
#   start_s .. start_s + len_s - 1 and its keys are delta_s positions behind them; rotary attention depends
#   only on q-position minus k-position, so instead of rotating every key forward by delta_s, the query is
#   rotated back by delta_s once per segment (rotate-half layout: dims [0, R/2) pair with [R/2, R); dims past
#   R are not rotated). The final block is the last segment (in the buffer, delta 0). Nothing is copied.

LOG2E = 1.4426950408889634


@triton.jit
def _read_meta(meta_ptr):
    # NOTE: one vector load and reductions: scalars stay 0-d under the CPU interpreter (TRITON_INTERPRET=1).
    i = tl.arange(0, 4)
    meta = tl.load(meta_ptr + i)
    return (tl.sum(tl.where(i == 0, meta, 0)), tl.sum(tl.where(i == 1, meta, 0)), tl.sum(tl.where(i == 2, meta, 0)),
            tl.sum(tl.where(i == 3, meta, 0)))


@triton.jit
def _split_kv_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, start, stop, hi, limit, qk_scale,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over key tiles start..stop (keys at or past ``hi``, or past a row's ``limit``, masked)."""
    d = tl.arange(0, D)
    for first in range(start, stop, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        if MASKED:
            inside = cols < hi
            kt = tl.load(k_base + cols[None, :] * stride_kt + d[:, None], mask=inside[None, :], other=0.0)
        else:
            kt = tl.load(k_base + cols[None, :] * stride_kt + d[:, None])
        scores = tl.dot(q, kt) * qk_scale
        if MASKED:
            keep = inside[None, :] & (cols[None, :] <= limit[:, None])
            scores = tl.where(keep, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.math.exp2(scores - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_base + cols[:, None] * stride_vt + d[None, :], mask=inside[:, None], other=0.0)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vt + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _split_kv_kernel(
    q_ptr, k_ptr, v_ptr, meta_ptr, part_o, part_lse,
    seg_k, seg_v, seg_layer_stride, seg_head_stride, seg_start, seg_len, seg_cos, seg_sin, items, layer,
    stride_qh, stride_qt, stride_qd, stride_kh, stride_kt, stride_vh, stride_vt,
    rows_total, kv_heads, qk_scale,
    G: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, TABLE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    h = tl.program_id(2)
    n, q_real, chunk, splits = _read_meta(meta_ptr)  # TABLE: chunk is unused, splits = items in use
    total = n + q_real  # the last real token sees keys up to n + q_real - 1
    real_rows = G * q_real
    if split >= splits or tile * BLOCK_M >= real_rows:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    head = h * G + rows % G
    row_ok = rows < rows_total
    q_rows = q_ptr + head[:, None].to(tl.int64) * stride_qh + t[:, None] * stride_qt
    limit = n + t
    d = tl.arange(0, D)
    # NOTE: a finite start for the running max: a row may see no key at all in a split of the final block.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if TABLE:
        lo = tl.load(items + 4 * split)
        hi = tl.load(items + 4 * split + 1)
        # rotate-half: dim i < R/2 pairs with i + R/2 (minus sine), R/2 <= i < R with i - R/2; dims past R stay
        rotary = d < 2 * HALF
        partner = tl.where(d < HALF, d + HALF, tl.where(rotary, d - HALF, d))
        freq = tl.where(d < HALF, d, d - HALF)
        sign = tl.where(d < HALF, -1.0, 1.0)
        for seg in range(tl.load(items + 4 * split + 2), tl.load(items + 4 * split + 3)):
            start = tl.load(seg_start + seg)
            a = tl.maximum(lo, start)
            b = tl.minimum(hi, start + tl.load(seg_len + seg))
            c = tl.load(seg_cos + seg * HALF + freq, mask=rotary, other=1.0)
            s = tl.load(seg_sin + seg * HALF + freq, mask=rotary, other=0.0) * sign
            # NOTE: the query is reloaded (from cache) per segment rather than kept in float32 registers
            x = tl.load(q_rows + d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0).to(tl.float32)
            y = tl.load(q_rows + partner[None, :] * stride_qd, mask=row_ok[:, None], other=0.0).to(tl.float32)
            q = (x * c[None, :] + y * s[None, :]).to(q_ptr.dtype.element_ty)
            # NOTE: segments are addressed as element offsets from the anchor (k_ptr, a kernel argument), with
            # alignment hints (checked by fill_segment_table): a pointer made from an integer read from the table
            # keeps Triton from pipelining the key and value loads (no asynchronous copies), and without the
            # hints every load is split into 2-byte accesses.
            offset = layer * tl.load(seg_layer_stride + seg) + h * tl.load(seg_head_stride + seg) - start * D
            k_base = k_ptr + tl.multiple_of(tl.load(seg_k + seg) + offset, ALIGN)
            v_base = v_ptr + tl.multiple_of(tl.load(seg_v + seg) + offset, ALIGN)
            # Whole tiles of context keys need no mask; the rest (segment remainder, final block) is masked.
            full_end = a + tl.maximum(tl.minimum(b, n) - a, 0) // BLOCK_N * BLOCK_N
            acc, m_i, l_i = _split_kv_tiles(acc, m_i, l_i, q, k_base, v_base, D, D, a, full_end, b, limit, qk_scale,
                                            D=D, BLOCK_N=BLOCK_N, MASKED=False)
            acc, m_i, l_i = _split_kv_tiles(acc, m_i, l_i, q, k_base, v_base, D, D, full_end, b, b, limit, qk_scale,
                                            D=D, BLOCK_N=BLOCK_N, MASKED=True)
    else:
        lo = split * chunk
        hi = tl.minimum(lo + chunk, total)
        q = tl.load(q_rows + d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        k_base = k_ptr + h.to(tl.int64) * stride_kh
        v_base = v_ptr + h.to(tl.int64) * stride_vh
        full_end = lo + tl.maximum(tl.minimum(hi, n) - lo, 0) // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _split_kv_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, lo, full_end, hi,
                                        limit, qk_scale, D=D, BLOCK_N=BLOCK_N, MASKED=False)
        acc, m_i, l_i = _split_kv_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, full_end, hi, hi,
                                        limit, qk_scale, D=D, BLOCK_N=BLOCK_N, MASKED=True)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    base = (split * kv_heads + h).to(tl.int64) * rows_total
    tl.store(part_o + (base + rows[:, None]) * D + d[None, :], out, mask=row_ok[:, None])
    tl.store(part_lse + base + rows, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_o, part_lse, out_ptr, meta_ptr, stride_ot, stride_oh, rows_total, kv_heads,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    n, q_real, chunk, active = _read_meta(meta_ptr)  # every split below ``active`` wrote its rows
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rows_total
    real = rows < G * q_real
    d = tl.arange(0, D)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(0, active):
        base = (split * kv_heads + h).to(tl.int64) * rows_total
        m = tl.maximum(m, tl.load(part_lse + base + rows, mask=real, other=float("-inf")))
    m = tl.where(real, m, 0.0)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    weight = tl.zeros([BLOCK_M], dtype=tl.float32)
    for split in range(0, active):
        base = (split * kv_heads + h).to(tl.int64) * rows_total
        w = tl.math.exp2(tl.load(part_lse + base + rows, mask=real, other=float("-inf")) - m)
        o = tl.load(part_o + (base + rows[:, None]) * D + d[None, :], mask=real[:, None], other=0.0)
        acc += w[:, None] * o
        weight += w
    out = tl.where(real[:, None], acc / tl.where(real, weight, 1.0)[:, None], 0.0)
    t = rows // G
    head = h * G + rows % G
    tl.store(out_ptr + t[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


class SplitConfig(NamedTuple):
    """Launch shape of ``final_block_attention``: row and key tiles, warps and pipeline stages of the split
    kernel, and the merge kernel's row tile."""

    block_m: int = 128
    block_n: int = 64
    warps: int = 8
    stages: int = 3
    merge_block_m: int = 32


SPLIT_CONFIG = SplitConfig()
# NOTE: the table kernel carries its running output across segments, around the rotation of the query: with
# 128-row tiles it spills registers (sm90: 255 registers, 62-360 bytes of stack). On an H100 at 32K context the
# launch-shape sweep (benchmarks/profile_ttft.py) measured 64-row tiles with 4 warps fastest: 204 us a layer
# (8 warps: 282 us; 128-row tiles: 219 us; the buffer kernel: 142-148 us).
TABLE_CONFIG = SplitConfig(block_m=64, warps=4)


def split_meta(context: int, q_real: int, max_splits: int, min_chunk: int = 256, block_n: int = 128) -> list[int]:
    """[n, q_real, chunk, splits] for ``final_block_attention``: the keys 0..n+q_real-1 cut into equal chunks.

    ``splits`` is at most ``max_splits`` (the launch's grid) and each chunk at least ``min_chunk`` keys, a
    multiple of ``block_n`` (of every key tile the kernel is launched with, so whole tiles need no mask), so
    short contexts use few splits and long ones the whole grid.
    """
    total = context + q_real
    splits = max(1, min(max_splits, -(-total // min_chunk)))
    chunk = -(-total // splits)
    chunk = -(-chunk // block_n) * block_n
    return [context, q_real, chunk, -(-total // chunk)]


class SegmentTable(NamedTuple):
    """Device tensors of ``table_attention`` (fixed capacity, so a CUDA graph can read any request's table).

    Rows 0..count-1 describe segments, in context order.
    """

    k: Tensor  # (S,) int64 elements from the anchor's first element to layer 0, head 0, the segment's first token
    v: Tensor  # (S,) int64 (from the same anchor)
    layer_stride: Tensor  # (S,) int64 elements from one layer to the next
    head_stride: Tensor  # (S,) int64 elements from one KV head to the next
    start: Tensor  # (S,) int64 context coordinate of the segment's first token
    length: Tensor  # (S,) int64
    cos: Tensor  # (S, R/2) float32 cos(-delta * inv_freq)
    sin: Tensor  # (S, R/2) float32
    items: Tensor  # (I, 4) int32 per split: first key, end, first segment, segment after the last
    meta: Tensor  # (4,) int32: n, q_real, segments, splits in use


def table_supported(dim: int, rotary_half: int) -> bool:
    """Whether ``table_attention`` takes this head dim and rotary half-width (as ``final_block_attention``: a
    power-of-two head dim of at least 16; any rotary width up to it)."""
    return dim >= 16 and not dim & (dim - 1) and 0 < 2 * rotary_half <= dim


def empty_segment_table(segments: int, items: int, rotary_half: int, device, pin: bool = False) -> SegmentTable:
    """A table with room for ``segments`` segments and ``items`` splits (on the host with ``pin``: a mirror)."""
    def make(shape, dtype):
        return torch.zeros(shape, dtype=dtype, device=None if pin else device, pin_memory=pin)
    longs = [make(segments, torch.int64) for _ in range(6)]
    return SegmentTable(*longs, make((segments, rotary_half), torch.float32),
                        make((segments, rotary_half), torch.float32), make((items, 4), torch.int32),
                        make(4, torch.int32))


class Segment(NamedTuple):
    """One span of keys and values read in place by ``table_attention``: for layer l, KV head h and token i,
    the key is at ``keys.data_ptr() + (offset + l * layer_stride + h * head_stride + i * D) * itemsize``."""

    keys: Tensor
    values: Tensor
    offset: int  # elements from the tensors' start to layer 0, head 0, the first token
    layer_stride: int
    head_stride: int
    length: int
    delta: int  # positions the stored keys sit behind their context coordinates


def fill_segment_table(table: SegmentTable, segments: Sequence[Segment], q_real: int, inv_freq: Tensor,
                       max_splits: int, anchor: Tensor, min_chunk: int = 256, block_n: int = 128,
                       rotation: SegmentTable | None = None) -> None:
    """Write one request into ``table`` (device or pinned host tensors) for ``table_attention``.

    The last segment must be the final block (q_real keys, delta 0); the context is every segment before it.
    Segments are addressed relative to ``anchor``, a tensor of their dtype that ``table_attention`` is given too
    (for a CUDA graph: one that lives at a fixed address, like the graph's own buffer).
    Splits cut the keys into equal chunks (at least ``min_chunk`` keys, multiples of ``block_n``).
    ``rotation``: the table whose cos and sin rows get the segments' rotations (default ``table``), e.g. the device
    table when ``table`` is its pinned host mirror: they are computed where they land (see ``block_table``).
    """
    count = len(segments)
    if count > table.start.numel():
        raise ValueError(f"expected at most {table.start.numel()} segments, found {count}")
    starts, total = [], 0
    for seg in segments:
        starts.append(total)
        total += seg.length
    n = total - q_real
    size = anchor.element_size()
    if any(t.dtype != anchor.dtype for seg in segments for t in (seg.keys, seg.values)):
        raise ValueError(f"expected segments of the anchor's dtype {anchor.dtype}")
    keys = [seg.keys.data_ptr() + seg.offset * size for seg in segments]
    values = [seg.values.data_ptr() + seg.offset * size for seg in segments]
    strides = [x for seg in segments for x in (seg.layer_stride, seg.head_stride, seg.keys.shape[-1])]
    if any(a % 16 for a in [*keys, *values, anchor.data_ptr()]) or any(x % 16 for x in strides):
        raise ValueError("expected segment and anchor addresses on 16-byte boundaries and strides of 16 elements "
                         "(the kernel assumes both)")
    table.k[:count] = torch.tensor([(a - anchor.data_ptr()) // size for a in keys])
    table.v[:count] = torch.tensor([(a - anchor.data_ptr()) // size for a in values])
    table.layer_stride[:count] = torch.tensor([seg.layer_stride for seg in segments])
    table.head_stride[:count] = torch.tensor([seg.head_stride for seg in segments])
    table.start[:count] = torch.tensor(starts)
    table.length[:count] = torch.tensor([seg.length for seg in segments])
    rotation = table if rotation is None else rotation
    cos, sin = _rotations([-seg.delta for seg in segments], inv_freq, rotation.cos.device)
    rotation.cos[:count] = cos
    rotation.sin[:count] = sin
    chunk = split_meta(n, q_real, max_splits, min_chunk, block_n)[2]
    items = []
    for lo in range(0, total, chunk):
        hi = min(lo + chunk, total)
        items.append([lo, hi, bisect.bisect_right(starts, lo) - 1, bisect.bisect_left(starts, hi)])
    table.items[: len(items)] = torch.tensor(items, dtype=torch.int32)
    table.meta.copy_(torch.tensor([n, q_real, count, len(items)], dtype=torch.int32))


def table_attention(query: Tensor, table: SegmentTable, layer: int, scale: float, kv_heads: int, anchor: Tensor,
                    config: SplitConfig = TABLE_CONFIG) -> Tensor:
    """``final_block_attention`` with keys and values read in place from the segments of ``table`` (layer
    ``layer``), the query rotated back by each segment's delta instead of the keys forward.

    Args:
        query: (1, Hq, qb, D) 16-bit, any strides, rotated at the final block's positions n..n+qb-1.
        table: filled by ``fill_segment_table``; its segments hold keys and values of the query's dtype.
        kv_heads: KV heads of the segments.
        anchor: the tensor the table was filled relative to.

    Returns:
        (1, qb, Hq, D) contiguous, query dtype; padding tokens' rows are zero.
    """
    return _attention(query, anchor, anchor, scale, table.meta, table.items.shape[0], config, table, layer, kv_heads)


def final_block_attention(query: Tensor, key: Tensor, value: Tensor, scale: float, meta: Tensor,
                          max_splits: int, config: SplitConfig = SPLIT_CONFIG) -> Tensor:
    """Bottom-right causal grouped attention of a final block over a KV buffer, lengths from ``meta``.

    Args:
        query: (1, Hq, qb, D) 16-bit, any strides; tokens q_real.. of the qb are padding.
        key, value: (1, Hkv, cap, D) with unit stride in D; context keys in slots 0..n-1, the final block's own
            keys in slots n..n+qb-1 (cap >= n + qb).
        scale: softmax scale.
        meta: int32 device tensor ``split_meta(n, q_real, max_splits)``.
        max_splits: grid size along the keys (>= meta's splits).
        config: tile sizes, warps and stages (any choice gives the same result up to rounding).

    Returns:
        (1, qb, Hq, D) contiguous, query dtype; padding tokens' rows are zero.
    """
    return _attention(query, key, value, scale, meta, max_splits, config, None, 0, key.shape[1])


def _attention(query, key, value, scale, meta, max_splits, config, table, layer, kv_heads) -> Tensor:
    _, q_heads, qb, dim = query.shape
    groups = q_heads // kv_heads
    rows = groups * qb
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"head dim must be a power of two >= 16, found {dim}")
    part_o = torch.empty(max_splits, kv_heads, rows, dim, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(max_splits, kv_heads, rows, dtype=torch.float32, device=query.device)
    out = torch.empty(1, qb, q_heads, dim, dtype=query.dtype, device=query.device)
    tiles = triton.cdiv(rows, config.block_m)
    if table is None:  # the segment arguments are not read: any tensors of the right kind do
        key_strides = (key.stride(1), key.stride(2), value.stride(1), value.stride(2))
        segs = (meta,) * 8 + (meta,)
        half = dim // 2
    else:
        key_strides = (0, 0, 0, 0)  # key and value: the anchor, the segments' offsets count from it
        segs = tuple(table[:9])
        half = table.cos.shape[1]
        if not table_supported(dim, half):
            raise ValueError(f"expected a rotary width of at most the head dim, found {2 * half} > {dim}")
    _split_kv_kernel[(tiles, max_splits, kv_heads)](
        query, key, value, meta, part_o, part_lse, *segs, layer,
        query.stride(1), query.stride(2), query.stride(3), *key_strides, rows, kv_heads, scale * LOG2E,
        G=groups, D=dim, HALF=half, TABLE=table is not None, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, ALIGN=16 // key.element_size(), num_warps=config.warps, num_stages=config.stages,
    )
    _merge_splits_kernel[(triton.cdiv(rows, config.merge_block_m), kv_heads)](
        part_o, part_lse, out, meta, out.stride(1), out.stride(2), rows, kv_heads,
        G=groups, D=dim, BLOCK_M=config.merge_block_m, num_warps=4,
    )
    return out
