"""CUDA-graph replay of the final-block prefill.

Block mode leaves so little GPU work (one short forward over a cached context) that launching ~2,000
kernels from Python costs more than running them. Here the final-block forward is captured once per
final-length bucket and replayed for any context length up to ``max_context``:

* one static KV buffer per layer holds the final block and room to decode, and the context: gathered and
  rotated into it by ``kernels`` before the replay, or (``read_in_place``, device-resident blocks, split-KV
  kernel) read where the blocks are stored (``kernels.table_attention`` rotates the query instead of the keys)
  and gathered into the buffer only before the first decoding step, after the first token;
* RMSNorm and the rotary embedding are captured as one fused kernel each where ``blockrag.fused`` finds,
  on the warm-up forwards, that they give the model's own numbers;
* the context length lives in device tensors: attention over the context uses flash attention's
  variable-length entry with ``seqused_k``, the context split into fixed chunks (flash-decoding style);
  chunks past the context are empty and dropped in the log-sum-exp merge;
* the final block is padded to its bucket; padded tokens come after the real ones, so no real token sees
  them, and decoding overwrites their cache slots.

The forward is captured as a chain of graphs, one per group of layers (cut at the first cache update of each
group), replayed in order. Host-resident blocks (pinned memory) are copied group by group on a side stream;
before each piece, the compute stream waits for that group's copy and gathers its layers, so the transfer of
later layers overlaps the replay of earlier ones and only the last group's gather and piece follow the copy.

Only for 16-bit models on CUDA; everything else takes the eager path. One request at a time uses the static
buffer (a lock); a concurrent request falls back to the eager path.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from blockrag.assemble import _copy_from_host, block_offsets, copy_groups, fast_path, gather_plans
from blockrag.attention import GraphState, graph_attention  # noqa: F401 (graph_attention: re-exported)
from blockrag.fused import FusedOps
from blockrag.hf import KVCache, buffer_cache, forward, slot_cache
from blockrag.kernels import (
    Segment,
    empty_segment_table,
    fill_segment_table,
    gather_rotate,
    split_meta,
    table_supported,
)

BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # final-block lengths; padding costs rows


def _cut_before(cut, update):
    def cut_then_update(*args, **kwargs):
        cut()
        return update(*args, **kwargs)
    return cut_then_update


class _GraphInputs:
    """A captured forward's inputs (device tensors at fixed addresses) and their pinned host mirrors.

    ``upload`` writes one request into the host mirrors and copies them over without blocking the host; the
    mirrors are rewritten only after the previous request's copies have finished.
    """

    def __init__(self, bucket: int, state: GraphState, device: torch.device) -> None:
        self.table = None if state.table is None else empty_segment_table(
            state.table.start.numel(), state.table.items.shape[0], state.table.cos.shape[1], device, pin=True)
        self.ids = torch.zeros(1, bucket, dtype=torch.long, device=device)
        self.positions = torch.arange(bucket, device=device)[None]
        self.last = torch.full((1,), bucket - 1, dtype=torch.long, device=device)
        self.state = state
        self._long = torch.zeros(3, bucket, dtype=torch.long, pin_memory=True)  # ids, positions, last
        self._used = torch.zeros(state.seqused.numel(), dtype=torch.int32, pin_memory=True)
        self._valid = torch.zeros(state.seqused.numel(), dtype=torch.bool, pin_memory=True)
        self._meta = torch.zeros(4, dtype=torch.int32, pin_memory=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def upload(self, final_ids: list[int], context: int, chunk: int, max_splits: int, segments=(),
               inv_freq: Tensor | None = None) -> None:
        """One request's inputs; with a segment table, ``segments`` (context, then the final block) fill it."""
        q, bucket = len(final_ids), self._long.shape[1]
        self._copied.synchronize()  # the mirrors may still be read by the last request's copies
        self._long[0, :q] = torch.tensor(final_ids)
        self._long[0, q:] = 0
        self._long[1] = torch.arange(context, context + bucket)
        self._long[2, 0] = q - 1
        used = (context - torch.arange(self._used.numel()) * chunk).clamp(0, chunk)
        self._used.copy_(used)
        self._valid.copy_(used > 0)
        self.ids.copy_(self._long[0:1], non_blocking=True)
        self.positions.copy_(self._long[1:2], non_blocking=True)
        self.state.tail.copy_(self._long[1], non_blocking=True)
        self.last.copy_(self._long[2, :1], non_blocking=True)
        self.state.seqused.copy_(self._used, non_blocking=True)
        self.state.valid.copy_(self._valid, non_blocking=True)
        if self.table is not None:
            fill_segment_table(self.table, segments, q, inv_freq, max_splits, self.state.anchor,
                               rotation=self.state.table)  # rotations computed on the device, in place
            for name in self.table._fields:
                if name not in ("cos", "sin"):
                    getattr(self.state.table, name).copy_(getattr(self.table, name), non_blocking=True)
        elif self.state.meta is not None:
            self._meta.copy_(torch.tensor(split_meta(context, q, max_splits), dtype=torch.int32))
            self.state.meta.copy_(self._meta, non_blocking=True)
        self._copied.record()


