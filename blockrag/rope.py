"""RoPE facts of a loaded model, and the one operation block attention needs: moving keys by delta.

HF models cache keys *after* RoPE. Rotary embeddings are rotations, R(p + delta) = R(delta) R(p), so a
block encoded alone at positions 0..T-1 is moved to positions delta..delta+T-1 by rotating its cached
keys by delta. Values carry no position and are never touched.

The rotation is computed from ``inv_freq`` in float32, never from the model's rotary module output: for
yarn (and longrope) that output is multiplied by ``attention_scaling``, which the stored keys already
carry, so using it would scale them twice.

``verify_reencoding`` checks this on the model itself when an engine is built, one decoder layer at a time
(each layer fed the same input at both offsets), so that 16-bit rounding does not pile up over the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from blockrag.errors import UnsupportedModelError

#: Rope types whose inverse frequencies do not depend on sequence length.
SUPPORTED_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})

# Models whose rotary embedding pairs interleaved dims (x0, x1), (x2, x3), ... instead of the
# rotate_half layout (x_i, x_{i + R/2}) that rotate_keys implements.
_INTERLEAVED_ROPE_MODELS = frozenset({"gptj", "codegen", "cohere", "cohere2", "glm", "glm4", "chatglm"})


@dataclass(frozen=True)
class RopeSpec:
    """What rotate_keys needs to know about a model's rotary embedding.

    Attributes:
        inv_freq: (R/2,) float32 inverse frequencies on the CPU.
        rotary_dim: R, the number of leading head dims that are rotated (R <= head_dim).
        head_dim: D.
        rope_type: "default", "linear", "llama3" or "yarn".
        attention_scaling: factor the model multiplies cos/sin with (already inside stored keys).
    """

    inv_freq: Tensor
    rotary_dim: int
    head_dim: int
    rope_type: str
    attention_scaling: float


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type parameters (e.g. {"full_attention": {...}, "sliding_attention": {...}}).
        types = {p.get("rope_type", p.get("type", "default")) for p in params.values()}
        if len(types) != 1:
            raise UnsupportedModelError(
                f"expected one rope type for all layers, found {sorted(types)}; "
                "models with per-layer rotary embeddings are not supported"
            )
        return types.pop()
    if isinstance(params, dict):
        return params.get("rope_type", params.get("type", "default")) or "default"
    return "default"


def check_attention_layout(config) -> None:
    """Refuse configs whose attention is not full causal attention in every layer.

    Raises:
        UnsupportedModelError: sliding-window or hybrid (sliding / linear / recurrent) layers.
    """
    config = _text_config(config)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise UnsupportedModelError(
                f"expected every layer to be 'full_attention', found layer types {other} "
                f"({getattr(config, 'model_type', '?')}); sliding-window and hybrid layers see a different "
                "context in block mode than in the block-masked reference, so they are not supported"
            )
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window is not None:
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos is None or window < max_pos:
            raise UnsupportedModelError(
                f"expected no sliding window, found sliding_window={window} "
                f"(max_position_embeddings={max_pos}); sliding-window attention is not supported. "
                "Set config.sliding_window=None if the model was trained without it"
            )


def _find_rotary_module(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), Tensor):
            return module
    return None


def rope_spec(model: nn.Module) -> RopeSpec:
    """Read the rotary facts of a loaded HF causal LM, refusing what cannot be re-encoded.

    Raises:
        UnsupportedModelError: no RoPE (e.g. GPT-2), a length-dependent rope type ("dynamic",
            "longrope"), an unknown rope type, interleaved rotary layout, sliding-window or hybrid layers.
    """
    config = _text_config(model.config)
    model_type = getattr(config, "model_type", type(model).__name__)
    check_attention_layout(config)
    rotary = _find_rotary_module(model)
    if rotary is None:
        raise UnsupportedModelError(
            f"expected a model with rotary position embeddings (RoPE), found {model_type} with none; "
            "block attention needs RoPE to move cached keys to new positions"
        )
    if model_type in _INTERLEAVED_ROPE_MODELS:
        raise UnsupportedModelError(
            f"expected rotate-half RoPE, found {model_type} which interleaves rotary dims; not supported"
        )
    rope_type = getattr(rotary, "rope_type", None) or _rope_type(config)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = (
            "its inverse frequencies change with sequence length, so a block encoded alone would not match"
            if rope_type in ("dynamic", "longrope")
            else "it is not a rope type blockrag knows how to re-encode"
        )
        raise UnsupportedModelError(
            f"expected rope type in {sorted(SUPPORTED_ROPE_TYPES)}, found {rope_type!r} ({model_type}); {why}"
        )
    inv_freq = rotary.inv_freq.detach().to("cpu", torch.float32).clone()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary_dim = 2 * inv_freq.numel()
    if rotary_dim > head_dim:
        raise UnsupportedModelError(f"expected rotary dims <= head_dim {head_dim}, found {rotary_dim}")
    return RopeSpec(
        inv_freq=inv_freq,
        rotary_dim=rotary_dim,
        head_dim=head_dim,
        rope_type=rope_type,
        attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
    )


def rotation_cos_sin(delta: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of delta * inv_freq, in float32, laid out for rotate_half.

    Args:
        delta: () or (T,) integer offsets.
        inv_freq: (R/2,) float32 inverse frequencies.

    Returns:
        cos, sin: (R,) or (T, R) float32.
    """
    angles = delta.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_keys(keys: Tensor, delta: int | Tensor, inv_freq: Tensor) -> Tensor:
    """Move RoPE keys from positions p to p + delta.

    Args:
        keys: (..., T, D) keys already rotated for their current positions (any float dtype).
        delta: int, () or (T,) offsets.
        inv_freq: (R/2,) float32 inverse frequencies; R = rotary dims <= D.

    Returns:
        (..., T, D) keys in the input dtype; dims R..D are returned unchanged.
    """
    delta = torch.as_tensor(delta, device=keys.device)
    cos, sin = rotation_cos_sin(delta, inv_freq.to(keys.device))
    rotary_dim = cos.shape[-1]
    rot = keys[..., :rotary_dim].float()
    half = rotary_dim // 2
    rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = (rot * cos + rotated_half * sin).to(keys.dtype)
    if rotary_dim == keys.shape[-1]:
        return out
    return torch.cat((out, keys[..., rotary_dim:]), dim=-1)


