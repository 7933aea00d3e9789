"""Batched greedy answers with selective recompute (training-free block-mode recovery), to evaluate it at scale.

``BlockEngine.generate(passages, question, recompute=SPEC)`` runs one prompt at a time; this runs a batch of
prompts and gives the same greedy tokens (``tests/test_train_generate_recompute.py`` compares them token for
token). Each prompt's selection S is chosen by ``blockrag.recompute.select_positions`` -- the engine's own call --
over that prompt's block-mode context KV. Then, per batch (left-padded):

1. one forward over the contexts with the block mask, positions 0..N-1: the block KV of every context token;
2. one forward over [the selected tokens again, at their own positions] + [the final block, at N...] on top of that
   cache, with an explicit mask: a token at position q attends to the *current* keys at positions <= q, where a
   position's current key is its recomputed copy if it is selected and its block copy if not (the visibility of
   ``blockrag.recompute.recompute_prefill``, which writes recomputed keys over the block keys in place);
3. greedy decoding over that cache (``blockrag.train.generate.greedy_decode``): every new token attends to the
   current keys only, so the superseded block copies of selected tokens stay hidden.

The block KV of step 1 is computed at positions 0..N-1 directly rather than encoded at 0 and rotated, which is
equal up to rounding (the equivalence every block-mode test leans on).

``kv="fp8"`` replaces step 1 by what the engine does with an fp8 store (``blockrag eval --kv fp8``): every distinct
context block of the batch is encoded alone at positions 0..T-1 (``blockrag.encoder.BlockEncoder``), quantised to
e4m3 with per-(layer, head) scales (``KVBlock.quantize``), then each prompt's blocks are dequantised and their keys
rotated to their offsets by ``blockrag.assemble.assemble_cache``, the engine's own call. Here "equal up to rounding"
is not enough: fp8 rounding of keys at final positions would differ from that of keys at 0..T-1, so the blocks go
through the engine's path. With ``recompute="none"`` this is block mode over fp8 blocks.

``context="prefixed"`` changes step 1 to a diagnostic the engine does not serve: every passage attends to block 0
(the instruction) as well as to itself (``block_attention_mask(..., shared_prefix=True)``), as if each passage were
encoded after the instruction block; passages stay blind to each other. Block 0 is the same in every prompt of a
template, so such passage KV could still be computed once per passage. Selections then read that context KV.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from blockrag.errors import InvalidInputError
from blockrag.hf import buffer_cache, forward, new_cache, stacked_kv
from blockrag.masks import block_attention_mask
from blockrag.recompute import Recompute, select_positions
from blockrag.train.data import Sample
from blockrag.train.generate import greedy_decode, in_length_order, prepared_mask

_NEEDS_KV = ("deviation", "query")  # strategies whose selection reads the block-mode KV
KVFormat = Literal["native", "fp8"]
KV_FORMATS = ("native", "fp8")
ContextMask = Literal["block", "prefixed"]
CONTEXT_MASKS = ("block", "prefixed")
_ENCODE_BUDGET = 8192  # tokens per encoding forward, the engine's default token_budget


class RecomputeAnswers(NamedTuple):
    """Greedy answer ids (EOS excluded) and the recomputed context positions of every sample."""

    answers: list[list[int]]
    selected: list[list[int]]


def _context_ids(sample: Sample) -> list[int]:
    return [t for block in sample.blocks for t in block]


def _context_pass(model, samples: Sequence[Sample], pad_id: int, device, context: ContextMask = "block"):
    """(cache with (B, H, C, D) block KV of the left-padded contexts, C = the longest context); ``context``
    "prefixed": every passage also attends to block 0."""
    lengths = [sum(map(len, s.blocks)) for s in samples]
    longest = max(lengths)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    positions = torch.zeros(len(samples), longest, dtype=torch.long)
    # NOTE: a padding column attends only to itself (softmax over nothing is NaN); no real token attends to it.
    mask = torch.eye(longest, dtype=torch.bool).repeat(len(samples), 1, 1)
    for row, (sample, n) in enumerate(zip(samples, lengths)):
        start = longest - n
        ids[row, start:] = torch.tensor(_context_ids(sample))
        positions[row, start:] = torch.arange(n)
        mask[row, start:, start:] = block_attention_mask([len(b) for b in sample.blocks], 0,
                                                         shared_prefix=context == "prefixed")
    _, cache = forward(model, ids.to(device), position_ids=positions.to(device),
                       attention_mask=prepared_mask(model, mask[:, None].to(device)), logits_to_keep=1)
    return cache


def _fp8_context_pass(model, samples: Sequence[Sample], device):
    """(cache with (B, H, C, D) left-padded context KV served as the engine serves fp8 blocks; zeros in padding)."""
    from blockrag.assemble import assemble_cache
    from blockrag.encoder import BlockEncoder
    from blockrag.rope import rope_spec

    distinct = list(dict.fromkeys(block for sample in samples for block in sample.blocks))
    # NOTE: the content keys are unused here (no store); the encoder only passes them through.
    encoded = BlockEncoder(model, fingerprint="", token_budget=_ENCODE_BUDGET).encode(
        distinct, [str(i) for i in range(len(distinct))])
    fp8 = {ids: block.quantize() for ids, block in zip(distinct, encoded)}
    del encoded
    rope, dtype = rope_spec(model), next(model.parameters()).dtype
    longest = max(sum(map(len, s.blocks)) for s in samples)
    keys = values = None
    for row, sample in enumerate(samples):
        assembled, n = assemble_cache([fp8[b] for b in sample.blocks], rope, model.config, device, dtype=dtype)
        row_keys, row_values = (torch.stack(t)[:, 0] for t in stacked_kv(assembled))  # (L, H, n, D) each
        if keys is None:
            layers, heads = row_keys.shape[:2]
            keys = row_keys.new_zeros(layers, len(samples), heads, longest, row_keys.shape[-1])
            values = row_values.new_zeros(layers, len(samples), heads, longest, row_values.shape[-1])
        keys[:, row, :, longest - n :] = row_keys
        values[:, row, :, longest - n :] = row_values
    cache = new_cache(model.config)
    for layer in range(keys.shape[0]):
        cache.update(keys[layer], values[layer], layer)
    return cache


def _row_cache(model, cache, row: int, length: int):
    """A batch-1 cache of one row's N context tokens (what ``select_positions`` reads), copied out of the batch."""
    keys, values = stacked_kv(cache)
    start = keys[0].shape[-2] - length
    return buffer_cache(model.config, torch.stack([k[row : row + 1, :, start:] for k in keys]),
                        torch.stack([v[row : row + 1, :, start:] for v in values]), length)


