"""Slow, obvious references the fast paths are compared with. Written independently of blockrag's code."""

from __future__ import annotations

import dataclasses
import inspect

import torch


def cache_of(out):
    """The returned cache: ``out.cache`` in transformers >= 5.24, the older field name before."""
    names = {f.name for f in dataclasses.fields(out)}
    return out.cache if "cache" in names else out.past_key_values


def with_cache(model, cache) -> dict:
    """The keyword that passes ``cache`` to ``model``: ``cache`` in transformers >= 5.24, the older name before."""
    return {"cache": cache} if "cache" in inspect.signature(type(model).forward).parameters else {
        "past_key_values": cache}


def reference_block_mask(block_lengths, final_length, shared_prefix=False):
    """(N, N) bool mask by explicit loops: context blocks see themselves causally, the rest sees all before;
    with shared_prefix every context block also sees block 0 (passages encoded after block 0)."""
    n = sum(block_lengths) + final_length
    owner = []
    for index, length in enumerate(block_lengths):
        owner += [index] * length
    owner += [None] * final_length
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            mask[i, j] = owner[i] is None or owner[i] == owner[j] or (shared_prefix and owner[j] == 0)
    return mask


def to_model_mask(mask, model):
    """The 4D mask the model's attention backend takes as given: bool for sdpa, additive for eager."""
    mask = mask[None, None]
    if model.config._attn_implementation == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


@torch.no_grad()
def reference_logits(model, block_ids, tail_ids):
    """Logits of every position from ONE forward over all ids with the block mask, positions 0..N-1."""
    device = next(model.parameters()).device
    ids = [t for block in block_ids for t in block] + list(tail_ids)
    mask = reference_block_mask([len(b) for b in block_ids], len(tail_ids))
    out = model(input_ids=torch.tensor([ids], device=device), attention_mask=to_model_mask(mask, model).to(device),
                position_ids=torch.arange(len(ids), device=device)[None], use_cache=False)
    return out.logits[0].float().cpu()


@torch.no_grad()
def reference_greedy(model, block_ids, final_ids, steps, eos_ids=()):
    """Greedy decoding by re-running the full block-masked forward for every new token."""
    generated = []
    for _ in range(steps):
        token = int(reference_logits(model, block_ids, list(final_ids) + generated)[-1].argmax())
        if token in eos_ids:
            break
        generated.append(token)
    return generated


@torch.no_grad()
def keys_at(model, ids, offset):
    """(L, H, T, D) cached keys of ids encoded alone at positions offset..offset+T-1."""
    positions = torch.arange(offset, offset + len(ids))[None]
    out = model(input_ids=torch.tensor([ids]), position_ids=positions, use_cache=True)
    return torch.stack([layer.keys[0] for layer in cache_of(out).layers])


def rotate_complex(keys, delta, inv_freq):
    """RoPE shift by delta via complex multiplication in float64 (rotate-half pairing: i with i + R/2)."""
    rotary = 2 * inv_freq.numel()
    half = rotary // 2
    k = keys.double()
    z = torch.complex(k[..., :half], k[..., half:rotary])
    z = z * torch.polar(torch.ones(half, dtype=torch.float64), delta * inv_freq.double())
    out = k.clone()
    out[..., :half], out[..., half:rotary] = z.real, z.imag
    return out.to(keys.dtype)
