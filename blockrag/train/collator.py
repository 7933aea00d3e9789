"""Samples -> padded training batches with the block attention mask.

Every sample yields copies: a *block* copy (each context block attends only to itself; the final block and the
response attend to everything before them; positions contiguous 0..N-1, as the engine re-encodes them) and a
*full* copy (ordinary causal attention over the same ids). The paper trains one of each per sample; the ratio
is configurable. The mask comes from :mod:`blockrag.masks`, the one source shared with the tests' references.

Attention backends take the 4D mask as given: boolean (True = attend) for ``sdpa``, additive float
(0 / dtype min) for ``eager``. Other backends ignore a custom 4D mask, so they are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from blockrag.errors import InvalidInputError, UnsupportedModelError
from blockrag.hf import attention_implementation
from blockrag.masks import additive_mask, block_attention_mask, block_position_ids
from blockrag.train.data import Sample

IGNORE_INDEX = -100  # label of tokens without loss (the HF / PyTorch cross-entropy convention)
CopyMode = Literal["block", "full", "block_no_pos"]
MASK_BACKENDS = ("sdpa", "eager")


@dataclass(frozen=True)
class CopyRatio:
    """How many block copies and full copies each sample yields (the paper: 1:1)."""

    block: int = 1
    full: int = 1

    def __post_init__(self) -> None:
        if self.block < 0 or self.full < 0 or self.block + self.full == 0:
            raise InvalidInputError(f"expected a block:full copy ratio of non-negative counts, not both 0, "
                                    f"found {self.block}:{self.full}")

    @classmethod
    def parse(cls, text: str) -> CopyRatio:
        """From 'B:F', e.g. '1:1' (paper), '1:0' (block copies only), '0:1' (ordinary fine-tuning)."""
        parts = str(text).split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InvalidInputError(f"expected a copy ratio 'BLOCK:FULL' such as '1:1', found {text!r}")
        return cls(int(parts[0]), int(parts[1]))

    @property
    def modes(self) -> tuple[CopyMode, ...]:
        return ("block",) * self.block + ("full",) * self.full

    def __str__(self) -> str:
        return f"{self.block}:{self.full}"


@dataclass(frozen=True)
class Copy:
    """One sequence of a batch before padding: (N,) ids, labels, positions and an (N, N) boolean mask."""

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    mask: Tensor
    mode: CopyMode
    tail_start: int = 0  # first position of the final block (what distillation compares)


def make_copy(sample: Sample, mode: CopyMode = "block") -> Copy:
    """The ids, labels (response only), positions and mask of one copy of a sample.

    ``block``: block mask, positions 0..N-1 (what BlockEngine computes with re-encoding).
    ``block_no_pos``: block mask, every context block at positions 0..T-1 (the engine with reencode=False).
    ``full``: causal mask, positions 0..N-1 (what the engine computes in full mode).
    """
    lengths = [len(b) for b in sample.blocks]
    tail = len(sample.final) + len(sample.response)
    ids = torch.tensor(list(sample.prompt_ids) + list(sample.response), dtype=torch.long)
    labels = ids.clone()
    labels[: ids.numel() - len(sample.response)] = IGNORE_INDEX
    if sample.loss_mask is not None:
        skip = torch.tensor([not keep for keep in sample.loss_mask], dtype=torch.bool)
        labels[ids.numel() - len(sample.response) :][skip] = IGNORE_INDEX
    if mode == "full":
        # NOTE: with no context blocks, the block mask is the causal mask: one source for both.
        mask = block_attention_mask([], ids.numel())
        positions = block_position_ids([], ids.numel())
    elif mode in ("block", "block_no_pos"):
        mask = block_attention_mask(lengths, tail)
        positions = block_position_ids(lengths, tail, reencode=mode == "block")
    else:
        raise InvalidInputError(f"expected a copy mode in ('block', 'full', 'block_no_pos'), found {mode!r}")
    return Copy(ids, labels, positions, mask, mode, ids.numel() - tail)


def check_backend(model) -> str:
    """The model's attention backend, if it takes a custom 4D mask; else UnsupportedModelError."""
    backend = attention_implementation(model) or "eager"
    if backend not in MASK_BACKENDS:
        raise UnsupportedModelError(
            f"expected a model loaded with attn_implementation in {MASK_BACKENDS} (they take the 4D block mask), "
            f"found {backend!r}; reload it with attn_implementation='sdpa'"
        )
    return backend