def _check_selection(selected: Sequence[int], sample: Sample, index: int) -> list[int]:
    n = sum(map(len, sample.blocks))
    chosen = [int(p) for p in selected]
    if chosen != sorted(set(chosen)) or (chosen and not 0 <= chosen[0] <= chosen[-1] < n):
        raise InvalidInputError(f"expected sorted distinct positions in 0..{n - 1} for sample {index}, found "
                                f"{chosen[:8]}{'...' if len(chosen) > 8 else ''}")
    return chosen


def _check_arguments(samples: Sequence[Sample], recompute, selections, kv: str = "native", context: str = "block"):
    if kv not in KV_FORMATS:
        raise InvalidInputError(f"expected kv in {KV_FORMATS}, found {kv!r}")
    if context not in CONTEXT_MASKS:
        raise InvalidInputError(f"expected context in {CONTEXT_MASKS}, found {context!r}")
    if context == "prefixed" and kv == "fp8":
        raise InvalidInputError("expected kv='native' with context='prefixed': fp8 blocks are encoded alone")
    if (recompute is None) == (selections is None):
        raise InvalidInputError("expected exactly one of recompute (a selection such as 'deviation:0.2') and "
                                f"selections (positions per sample), found recompute={recompute!r} and "
                                f"{'no' if selections is None else 'some'} selections")
    if selections is None:
        return Recompute.parse(recompute), None
    if len(selections) != len(samples):
        raise InvalidInputError(f"expected one selection per sample, found {len(selections)} for {len(samples)} "
                                "samples")
    return None, [_check_selection(sel, s, i) for i, (sel, s) in enumerate(zip(selections, samples))]


