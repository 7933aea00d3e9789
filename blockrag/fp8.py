"""fp8 (e4m3) storage of KV tensors with one scale per (layer, head), dequantised on load.

e4m3 keeps 3 mantissa bits: after scaling a (layer, head) slice so that its largest magnitude maps to 448
(the largest finite e4m3 value), each element is off by at most 2^-4 of its own magnitude (normal range)
or 2^-9 of the scale (subnormal range), so |error| <= amax(layer, head) / 16.
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Quantise to e4m3 with per-(layer, head) scales.

    Args:
        x: (L, H, T, D) keys or values, any float dtype.

    Returns:
        (q, scale): q (L, H, T, D) float8_e4m3fn; scale (L, H) float32 with x ~= q * scale.
    """
    assert x.dim() == 4, "expected (L, H, T, D)"
    xf = x.float()
    amax = xf.abs().amax(dim=(2, 3))
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (xf / scale[:, :, None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of quantize_fp8: (L, H, T, D) e4m3 and (L, H) float32 scales -> (L, H, T, D) ``dtype``."""
    return (q.float() * scale.float()[:, :, None, None]).to(dtype)
