"""GQA-native attention for prefilling a final block over a long cached context.

The final block's q queries see every context key and, causally, the final block's own keys. Plain
HF SDPA with a mask materialises GQA heads (``repeat_kv``) and, with a mask, cannot use flash kernels.
Here the two parts are computed separately and merged by log-sum-exp:

* context: no mask at all, so the G query heads of each KV group are folded into rows
  (``(B, Hkv, G*q, D)`` against ``(B, Hkv, Nctx, D)``) - no repeat_kv, flash kernels apply. On CUDA the
  context is also split into chunks laid along the batch dimension (flash-decoding style), so a few
  hundred query rows still fill the GPU;
* final block: a small causal attention over q keys.

On the CPU the context can also be read where the cached blocks are (``BlockContext``): no assembled copy, no
rotation of cached keys; the query is rotated back by each block's offset instead, and the blocks' partial
results are merged like the chunks above.

Registered with transformers as attention implementation ``"blockrag"``; the engine switches a model to it
only for the duration of its own calls (batch 1, no padding, where the mask is bottom-right causal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from blockrag.hf import register_attention, sdpa_attention
from blockrag.rope import rotate_half_into

ATTENTION_NAME = "blockrag"


def _attend(query: Tensor, key: Tensor, value: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """(out, lse) of softmax attention. query (B, H, Lq, D); key/value (B, H, Lk, D); lse (B, H, Lq) float32."""
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False, scale=scale)
        return out[0], out[1]
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal,
                                                                             scale=scale)
        return out, lse
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if causal:
        lq, lk = scores.shape[-2:]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril(lk - lq)
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp() @ value.float()).to(query.dtype), lse


def merge_partials(outs: Tensor, lses: Tensor) -> Tensor:
    """Combine attention over disjoint key sets.

    Args:
        outs: (P, ..., Lq, D) partial outputs, each normalised over its own keys.
        lses: (P, ..., Lq) float32 log-sum-exp of each part's scores.

    Returns:
        (..., Lq, D) in the dtype of outs.
    """
    # NOTE: max/exp/sum by hand: a handful of kernels, where torch.logsumexp launches many more.
    weights = (lses - lses.amax(0)).exp()
    out = (weights[..., None] * outs.float()).sum(0) / weights.sum(0)[..., None]
    return out.to(outs.dtype)


def _context_chunks(length: int, device: torch.device, target: int = 4096) -> int:
    """How many equal chunks to split the context into (1 on CPU or for short contexts)."""
    if device.type != "cuda" or length < 2 * target:
        return 1
    return length // target


def _attend_context(query: Tensor, key: Tensor, value: Tensor, scale: float) -> tuple[list[Tensor], list[Tensor]]:
    """Unmasked attention over the context, split along keys into chunks laid on the batch dimension.

    query (1, H, Lq, D); key/value (1, H, N, D) with unit stride in D.
    Returns partial outputs (P_i, H, Lq, D) and their lse (P_i, H, Lq), to be merged.
    """
    _, heads, rows, dim = query.shape
    n = key.shape[2]
    chunks = _context_chunks(n, query.device)
    if chunks == 1:
        out, lse = _attend(query, key, value, scale, causal=False)
        return [out], [lse]
    size = n // chunks
    main = chunks * size
    # (1, H, chunks*size, D) -> (chunks, H, size, D) as a strided view: no copy of the context.
    k = key[0, :, :main].unflatten(1, (chunks, size)).transpose(0, 1)
    v = value[0, :, :main].unflatten(1, (chunks, size)).transpose(0, 1)
    out, lse = _attend(query.expand(chunks, heads, rows, dim), k, v, scale, causal=False)
    outs, lses = [out], [lse]
    if main < n:
        rest_out, rest_lse = _attend(query, key[:, :, main:], value[:, :, main:], scale, causal=False)
        outs.append(rest_out)
        lses.append(rest_lse)
    return outs, lses


def _split_kv_kernel_applies(query: Tensor, key: Tensor) -> bool:
    """The Triton split-KV kernel (``blockrag.kernels``) takes 16-bit CUDA tensors with a power-of-two head dim."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or key.stride(-1) != 1:
        return False
    dim = query.shape[-1]
    if dim < 16 or dim & (dim - 1):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def final_block_attention(query: Tensor, key: Tensor, value: Tensor, scale: float, kernel: bool = True) -> Tensor:
    """Bottom-right causal attention with grouped KV: query i sees keys 0 .. N - q + i.

    Args:
        query: (1, Hq, q, D).
        key, value: (1, Hkv, N, D), N >= q, Hq a multiple of Hkv; the last q keys belong to the queries.
        scale: softmax scale.
        kernel: use the Triton split-KV kernel where it applies (16-bit CUDA, power-of-two head dim).

    Returns:
        (1, Hq, q, D).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    context = n - q_len
    if q_len == 1 or context == 0:
        return F.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1, scale=scale, enable_gqa=True)
    if kernel and _split_kv_kernel_applies(query, key):
        from blockrag.kernels import final_block_attention as split_kv
        from blockrag.kernels import split_meta

        meta = torch.tensor(split_meta(context, q_len, 16), dtype=torch.int32).to(query.device, non_blocking=True)
        return split_kv(query, key, value, scale, meta, 16).transpose(1, 2)
    folded = query.reshape(batch, kv_heads, groups * q_len, dim)  # heads of one KV group become rows
    outs, lses = _attend_context(folded, key[:, :, :context], value[:, :, :context], scale)
    outs = [o.reshape(-1, q_heads, q_len, dim) for o in outs]
    lses = [lse.reshape(-1, q_heads, q_len) for lse in lses]
    tail_k = key[:, :, context:].repeat_interleave(groups, dim=1)
    tail_v = value[:, :, context:].repeat_interleave(groups, dim=1)
    tail_out, tail_lse = _attend(query, tail_k, tail_v, scale, causal=True)
    return merge_partials(torch.cat([*outs, tail_out]), torch.cat([*lses, tail_lse]))[None]


# --- context read in place: cached blocks at their own positions, the query rotated per block --------


@dataclass(frozen=True)
class BlockContext:
    """The cached blocks a final block attends to, read where they are stored (never written).

    RoPE scores depend only on the rotation between a query and a key: q . R(delta) k = (R(-delta) q) . k.
    So block i keeps its keys at positions 0..T_i-1 and each layer rotates its (Hq, q, D) query by -delta_i,
    instead of rotating (Hkv, T_i, D) keys into a new buffer.

    Attributes:
        keys, values: per block, (L, H, T_i, D) keys (after RoPE at 0..T_i-1) and values.
        cos, sin: (P, R/2) float32 cos and sin of -delta_i * inv_freq, one row per block.
        layers_read: the layers whose attention read the blocks (filled by ``attention_forward``); a model
            whose decoder layers drop keyword arguments never gets there, see ``read_by_every_layer``.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    cos: Tensor
    sin: Tensor
    layers_read: set[int] = field(default_factory=set)

    def read_by_every_layer(self) -> bool:
        return len(self.layers_read) == self.keys[0].shape[0]


