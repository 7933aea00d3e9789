"""BlockEncoder: isolated prefill of many blocks, batched under a token budget.

Each block is encoded alone at positions 0..T-1. Blocks are right-padded inside a batch: under a causal
mask a real token never attends to padding that comes after it, and the attention mask keeps padding out
as well, so padding never reaches any block's KV. Padded rows are sliced off before a KVBlock is made.

On CUDA with 16-bit weights, RMSNorm and the rotary embedding run as ``blockrag.fused`` kernels where the
first batch shows they give the model's own numbers, and a batch's inputs go up without waiting for the GPU,
so the host prepares the next batch while the current one runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from blockrag.hf import prefill_kv, stacked_kv
from blockrag.kv import KVBlock


def fits(count: int, longest: int, token_budget: int) -> bool:
    """Whether ``count`` blocks, the longest of ``longest`` tokens, make one batch within ``token_budget``
    (padded to the longest); a single block always does."""
    return count <= 1 or count * longest <= token_budget


def plan_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group block indices so that each batch's (count x longest) stays within token_budget.

    Blocks are taken longest first, so similar lengths share a batch and little is padded. A block
    longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if not fits(len(current) + 1, longest, token_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class BlockEncoder:
    """Turns token-id blocks into KVBlocks with one forward pass per batch.

    The encoder knows nothing about templates or stores: ids in, KVBlocks out, in input order.
    """

    def __init__(self, model: nn.Module, fingerprint: str, token_budget: int = 8192, fuse: bool | None = None
                 ) -> None:
        """Args:
        fuse: run RMSNorm and the rotary embedding as verified fused kernels (``blockrag.fused``); None: on CUDA
            with 16-bit weights.
        """
        self.model = model
        self.fingerprint = fingerprint
        self.token_budget = token_budget
        self._fuse = fuse
        self._verified = False  # the fused kernels were checked against the model's own on a real batch

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode(self, blocks: Sequence[Sequence[int]], keys: Sequence[str], texts: Sequence[str | None] | None = None
               ) -> list[KVBlock]:
        """Encode each block alone.

        Args:
            blocks: token ids per block (non-empty).
            keys: content key per block.
            texts: optional block text per block.

        Returns:
            One KVBlock per input block, in input order, with (L, H, T, D) tensors on the model's device.
        """
        assert len(blocks) == len(keys), "one key per block"
        assert all(len(b) > 0 for b in blocks), "blocks must be non-empty"
        texts = list(texts) if texts is not None else [None] * len(blocks)
        out: list[KVBlock | None] = [None] * len(blocks)
        for batch in plan_batches([len(b) for b in blocks], self.token_budget):
            for i, (k, v) in zip(batch, self._forward([blocks[i] for i in batch])):
                out[i] = KVBlock(keys=k, values=v, token_ids=tuple(int(t) for t in blocks[i]),
                                 fingerprint=self.fingerprint, key=keys[i], text=texts[i])
        return out  # type: ignore[return-value]

    def _fused(self):
        """The context the forward runs in: the model's shared FusedOps (verifying on its first batch), or none."""
        device, dtype = self.device, next(self.model.parameters()).dtype
        fuse = self._fuse if self._fuse is not None else (
            device.type == "cuda" and dtype in (torch.float16, torch.bfloat16))
        if not fuse:
            return contextlib.nullcontext()
        from blockrag.fused import FusedOps

        fused = FusedOps.of(self.model)
        if self._verified:
            return fused
        self._verified = True
        stack = contextlib.ExitStack()
        stack.enter_context(fused)
        stack.enter_context(fused.verify())
        return stack

    def _forward(self, blocks: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        lengths = [len(b) for b in blocks]
        longest = max(lengths)
        ids = torch.zeros(len(blocks), longest, dtype=torch.long)
        mask = torch.zeros(len(blocks), longest, dtype=torch.long)
        for row, block in enumerate(blocks):
            ids[row, : len(block)] = torch.as_tensor(list(block), dtype=torch.long)
            mask[row, : len(block)] = 1
        # NOTE: built on the host and sent without blocking: a row-by-row copy into a device tensor waits for
        # the GPU each time (the previous batch). Without padding no mask is passed: transformers would read a
        # mask back from the GPU to find it all ones.
        ids = ids.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True) if min(lengths) < longest else None
        positions = torch.arange(longest, device=self.device).expand(len(blocks), -1)
        with self._fused():
            cache = prefill_kv(self.model, ids, attention_mask=mask, position_ids=positions)
        layer_keys, layer_values = stacked_kv(cache)
        # one copy per block: its rows of every layer stacked into (L, H, n, D), padding left out
        return [(torch.stack([k[row, :, :n] for k in layer_keys]), torch.stack([v[row, :, :n] for v in layer_values]))
                for row, n in enumerate(lengths)]
