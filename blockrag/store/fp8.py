"""Re-export of the fp8 codec, which lives in the leaf module ``blockrag.fp8`` (kv uses it without the stores)."""

from blockrag.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8, quantize_fp8

__all__ = ["FP8_DTYPE", "FP8_MAX", "dequantize_fp8", "quantize_fp8"]