def recompute_inputs(samples: Sequence[Sample], selections: Sequence[Sequence[int]], context_width: int,
                     pad_id: int) -> dict[str, Tensor]:
    """The second forward's inputs: selected tokens then the final block, left-padded, over the context cache.

    Args:
        samples: B prompts.
        selections: per sample, sorted context positions to recompute.
        context_width: C, the padded context width of the cache the second forward extends.

    Returns:
        input_ids, position_ids: (B, R) long (R = the longest selection + final block);
        attention_mask: (B, 1, R, C + R) bool, True = attend;
        visible: (B, C + R) bool, the current keys (what decoded tokens attend to);
        next_position: (B,) long, each row's first generated position (N + F).
    """
    size = len(samples)
    width = max(len(sel) + len(s.final) for s, sel in zip(samples, selections))
    ids = torch.full((size, width), pad_id, dtype=torch.long)
    key_pos = torch.zeros(size, context_width + width, dtype=torch.long)
    current = torch.zeros(size, context_width + width, dtype=torch.bool)
    next_position = torch.zeros(size, dtype=torch.long)
    for row, (sample, selected) in enumerate(zip(samples, selections)):
        context = torch.tensor(_context_ids(sample))
        n, chosen = context.numel(), torch.tensor(list(selected), dtype=torch.long)
        fed = torch.cat((context[chosen], torch.tensor(sample.final)))
        fed_pos = torch.cat((chosen, torch.arange(n, n + len(sample.final))))
        key_pos[row, context_width - n : context_width] = torch.arange(n)
        keep = torch.ones(n, dtype=torch.bool)
        keep[chosen] = False  # NOTE: a selected position's block key is superseded by its recomputed copy
        current[row, context_width - n : context_width] = keep
        ids[row, width - fed.numel() :] = fed
        key_pos[row, context_width + width - fed.numel() :] = fed_pos
        current[row, context_width + width - fed.numel() :] = True
        next_position[row] = n + len(sample.final)
    query_pos, query_real = key_pos[:, context_width:], current[:, context_width:]
    mask = current[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
    own = torch.zeros(width, context_width + width, dtype=torch.bool)
    own[:, context_width:] = torch.eye(width, dtype=torch.bool)
    mask = torch.where(query_real[:, :, None], mask, own)  # a padding query sees itself only
    return {"input_ids": ids, "position_ids": query_pos.clone(), "attention_mask": mask[:, None],
            "visible": current, "next_position": next_position}


class RecomputePrefill(NamedTuple):
    """A batched recompute prefill, ready for decoding."""

    logits: Tensor  # (B, V) float32, each row's last final-block token
    cache: object  # the model's cache, C + R columns per row
    visible: Tensor  # (B, C + R) bool, the current keys (what decoded tokens attend to)
    next_position: Tensor  # (B,) long, each row's first generated position
    selected: list[list[int]]  # per row, the recomputed context positions


@torch.inference_mode()
def recompute_prefill_batch(model, samples: Sequence[Sample], recompute: str | Recompute | None = None, *,
                            selections: Sequence[Sequence[int]] | None = None, pad_id: int = 0,
                            kv: KVFormat = "native", context: ContextMask = "block") -> RecomputePrefill:
    """Steps 1 and 2 of the module docstring for one batch (no sorting, no splitting; see ``recompute_answers``
    for the arguments): ``recompute`` chooses each row's positions as the engine does, or ``selections`` gives them.
    """
    recompute, selections = _check_arguments(samples, recompute, selections, kv, context)
    device = next(model.parameters()).device
    if kv == "fp8":
        cache = _fp8_context_pass(model, samples, device)
    else:
        cache = _context_pass(model, samples, pad_id, device, context)
    if selections is None:
        reads_kv = any(part.strategy in _NEEDS_KV for part in recompute.parts)
        selections = []
        for row, sample in enumerate(samples):
            lengths = [len(b) for b in sample.blocks]
            context = _context_ids(sample)
            row_cache = _row_cache(model, cache, row, len(context)) if reads_kv else None
            selections.append(select_positions(model, recompute, lengths, context, row_cache, list(sample.final)))
    width = stacked_kv(cache)[0][0].shape[-2]
    inputs = {k: v.to(device) for k, v in recompute_inputs(samples, selections, width, pad_id).items()}
    logits, cache = forward(model, inputs["input_ids"], position_ids=inputs["position_ids"],
                            attention_mask=prepared_mask(model, inputs["attention_mask"]), cache=cache,
                            logits_to_keep=1)
    return RecomputePrefill(logits[:, -1].float(), cache, inputs["visible"], inputs["next_position"],
                            [list(s) for s in selections])


def recompute_answers(model, tokenizer, samples: Sequence[Sample], recompute: str | Recompute | None = None, *,
                      selections: Sequence[Sequence[int]] | None = None, max_new_tokens: int = 32,
                      batch_size: int = 32, eos_ids: Iterable[int] | None = None,
                      kv: KVFormat = "native", context: ContextMask = "block") -> RecomputeAnswers:
    """Greedy answers of every sample's prompt in block mode with selective recompute.

    Args:
        model: a transformers causal LM loaded with attn_implementation "sdpa" or "eager".
        samples: prompts as Samples (block 0 first; their responses are ignored).
        recompute: the selection, as ``BlockEngine.generate(recompute=...)`` takes it ("deviation:0.2",
            "first:4+query:0.1", "all", "none", ...); chosen per prompt by ``blockrag.recompute.select_positions``.
        selections: instead of ``recompute``, the positions to recompute: per sample, sorted distinct context
            positions (0 = the first token of block 0); e.g. for controls.
        batch_size: prompts per batched call; prompts are sorted by length first to limit padding.
        kv: "native" (block KV in the model's dtype) or "fp8": every context block (block 0 included) as an fp8
            store serves it (see the module docstring); ``recompute="none", kv="fp8"`` is block mode over fp8 KV.
        context: "block" (every context block alone, what the engine caches) or "prefixed" (every passage also
            attends to block 0; a diagnostic, see the module docstring).

    Returns:
        answers (EOS excluded) and the recomputed positions, both in the order of ``samples``.
    """
    spec, selections = _check_arguments(samples, recompute, selections, kv, context)

    def run(rows: list[int], eos: frozenset[int], pad: int) -> list[tuple[list[int], list[int]]]:
        given = [selections[i] for i in rows] if selections is not None else None
        out = recompute_prefill_batch(model, [samples[i] for i in rows], spec, selections=given, pad_id=pad, kv=kv,
                                      context=context)
        ids = greedy_decode(model, out.logits, out.cache, out.visible, out.next_position, max_new_tokens, eos)
        return list(zip(ids, out.selected))

    pairs = in_length_order(model, tokenizer, samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            eos_ids=eos_ids, run=run)
    return RecomputeAnswers([ids for ids, _ in pairs], [positions for _, positions in pairs])