def rotate_half_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """``out = x`` rotated (rotate-half layout) by the angles of ``cos``/``sin``, written in place, no temporaries.

    Args:
        out: (..., D) destination, any strides, broadcast-compatible with ``x`` and ``cos``.
        x: (..., D) float32; dims past 2 * R/2 pass through.
        cos, sin: (..., R/2) float32, broadcast against x's leading dims.
    """
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    o1, o2 = out[..., :half], out[..., half : 2 * half]
    torch.mul(x1, cos, out=o1)  # x1 cos - x2 sin
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)  # x2 cos + x1 sin
    o2.addcmul_(x1, sin)
    if 2 * half < x.shape[-1]:
        out[..., 2 * half :] = x[..., 2 * half :]


def rotate_keys_into(out: Tensor, keys: Tensor, delta: int, inv_freq: Tensor) -> None:
    """``out[...] = rotate_keys(keys, delta, inv_freq)`` without intermediate tensors (float32 keys).

    Args:
        out: (..., T, D) destination, any strides (e.g. a block's slots in an assembled buffer).
        keys: (..., T, D) keys at their current positions, the dtype of ``out``.
        delta: the offset, one for all T tokens.
        inv_freq: (R/2,) float32 inverse frequencies.
    """
    if keys.dtype != torch.float32:  # NOTE: 16-bit keys are rotated in float32 and rounded once, as rotate_keys does
        out.copy_(rotate_keys(keys, delta, inv_freq))
        return
    cos, sin = rotation_cos_sin(torch.as_tensor(delta), inv_freq)
    half = inv_freq.numel()
    rotate_half_into(out, keys, cos[:half].to(keys.device), sin[:half].to(keys.device))