@dataclass
class _Captured:
    graphs: list  # torch.cuda.CUDAGraph pieces, replayed in order
    groups: list  # per piece, the layers whose cache it updates first (their KV must be in place before it)
    inputs: _GraphInputs
    logits: Tensor  # (1, 1, V) output


class FinalBlockGraphs:
    """Captured final-block forwards of one model, sharing one static KV buffer.

    Args:
        model: a 16-bit HF causal LM on CUDA, already switched to the ``blockrag`` attention by the caller.
        max_context: most context tokens a replay accepts.
        chunk: context chunk length for the split attention.
        buckets: final-block lengths that get a graph (a final block is padded to the next one).
        decode_room: buffer slots kept after the final block for generated tokens (more grow the cache).
        attention: "triton" (``kernels.final_block_attention``: split-KV over the context and the final block
            in one launch, padding rows skipped), "flash" (flash varlen over fixed chunks + causal tail +
            merge) or "auto" (triton where the head dim is a power of two).
        pipeline_host: overlap host-to-device copies with the replay, group of layers by group (False: copy
            everything, then replay).
        rotary_half: the model's rotary frequencies (``RopeSpec.inv_freq`` length); needed for ``read_in_place``.
        read_in_place: with the "triton" attention, read the context through a segment table
            (``kernels.table_attention``), device-resident blocks where they are stored: nothing is copied before
            the first token, and the buffer is filled for decoding only when a token follows. Off by default:
            on an H100 at 32K context the table kernel takes ~204 us a layer against ~142 us over the gathered
            buffer, about what the gather saves (graph TTFT 17.7 vs 18.1 ms at 32K, 11.6 vs 11.4 ms at 3.7K), and
            the first decoding step pays the gather; see benchmarks/NOTES.md.
        max_segments: most segments (blocks + the final block) a request may have to be read in place (more
            are gathered).
        fuse: capture RMSNorm and the rotary embedding as one fused kernel each where ``blockrag.fused`` finds,
            on the warm-up forwards, that the fused kernel gives the module's own numbers (``fused.decisions``).
    """

    def __init__(self, model, max_context: int, chunk: int = 4096, buckets=BUCKETS, decode_room: int = 512,
                 attention: str = "auto", max_splits: int = 16, pipeline_host: bool = True,
                 rotary_half: int | None = None, read_in_place: bool = False, max_segments: int = 1024,
                 fuse: bool = True):
        config = model.config.get_text_config()
        self.model = model
        self.buckets = tuple(sorted(buckets))
        self.chunk = chunk
        self.chunks = max(1, math.ceil(max_context / chunk))
        self.max_context = max_context
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        layers, heads = config.num_hidden_layers, config.num_key_value_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        capacity = self.chunks * chunk + self.buckets[-1] + decode_room
        if attention == "auto":
            attention = "triton" if dim >= 16 and not dim & (dim - 1) else "flash"
        if attention not in ("triton", "flash"):
            raise ValueError(f"expected attention 'auto', 'triton' or 'flash', found {attention!r}")
        self.attention, self.max_splits, self.pipeline_host = attention, max_splits, pipeline_host
        # reading in place: the split-KV kernel reads through a segment table, where the head and rotary widths fit
        self.rotary_half = rotary_half if (read_in_place and attention == "triton" and rotary_half is not None
                                           and table_supported(dim, rotary_half)) else None
        self.max_segments = max_segments
        self.fused = FusedOps.of(model) if fuse else None
        self.keys = torch.empty(layers, 1, heads, capacity, dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.lock = threading.Lock()
        self._graphs: dict[int, _Captured] = {}

    def bucket(self, context: int, final: int) -> int | None:
        """The bucket a request fits in, or None (then use the eager path)."""
        if context > self.max_context:
            return None
        return next((b for b in self.buckets if b >= final), None)

    def try_prefill(self, blocks, final_ids: list[int], rope, reencode: bool, device: torch.device, attention):
        """(logits, cache, release) from a replay, or None where the eager path applies (blocks it cannot read,
        a request larger than every bucket, or the buffer busy with another request).

        The static buffer serves one request at a time: ``release`` frees it once decoding is done.
        """
        path = fast_path(blocks, device) if blocks else "eager"
        if path == "eager":
            return None
        bucket = self.bucket(sum(b.num_tokens for b in blocks), len(final_ids))
        if bucket is None or not self.lock.acquire(blocking=False):
            return None
        try:  # host-resident blocks: copied group of layers by group, overlapped with the replay
            with attention:
                logits, cache = self.prefill(blocks, final_ids, rope, reencode, bucket)
        except BaseException:
            self.lock.release()
            raise
        return logits, cache, self.lock.release

    def prefill(self, blocks, final_ids: list[int], rope, reencode: bool, bucket: int) -> tuple[Tensor, KVCache]:
        """Replay the bucket's graphs over the blocks; return (last logits (V,), decode cache).

        Blocks may be on the device or in (pinned) host memory, mixed. Device-resident blocks of the model's
        dtype are read in place (with a segment table); the others are gathered into the buffer first.
        """
        # NOTE: capture first: its warm-up runs write into the buffer, which must not clobber this context.
        captured = self._graphs.get(bucket) or self._capture(bucket)
        offsets = block_offsets(blocks)
        context = offsets[-1] + blocks[-1].num_tokens
        deltas = offsets if reencode else [0] * len(blocks)
        on_host = any(b.device.type == "cpu" for b in blocks)
        in_place = (self.rotary_half is not None and not on_host and len(blocks) < self.max_segments
                    and all(not b.quantized and b.values.is_contiguous() and b.keys.data_ptr() % 16 == 0
                            and b.values.data_ptr() % 16 == 0 for b in blocks))
        q = len(final_ids)
        layers, _, heads, cap, dim = self.keys.shape
        segments = ()  # the segment table's, where there is one
        if in_place:  # the blocks where they are, then the final block in the buffer
            segments = [Segment(b.keys, b.values, 0, heads * b.num_tokens * dim, b.num_tokens * dim, b.num_tokens,
                                delta) for b, delta in zip(blocks, deltas)]
            segments.append(Segment(self.keys, self.values, context * dim, heads * cap * dim, cap * dim, q, 0))
        elif self.rotary_half is not None:  # the buffer, context gathered into it
            segments = [Segment(self.keys, self.values, 0, heads * cap * dim, cap * dim, context + q, 0)]
        # Device-resident blocks are gathered before the request's inputs are written: the GPU gathers while the
        # host fills the inputs. Host-resident blocks' inputs go up first, from pinned memory: a small copy queued
        # after the context's bulk host-to-device copies would wait for all of them, and the first piece with it.
        gather_first = not in_place and not on_host
        if gather_first:
            self._gather(blocks, offsets, deltas, rope)
        captured.inputs.upload(final_ids, context, self.chunk, self.max_splits, segments, rope.inv_freq)
        ready, fill = None, None
        if in_place:  # before the first decoding step: the context into the buffer
            fill = functools.partial(self._gather, blocks, offsets, deltas, rope)
        elif on_host and self.pipeline_host and len(captured.graphs) > 1:
            ready = _copy_from_host(blocks, offsets, deltas, rope, self.keys, self.values)  # per-layer hooks
        elif not gather_first:
            self._gather([b.to(self.keys.device, non_blocking=True) for b in blocks], offsets, deltas, rope)
        for graph, group in zip(captured.graphs, captured.groups):
            if ready is not None:
                for layer in group:
                    ready[layer]()  # wait for this layer's copy, gather + rotate it (compute stream)
            graph.replay()
        hooks = [fill] + [None] * (layers - 1)  # layer 0 updates first: it fills every layer
        return captured.logits[0, -1].float(), buffer_cache(self.model.config, self.keys, self.values, context + q,
                                                            before_use=hooks)

    def _gather(self, blocks, offsets, deltas, rope) -> None:
        """Device-resident blocks into the buffer at their offsets, keys rotated by their deltas."""
        for plan in gather_plans(blocks, [b.keys for b in blocks], [b.values for b in blocks], offsets, deltas, rope,
                                 self.keys.device):
            gather_rotate(plan, 0, self.keys[:, 0], self.values[:, 0])

    def _capture(self, bucket: int) -> _Captured:
        device = self.keys.device
        rows = bucket * (self.model.config.num_attention_heads // self.keys.shape[2])
        state = GraphState(
            chunk=self.chunk,
            seqused=torch.zeros(self.chunks, dtype=torch.int32, device=device),
            valid=torch.zeros(self.chunks, dtype=torch.bool, device=device),
            cu_q=torch.arange(0, (self.chunks + 1) * rows, rows, dtype=torch.int32, device=device),
            cu_k=torch.arange(0, (self.chunks + 1) * self.chunk, self.chunk, dtype=torch.int32, device=device),
            tail=torch.arange(bucket, device=device),
        )
        if self.rotary_half is not None:  # until the first request: the buffer, as if it held the final block
            state.table = empty_segment_table(self.max_segments, self.max_splits, self.rotary_half, device)
            _, _, heads, cap, dim = self.keys.shape
            state.anchor = self.keys  # segments are addressed from the buffer (a fixed address, as a graph needs)
            fill_segment_table(state.table, [Segment(self.keys, self.values, 0, heads * cap * dim, cap * dim, bucket,
                                                     0)], bucket, torch.zeros(self.rotary_half), self.max_splits,
                               state.anchor)
            state.meta, state.max_splits = state.table.meta, self.max_splits
        elif self.attention == "triton":
            state.meta = torch.tensor(split_meta(0, bucket, self.max_splits), dtype=torch.int32, device=device)
            state.max_splits = self.max_splits
        inputs = _GraphInputs(bucket, state, device)
        ids, positions, last = inputs.ids, inputs.positions, inputs.last
        mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # 4D: transformers builds no mask
        layers = self.keys.shape[0]
        groups = copy_groups(layers)  # the copy groups of assemble._copy_from_host
        starts = [group.start for group in groups[1:]]  # layers whose first cache update opens a new piece
        graphs = [torch.cuda.CUDAGraph() for _ in groups]
        pool = torch.cuda.graph_pool_handle()
        switch = {"on": False, "piece": 0}

        def cut() -> None:  # pieces share one memory pool: captured in order, replayed in order
            if switch["on"]:
                graphs[switch["piece"]].capture_end()
                switch["piece"] += 1
                graphs[switch["piece"]].capture_begin(pool=pool)

        # the final block's keys go to the slots in state.tail; attention reads the whole buffer
        cache = slot_cache(self.model.config, self.keys, self.values, state.tail)
        for layer in starts:  # while capturing, the first update of each group's layer opens a new piece
            cache.layers[layer].update = _cut_before(cut, cache.layers[layer].update)

        def step() -> Tensor:
            return forward(self.model, ids, position_ids=positions, attention_mask=mask, cache=cache,
                           logits_to_keep=last, blockrag_graph=state)[0]

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        fused = self.fused or contextlib.nullcontext()
        with fused:  # the fused kernels are captured where the warm-up found them equal to the model's own
            with torch.cuda.stream(side), (fused.verify() if self.fused else contextlib.nullcontext()):
                for _ in range(2):  # warm-up outside the graph: kernels selected, workspaces allocated
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            capture = torch.cuda.Stream(device)
            with torch.cuda.stream(capture):
                graphs[0].capture_begin(pool=pool)
                switch["on"] = True
                try:
                    logits = step()
                finally:
                    switch["on"] = False
                    graphs[switch["piece"]].capture_end()
        torch.cuda.current_stream(device).wait_stream(capture)
        if switch["piece"] != len(graphs) - 1:
            raise RuntimeError(f"captured {switch['piece'] + 1} graph pieces, expected {len(graphs)}")
        captured = _Captured(graphs, groups, inputs, logits)
        self._graphs[bucket] = captured
        return captured
