"""What the engine returns: token accounting (Usage), the prefill's outcome, a generation, a stream of deltas."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Usage:
    """Token accounting and timing of one request.

    Attributes:
        cached_tokens: context tokens whose KV was served from cached blocks.
        encoded_tokens: context tokens encoded during this request (block store misses).
        prefilled_tokens: tokens run through the request's prefill (the final block; all in full mode).
        generated_tokens: tokens produced by decoding.
        ttft_s: seconds from the call to the first token's logits.
        decode_tokens_per_s: decoding speed after the first token (0 when fewer than two tokens).
        recomputed_tokens: context tokens re-encoded with full attention (``recompute``); they are also
            counted in ``cached_tokens`` (their cached KV was read, then overwritten) and in ``prefilled_tokens``.
    """

    cached_tokens: int
    encoded_tokens: int
    prefilled_tokens: int
    ttft_s: float
    generated_tokens: int = 0
    decode_tokens_per_s: float = 0.0
    recomputed_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.cached_tokens + self.encoded_tokens + self.prefilled_tokens


@dataclass(frozen=True)
class BlockInfo:
    """One context block of a request: its key, token ids and whether its KV was already cached."""

    key: str
    token_ids: tuple[int, ...]
    cached: bool


@dataclass(frozen=True)
class PrefillResult:
    """Outcome of a prefill.

    Attributes:
        mode: "block" or "full".
        logits: (V,) float32 logits of the last prompt token, on the CPU.
        input_ids: all prompt ids (context blocks then the final block).
        final_ids: ids of the final block.
        position_ids: the position of every prompt id.
        blocks: the context blocks, in order.
        usage: token accounting and TTFT.
        warnings: things skipped or adjusted (e.g. empty passages).
    """

    mode: str
    logits: torch.Tensor
    input_ids: tuple[int, ...]
    final_ids: tuple[int, ...]
    position_ids: tuple[int, ...]
    blocks: tuple[BlockInfo, ...]
    usage: Usage
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    """Generated text with the prefill it started from."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prefill: PrefillResult
    usage: Usage

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.prefill.warnings


class GenerationStream:
    """Iterator of text deltas; ``result`` holds the Generation once the iterator is exhausted."""

    def __init__(self, deltas: Iterator[str], holder: list[Generation]) -> None:
        self._deltas = deltas
        self._holder = holder

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def __next__(self) -> str:
        return next(self._deltas)

    @property
    def result(self) -> Generation:
        if not self._holder:
            raise RuntimeError("the stream has not finished; iterate it to the end first")
        return self._holder[0]