#: Relative error the probe allows: a few roundings of the dtype, for the computation of ONE layer. Measured
#: worst (CPU, SmolLM2-135M and the tiny test models): 3.2e-7 float32, 8.2e-4 float16, 6.1e-3 bfloat16; the
#: broken models of tests/test_probe.py measure 0.12 (yarn scaling applied twice) and up.
PROBE_TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 2.5e-3, torch.bfloat16: 2e-2}


class ProbeError(NamedTuple):
    """The probe's worst disagreement: ``error`` (relative) at ``where`` ("layer 3 keys", ...)."""

    error: float
    where: str


def _relative_error(found: Tensor, expected: Tensor) -> float:
    found, expected = found.float(), expected.float()
    return float((found - expected).norm() / expected.norm().clamp_min(1e-12))


@torch.inference_mode()
def reencoding_error(model: nn.Module, spec: RopeSpec, length: int = 12, delta: int = 29) -> ProbeError:
    """How far moving a block by ``delta`` is from encoding it ``delta`` positions later, layer by layer.

    The block is encoded twice, at positions 0..T-1 and at delta..delta+T-1. In the second pass every decoder
    layer is fed the hidden states it received in the first, so each layer is tested on its own: what it
    shows is how that one layer treats position, not low-precision rounding carried through the layers
    before it (in bfloat16 that drift alone reaches 0.3 relative error by layer 12 of SmolLM2-135M, whose
    keys rotate exactly). Per layer:

    * its cached keys must equal ``rotate_keys(keys at 0, delta)``: the rotation block attention applies;
    * its output (the next layer's input; the logits after the last layer) must not change: the layer sees
      position only relatively, so a block's hidden states do not depend on where it sits.

    The embedding (the first layer's input) must not change either.

    Returns:
        the worst relative error (Frobenius norms, float32) and where it is.
    """
    from blockrag.hf import forward, layer_inputs, stacked_kv

    device = next(model.parameters()).device
    ids = torch.arange(3, 3 + length, device=device)[None] % model.config.get_text_config().vocab_size

    def encode(offset: int, feed=None):
        positions = torch.arange(offset, offset + length, device=device)[None]
        with layer_inputs(model, feed) as inputs:
            logits, cache = forward(model, ids, position_ids=positions, logits_to_keep=1)
        return inputs, logits, torch.stack([k[0] for k in stacked_kv(cache)[0]])

    inputs, logits, keys = encode(0)
    moved_inputs, moved_logits, moved_keys = encode(delta, feed=inputs)
    expected_keys = rotate_keys(keys.float(), delta, spec.inv_freq)
    errors = [ProbeError(_relative_error(moved_keys[i], expected_keys[i]), f"layer {i} keys")
              for i in range(len(keys))]
    errors += [ProbeError(_relative_error(moved, original), "the embedding" if i == 0 else f"layer {i - 1} output")
               for i, (moved, original) in enumerate(zip(moved_inputs, inputs))]
    errors.append(ProbeError(_relative_error(moved_logits, logits), f"layer {len(keys) - 1} output (logits)"))
    return max(errors, key=lambda e: math.inf if math.isnan(e.error) else e.error)  # NaN is the worst


def verify_reencoding(model: nn.Module, spec: RopeSpec, length: int = 12, delta: int = 29) -> None:
    """The probe run at engine construction: ``reencoding_error`` within ``PROBE_TOLERANCE`` of the model's dtype.

    Raises:
        UnsupportedModelError: the model's position encoding is not what ``rotate_keys`` re-encodes.
    """
    dtype = next(model.parameters()).dtype
    tolerance = PROBE_TOLERANCE.get(dtype, PROBE_TOLERANCE[torch.bfloat16])
    error, where = reencoding_error(model, spec, length, delta)
    if not error <= tolerance:
        raise UnsupportedModelError(
            f"expected a block moved by rotating its cached keys to match the block encoded {delta} positions "
            f"later, layer by layer (relative error <= {tolerance} in {str(dtype).removeprefix('torch.')}), found "
            f"{error:.3g} at {where} for {model.config.model_type}; this model's position encoding cannot be "
            "re-encoded block by block"
        )