def pad_copies(copies: Sequence[Copy], pad_token_id: int, backend: str = "sdpa",
               dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Right-pad copies into a batch.

    Returns:
        input_ids, labels, position_ids: (B, N) long; attention_mask: (B, 1, N, N) bool (sdpa) or ``dtype``
        additive (eager); block_copy: (B,) bool, which rows are block copies; tail_mask: (B, N) bool, the final
        block and response positions of each row (the last two are not model inputs).
    """
    if backend not in MASK_BACKENDS:
        raise UnsupportedModelError(f"expected an attention backend in {MASK_BACKENDS}, found {backend!r}")
    size, longest = len(copies), max(c.input_ids.numel() for c in copies)
    input_ids = torch.full((size, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((size, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(size, longest, dtype=torch.long)
    # NOTE: a padding row attends to itself only: a row with nothing to attend to makes softmax NaN, and NaN
    # leaks into gradients even where the loss ignores the row. Real tokens never see padding (it comes later).
    mask = torch.eye(longest, dtype=torch.bool).repeat(size, 1, 1)
    tail_mask = torch.zeros(size, longest, dtype=torch.bool)
    for row, c in enumerate(copies):
        n = c.input_ids.numel()
        input_ids[row, :n], labels[row, :n], position_ids[row, :n] = c.input_ids, c.labels, c.position_ids
        tail_mask[row, c.tail_start : n] = True
        position_ids[row, n:] = c.position_ids[-1] + 1 + torch.arange(longest - n)
        mask[row, :n, :n] = c.mask
    mask = mask[:, None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": mask if backend == "sdpa" else additive_mask(mask, dtype),
        "block_copy": torch.tensor([c.mode != "full" for c in copies]),
        "tail_mask": tail_mask,
    }


class BlockCollator:
    """Collate samples into a batch holding ``ratio.block`` block copies and ``ratio.full`` full copies of each.

    Args:
        pad_token_id: id written into padding (never attended to by real tokens, never in the loss).
        backend: the model's attention implementation, "sdpa" or "eager" (see ``check_backend``).
        ratio: copies per sample, block:full.
        dtype: dtype of the additive mask for eager attention (the model's dtype).
        teacher: also emit ``teacher`` (full-attention inputs, one row per sample) and ``teacher_row`` (the
            sample of every batch row), for distillation.
    """

    def __init__(self, pad_token_id: int, backend: str = "sdpa", ratio: CopyRatio = CopyRatio(),
                 dtype: torch.dtype = torch.float32, teacher: bool = False) -> None:
        if backend not in MASK_BACKENDS:
            raise UnsupportedModelError(f"expected an attention backend in {MASK_BACKENDS}, found {backend!r}")
        self.pad_token_id = pad_token_id
        self.backend = backend
        self.ratio = ratio
        self.dtype = dtype
        self.teacher = teacher

    @classmethod
    def for_model(cls, model, tokenizer, ratio: CopyRatio = CopyRatio(), teacher: bool = False) -> BlockCollator:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad, check_backend(model), ratio, next(model.parameters()).dtype, teacher)

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Tensor]:
        copies = [make_copy(s, mode) for s in samples for mode in self.ratio.modes]
        batch = pad_copies(copies, self.pad_token_id, self.backend, self.dtype)
        if self.teacher:
            # NOTE: one full-attention copy per sample for the teacher; row r of the batch is sample
            # teacher_row[r]. Same ids and padding length, so positions line up column by column.
            teacher = pad_copies([make_copy(s, "full") for s in samples], self.pad_token_id, self.backend,
                                 self.dtype)
            batch["teacher"] = {k: teacher[k] for k in ("input_ids", "attention_mask", "position_ids")}
            batch["teacher_row"] = torch.arange(len(samples)).repeat_interleave(len(self.ratio.modes))
        return batch

    def copies(self, samples: Sequence[Sample], mode: CopyMode) -> dict[str, Tensor]:
        """One copy of each sample in the given mode (for evaluation)."""
        return pad_copies([make_copy(s, mode) for s in samples], self.pad_token_id, self.backend, self.dtype)
