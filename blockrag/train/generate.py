"""Batched greedy answers of training-format samples in full, block or block-without-re-encoding mode.

Used to evaluate a fine-tuned model on hundreds of questions in a few batched calls (and to make the base
model's own answers the targets where a data set has no short answer). Each prompt is the sample's blocks and
final block (its response is ignored); the attention mask and positions are those of
:func:`blockrag.train.collator.make_copy`, which are what :class:`~blockrag.engine.BlockEngine` computes: in
block mode each context block attends only to itself and the final block to everything, so greedy answers are
the engine's greedy answers (``tests/test_train_generate.py`` compares them token for token).

Prompts are left-padded: a padding column attends only to itself and no real token attends to it. Decoding
reuses the model's KV cache; every new token attends to its row's prompt and the tokens generated before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

from blockrag.decode import eos_ids as model_eos_ids
from blockrag.errors import InvalidInputError
from blockrag.hf import forward
from blockrag.train.collator import CopyMode, check_backend, make_copy
from blockrag.train.data import Sample

T = TypeVar("T")

MODES: tuple[CopyMode, ...] = ("full", "block", "block_no_pos")


def _prompt_only(sample: Sample) -> Sample:
    return Sample(blocks=sample.blocks, final=sample.final, response=())


def _prefill_inputs(samples: Sequence[Sample], mode: CopyMode, pad_id: int, device) -> tuple[dict, list[int]]:
    copies = [make_copy(_prompt_only(s), mode) for s in samples]
    lengths = [c.input_ids.numel() for c in copies]
    longest = max(lengths)
    size = len(copies)
    input_ids = torch.full((size, longest), pad_id, dtype=torch.long)
    positions = torch.zeros(size, longest, dtype=torch.long)
    mask = torch.eye(longest, dtype=torch.bool).repeat(size, 1, 1)
    for row, (c, n) in enumerate(zip(copies, lengths)):
        start = longest - n
        input_ids[row, start:] = c.input_ids
        positions[row, start:] = c.position_ids
        mask[row, start:, start:] = c.mask
        mask[row, start:, :start] = False
    inputs = {"input_ids": input_ids.to(device), "position_ids": positions.to(device),
              "attention_mask": mask[:, None].to(device)}
    return inputs, lengths


def prepared_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """A boolean 4D mask (True = attend) as the model's attention backend takes it: as is for sdpa, additive for
    eager."""
    if check_backend(model) == "sdpa":
        return mask
    from blockrag.masks import additive_mask

    return additive_mask(mask, next(model.parameters()).dtype)


@torch.inference_mode()
def greedy_decode(model, logits: torch.Tensor, cache, visible: torch.Tensor, next_position: torch.Tensor,
                  max_new_tokens: int, eos_ids: frozenset[int]) -> list[list[int]]:
    """Greedy tokens (EOS excluded) after a batched prefill.

    Args:
        logits: (B, V) float logits of each row's last prompt token.
        cache: the prefill's cache, K columns per row.
        visible: (B, K) bool, which cache columns every decoded token of the row attends to (its real prompt
            keys); each generated token also attends to the tokens generated before it and itself.
        next_position: (B,) long, the position of each row's first generated token.
    """
    size, device = logits.shape[0], logits.device
    eos = torch.tensor(sorted(eos_ids), device=device) if eos_ids else None
    done = torch.zeros(size, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        if eos is not None:
            done = done | torch.isin(token, eos)
        tokens.append(torch.where(done, torch.full_like(token, -1), token))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        keys = torch.cat([visible, torch.ones(size, step + 1, dtype=torch.bool, device=device)], dim=1)
        logits, cache = forward(model, token[:, None], position_ids=(next_position + step)[:, None],
                                attention_mask=prepared_mask(model, keys[:, None, None, :]), cache=cache)
        logits = logits[:, -1].float()
    table = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(size)]
    return [[t for t in row if t >= 0] for row in table]


@torch.inference_mode()
def _generate_batch(model, samples: Sequence[Sample], mode: CopyMode, max_new_tokens: int,
                    eos_ids: frozenset[int], pad_id: int) -> list[list[int]]:
    device = next(model.parameters()).device
    inputs, lengths = _prefill_inputs(samples, mode, pad_id, device)
    size, longest = inputs["input_ids"].shape
    logits, cache = forward(model, inputs["input_ids"], position_ids=inputs["position_ids"],
                            attention_mask=prepared_mask(model, inputs["attention_mask"]), logits_to_keep=1)
    # NOTE: the key mask of a decoded token: its row's real prompt columns, then every generated column.
    real = torch.zeros(size, longest, dtype=torch.bool, device=device)
    for row, n in enumerate(lengths):
        real[row, longest - n :] = True
    return greedy_decode(model, logits[:, -1].float(), cache, real, torch.tensor(lengths, device=device),
                         max_new_tokens, eos_ids)


def greedy_answers(model, tokenizer, samples: Sequence[Sample], mode: CopyMode = "block", *,
                   max_new_tokens: int = 32, batch_size: int = 32, eos_ids: Iterable[int] | None = None
                   ) -> list[list[int]]:
    """Greedy answer ids (EOS excluded) of every sample's prompt in the given mode.

    Args:
        model: a transformers causal LM loaded with attn_implementation "sdpa" or "eager".
        samples: prompts as Samples (their responses are ignored).
        mode: "full", "block" (block mask, positions re-encoded as the engine does) or "block_no_pos"
            (block mask, each context block at its own positions 0..T-1: the engine with reencode=False).
        batch_size: prompts per batched call; prompts are sorted by length first to limit padding.
    """
    if mode not in MODES:
        raise InvalidInputError(f"expected a mode in {MODES}, found {mode!r}")
    return in_length_order(model, tokenizer, samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           eos_ids=eos_ids, run=lambda rows, eos, pad: _generate_batch(
                               model, [samples[i] for i in rows], mode, max_new_tokens, eos, pad))


def in_length_order(model, tokenizer, samples: Sequence[Sample], *, max_new_tokens: int, batch_size: int,
                    eos_ids: Iterable[int] | None, run: Callable[[list[int], frozenset[int], int], Sequence[T]]
                    ) -> list[T]:
    """``run(rows, eos_ids, pad_id)`` over batches of sample indices, shortest prompts first (less padding), in
    eval mode; its per-row results returned in the order of ``samples``."""
    if max_new_tokens < 1 or batch_size < 1:
        raise InvalidInputError(f"expected max_new_tokens >= 1 and batch_size >= 1, found {max_new_tokens} "
                                f"and {batch_size}")
    eos = frozenset(eos_ids) if eos_ids is not None else model_eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    order = sorted(range(len(samples)), key=lambda i: sum(map(len, samples[i].blocks)) + len(samples[i].final))
    results: list = [None] * len(samples)
    try:
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            for i, result in zip(rows, run(rows, eos, pad)):
                results[i] = result
    finally:
        model.train(was_training)
    return results


def decode_answers(tokenizer, answers: Sequence[Sequence[int]]) -> list[str]:
    """Answer texts as the engine shows them (special tokens skipped, no clean-up of spaces)."""
    return [tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for ids in answers]