def rotate_queries(query: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """One copy of the query per block, each rotated by that block's angles (rotate-half layout).

    Args:
        query: (1, Hq, q, D) queries after RoPE at their positions.
        cos, sin: (P, R/2) float32, R <= D rotary dims; dims R..D pass through.

    Returns:
        (P, Hq, q, D) in the query's dtype.
    """
    q = query[0].float()
    # NOTE: written in place into one output: these small tensors are touched between attention calls that
    # stream the context through the caches, so every temporary costs more than its size suggests.
    out = q.new_empty(cos.shape[0], *q.shape)
    rotate_half_into(out, q, cos[:, None, None, :].to(q.device), sin[:, None, None, :].to(q.device))
    return out.to(query.dtype)


def block_context_attention(query: Tensor, key: Tensor, value: Tensor, scale: float, context: BlockContext,
                            layer: int) -> Tensor:
    """Attention of a final block over blocks read in place, then causally over its own keys.

    Args:
        query: (1, Hq, q, D).
        key, value: (1, Hkv, N, D); only the last q slots are read (the final block's own keys).
        context: the blocks (``layer`` of each is read).

    Returns:
        (1, Hq, q, D).
    """
    _, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    rotated = rotate_queries(query, context.cos, context.sin)
    folded = rotated.reshape(-1, kv_heads, groups * q_len, dim)  # heads of one KV group become rows
    outs, lses = [], []
    for i, (keys, values) in enumerate(zip(context.keys, context.values)):
        out, lse = _attend(folded[i : i + 1], keys[layer][None], values[layer][None], scale, causal=False)
        outs.append(out.reshape(1, q_heads, q_len, dim))
        lses.append(lse.reshape(1, q_heads, q_len))
    tail_k = key[:, :, -q_len:].repeat_interleave(groups, dim=1)
    tail_v = value[:, :, -q_len:].repeat_interleave(groups, dim=1)
    tail_out, tail_lse = _attend(query, tail_k, tail_v, scale, causal=True)
    return merge_partials(torch.cat([*outs, tail_out]), torch.cat([*lses, tail_lse]))[None]


# --- inside a captured CUDA graph (blockrag.graphs): lengths come from device tensors ---------------


@dataclass
class GraphState:
    """Device tensors that carry one request's lengths into a captured graph (same objects every replay)."""

    chunk: int
    seqused: Tensor  # (S,) int32 keys used in each context chunk
    valid: Tensor  # (S,) bool, chunk holds at least one key
    cu_q: Tensor  # (S+1,) int32 query offsets of each chunk (rows of folded queries)
    cu_k: Tensor  # (S+1,) int32 key offsets of each chunk in the buffer
    tail: Tensor  # (q,) int64 cache slots of the final block: n .. n+q-1
    meta: Tensor | None = None  # (4,) int32 ``kernels.split_meta``: set for the split-KV Triton kernel
    max_splits: int = 0
    table: object = None  # ``kernels.SegmentTable``: the split-KV kernel reads the keys where the table says
    anchor: Tensor | None = None  # with a table: the tensor its segments are addressed from


def graph_attention(query: Tensor, key: Tensor, value: Tensor, scale: float, state: GraphState,
                    layer: int = 0) -> Tensor:
    """Bottom-right causal attention of a final block over a static buffer, lengths from ``state``.

    Args:
        query: (1, Hq, q, D).
        key, value: (1, Hkv, cap, D) static buffers; context in slots 0..n-1, the final block at ``state.tail``
            (with ``state.table``: the final block only; the table says where the context is read, for ``layer``).

    Returns:
        (1, Hq, q, D).
    """
    if state.table is not None:
        from blockrag.kernels import table_attention

        return table_attention(query, state.table, layer, scale, key.shape[1], state.anchor).transpose(1, 2)
    if state.meta is not None:  # one split-KV kernel + one merge, context and final block together
        from blockrag.kernels import final_block_attention as split_kv_attention

        return split_kv_attention(query, key, value, scale, state.meta, state.max_splits).transpose(1, 2)
    _, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    rows = groups * q_len
    chunks = state.seqused.numel()
    folded = query.reshape(kv_heads, rows, dim).transpose(0, 1)  # (rows, Hkv, D): a group's heads as rows
    packed = folded.unsqueeze(0).expand(chunks, rows, kv_heads, dim).reshape(chunks * rows, kv_heads, dim)
    out, lse = torch.ops.aten._flash_attention_forward(
        packed, key[0].transpose(0, 1), value[0].transpose(0, 1), state.cu_q, state.cu_k, rows, state.chunk,
        0.0, False, False, scale=scale, seqused_k=state.seqused)[:2]
    out = out.view(chunks, rows, kv_heads, dim).permute(0, 2, 1, 3).reshape(chunks, q_heads, q_len, dim)
    lse = lse.view(kv_heads, chunks, rows).transpose(0, 1).reshape(chunks, q_heads, q_len)
    lse = lse.masked_fill(~state.valid[:, None, None], float("-inf"))  # flash reports +inf for empty rows
    tail_k = key.index_select(2, state.tail).repeat_interleave(groups, dim=1)
    tail_v = value.index_select(2, state.tail).repeat_interleave(groups, dim=1)
    tail_out, tail_lse = _attend(query, tail_k, tail_v, scale, causal=True)
    return merge_partials(torch.cat([out, tail_out]), torch.cat([lse, tail_lse]))[None]



def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """transformers attention-interface entry point. Returns ((B, q, Hq, D), None)."""
    graph_state = kwargs.get("blockrag_graph")
    if graph_state is not None:  # inside a captured final-block forward (blockrag.graphs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = graph_attention(query, key, value, scale, graph_state, module.layer_idx)
        return out.transpose(1, 2).contiguous(), None
    context = kwargs.get("blockrag_blocks")
    if context is not None:  # a final block over cached blocks read in place (blockrag.assemble.context_cache)
        assert query.shape[0] == 1 and not dropout, "a block context serves one sequence, without dropout"
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = block_context_attention(query, key, value, scale, context, module.layer_idx)
        context.layers_read.add(module.layer_idx)
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1 or dropout or key.shape[-1] != value.shape[-1]:
        return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = final_block_attention(query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


def register() -> str:
    """Register the attention implementation with transformers (idempotent); returns its name."""
    return register_attention(ATTENTION_NAME, attention_forward, _no_mask)
