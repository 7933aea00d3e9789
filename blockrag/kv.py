"""KVBlock (one block's cached keys and values), its content key, and the model fingerprint.

Block-Attention blocks do not depend on what precedes them, so a block's key is a hash of the model
fingerprint, the template version and the block's own token ids: no chained prefix hashes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from blockrag.errors import KVBlockMismatchError

# Config fields that name files, classes or versions rather than the computation ("architectures" is only
# written by save_pretrained, so a saved and reloaded model would otherwise look like another model).
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "torch_dtype",
                         "dtype", "_attn_implementation", "_attn_implementation_autoset", "use_cache",
                         "architectures"}


def block_key(fingerprint: str, template_version: str, token_ids: Sequence[int]) -> str:
    """Content address of a block: sha256 over fingerprint, template version and token ids."""
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(b"\x00")
    h.update(template_version.encode())
    h.update(b"\x00")
    h.update(torch.as_tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _config_digest(config) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _vocab_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def _weights_digest(model: nn.Module, samples: int = 64) -> str:
    """Cheap hash of a few slices of a few weights (first, middle and last parameter)."""
    params = [p for p in model.parameters() if p.numel() > 0]
    h = hashlib.sha256()
    for p in (params[0], params[len(params) // 2], params[-1]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(flat[::step][:samples].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: nn.Module, tokenizer, kv_dtype: torch.dtype) -> str:
    """Identity of everything that decides a block's KV: config (incl. rope), vocab, KV dtype, weights."""
    parts = (_config_digest(model.config), _vocab_digest(tokenizer), str(kv_dtype), _weights_digest(model))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class KVBlock:
    """Cached keys and values of one block, encoded alone at positions 0..T-1.

    Attributes:
        keys: (L, H, T, D) keys after RoPE for positions 0..T-1.
        values: (L, H, T, Dv) values.
        token_ids: the T token ids the KV was computed from.
        fingerprint: model fingerprint of the encoder.
        key: content key (see ``block_key``).
        text: the block text, when known.
        key_scale, value_scale: (L, H) float32 scales when keys/values are stored as fp8 (e4m3); the
            block then stands for ``keys * key_scale`` (see ``quantize``). The GPU paths dequantise while
            gathering, so an fp8 block moves half the bytes to the device.
    """

    keys: Tensor
    values: Tensor
    token_ids: tuple[int, ...]
    fingerprint: str
    key: str
    text: str | None = None
    key_scale: Tensor | None = None
    value_scale: Tensor | None = None

    def __post_init__(self) -> None:
        assert self.keys.dim() == 4 and self.values.dim() == 4, "keys/values must be (L, H, T, D)"
        assert self.keys.shape[:3] == self.values.shape[:3], "keys and values disagree on (L, H, T)"
        assert self.keys.shape[2] == len(self.token_ids), "T must equal the number of token ids"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def quantized(self) -> bool:
        return self.key_scale is not None

    def quantize(self) -> KVBlock:
        """This block with fp8 (e4m3) keys and values and per-(layer, head) scales."""
        from blockrag.fp8 import quantize_fp8

        if self.quantized:
            return self
        keys, key_scale = quantize_fp8(self.keys)
        values, value_scale = quantize_fp8(self.values)
        return replace(self, keys=keys, values=values, key_scale=key_scale, value_scale=value_scale)

    def dequantize(self, dtype: torch.dtype) -> KVBlock:
        """This block with ``dtype`` keys and values (itself if not quantized)."""
        from blockrag.fp8 import dequantize_fp8

        if not self.quantized:
            return self
        return replace(self, keys=dequantize_fp8(self.keys, self.key_scale, dtype),
                       values=dequantize_fp8(self.values, self.value_scale, dtype), key_scale=None, value_scale=None)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def nbytes(self) -> int:
        scales = 0 if not self.quantized else 4 * (self.key_scale.numel() + self.value_scale.numel())
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size() + scales

    def to(self, device: torch.device | str, non_blocking: bool = False) -> KVBlock:
        scales = {}
        if self.quantized:
            scales = dict(key_scale=self.key_scale.to(device, non_blocking=non_blocking),
                          value_scale=self.value_scale.to(device, non_blocking=non_blocking))
        return replace(
            self,
            keys=self.keys.to(device, non_blocking=non_blocking),
            values=self.values.to(device, non_blocking=non_blocking),
            **scales,
        )


def same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, treating "cuda" and "cuda:<current>" as the same."""
    if isinstance(a, torch.device) and a == b:  # NOTE: the common case, checked per block and request, stays cheap
        return True
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda" or (a.index is not None and b.index is not None):
        return a == b
    return (a.index if a.index is not None else torch.cuda.current_device()) == (
        b.index if b.index is not None else torch.cuda.current_device())


def check_block(block: KVBlock, fingerprint: str, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a block that was not encoded by this engine's model, dtype and device.

    Blocks on the CPU are accepted for any device (they are copied over: the host tier); a block on
    another accelerator is not silently moved.

    Raises:
        KVBlockMismatchError: with what was expected and what was found.
    """
    if block.fingerprint != fingerprint:
        raise KVBlockMismatchError(
            f"KVBlock {block.key[:12]} was encoded by model fingerprint {block.fingerprint[:12]}, engine has "
            f"{fingerprint[:12]}; re-encode it with this model (re-run ingest or recompute)"
        )
    if block.dtype != dtype and not block.quantized:
        raise KVBlockMismatchError(
            f"KVBlock {block.key[:12]} has dtype {block.dtype}, engine expects {dtype} (or fp8 with scales)")
    if block.device.type != "cpu" and not same_device(block.device, device):
        raise KVBlockMismatchError(
            f"KVBlock {block.key[:12]} is on device {block.device}, engine runs on {device}; "
            "move it with block.to(device) or keep stored blocks on the CPU"
        )
