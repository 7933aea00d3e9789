"""DiskKVStore: one safetensors file per KVBlock, named by its content key, with a checksum over the whole file.

File layout (safetensors): tensors ``keys`` and ``values`` (L, H, T, D), or with the fp8 codec e4m3 tensors
plus ``keys_scale`` / ``values_scale`` (L, H) float32. The header's ``__metadata__`` holds the format, the
block key, the model fingerprint, the dtype of the block as it was put (``float8_e4m3fn`` for a block that
was already quantized, see ``KVBlock.quantize``), both shapes, the token ids, the block text, the codec
and ``checksum``: sha256 of the complete file with the checksum's own digits set to zero. Any changed,
missing or extra byte (payload or header) is therefore detected before a block is handed out.

Files are written atomically (temp file, fsync, rename, fsync of the directory); a file is only ever
named ``<root>/<key[:2]>/<key>.safetensors``, where key is the block's content hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from blockrag.atomic import TEMP_PREFIX, atomic_write, pid_alive, temp_owner_pid
from blockrag.errors import InvalidInputError, KVBlockMismatchError
from blockrag.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8
from blockrag.kv import KVBlock
from blockrag.store.base import KVStore
from blockrag.store.errors import CorruptBlockError

logger = logging.getLogger("blockrag.store")

FORMAT = "blockrag-kv/1"
SUFFIX = ".safetensors"
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_ZERO_DIGEST = "sha256:" + "0" * 64
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float8_e4m3fn": FP8_DTYPE}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checksum_field(value: str) -> bytes:
    return b'"checksum":' + json.dumps(value).encode()


def encode_block(block: KVBlock, fp8: bool = False) -> bytearray:
    """Serialise a KVBlock to the bytes of one safetensors file (see the module docstring).

    Args:
        block: the block; a quantized one (fp8 with scales) is stored as it is.
        fp8: quantise a full-precision block to e4m3 with per-(layer, head) scales.
    """
    if _dtype_name(block.dtype) not in _DTYPES or (block.dtype == FP8_DTYPE) != block.quantized:
        raise InvalidInputError(f"expected KV dtype in {sorted(_DTYPES)} (fp8 only with scales), found {block.dtype}")
    keys, values = block.keys.detach().cpu().contiguous(), block.values.detach().cpu().contiguous()
    if block.quantized:
        fp8 = True
        tensors = {"keys": keys, "values": values, "keys_scale": block.key_scale.detach().cpu().float().contiguous(),
                   "values_scale": block.value_scale.detach().cpu().float().contiguous()}
    elif fp8:
        qk, sk = quantize_fp8(keys)
        qv, sv = quantize_fp8(values)
        tensors = {"keys": qk, "values": qv, "keys_scale": sk, "values_scale": sv}
    else:
        tensors = {"keys": keys, "values": values}
    metadata = {
        "format": FORMAT,
        "key": block.key,
        "fingerprint": block.fingerprint,
        "dtype": _dtype_name(block.dtype),
        "shape_keys": json.dumps(list(keys.shape)),
        "shape_values": json.dumps(list(values.shape)),
        "token_ids": json.dumps(list(block.token_ids)),
        "codec": "fp8_e4m3" if fp8 else "none",
        "checksum": _ZERO_DIGEST,
    }
    if block.text is not None:
        metadata["text"] = block.text
    data = bytearray(st_save(tensors, metadata=metadata))
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    placeholder = _checksum_field(_ZERO_DIGEST)
    pos = data.find(placeholder, 0, header_end)
    assert pos >= 0 and data.find(placeholder, pos + 1, header_end) < 0, "checksum placeholder must be unique"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    data[pos:pos + len(placeholder)] = _checksum_field(digest)
    return data


def _parse_header(data: bytes | bytearray) -> tuple[dict, int]:
    if len(data) < 8:
        raise CorruptBlockError(f"expected a safetensors file of at least 8 bytes, found {len(data)} bytes")
    size = struct.unpack("<Q", data[:8])[0]
    if 8 + size > len(data):
        raise CorruptBlockError(f"expected a header of {size} bytes, found a file of {len(data)} bytes (truncated)")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptBlockError(f"expected a JSON header, found undecodable bytes ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CorruptBlockError("expected a header with __metadata__, found none")
    return header, 8 + size


def _verify_checksum(data: bytes | bytearray, metadata: dict, header_end: int) -> None:
    stated = metadata.get("checksum")
    if not isinstance(stated, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", stated):
        raise CorruptBlockError(f"expected a 'sha256:<64 hex>' checksum in the header, found {stated!r}")
    field = _checksum_field(stated)
    view = memoryview(data)
    pos = data.find(field, 0, header_end)
    if pos < 0 or data.find(field, pos + 1, header_end) >= 0:
        raise CorruptBlockError("expected the checksum field exactly once in the header, found it altered")
    h = hashlib.sha256()
    h.update(view[:pos])
    h.update(_checksum_field(_ZERO_DIGEST))
    h.update(view[pos + len(field):])
    found = "sha256:" + h.hexdigest()
    if found != stated:
        raise CorruptBlockError(f"expected checksum {stated[7:19]}…, found {found[7:19]}… (file content changed)")


def decode_block(data: bytes | bytearray, key: str | None = None, fingerprint: str | None = None,
                 dequantize: bool = True) -> KVBlock:
    """Parse and verify one KV file.

    Args:
        data: the complete file.
        key: the key the file is stored under (checked against the header), if known.
        fingerprint: the model fingerprint the caller expects, if any.
        dequantize: return an fp8 block in the dtype it was put with; False (or a block that was put
            already quantized) returns it quantized, with its scales (see ``KVBlock.quantized``).

    Raises:
        CorruptBlockError: truncated, checksum mismatch, malformed or self-contradicting header.
        KVBlockMismatchError: a sound file whose fingerprint is not ``fingerprint``.
    """
    header, header_end = _parse_header(data)
    meta = header["__metadata__"]
    if meta.get("format") != FORMAT:
        raise CorruptBlockError(f"expected format {FORMAT!r}, found {meta.get('format')!r}")
    _verify_checksum(data, meta, header_end)
    if key is not None and meta.get("key") != key:
        raise CorruptBlockError(f"expected a block with key {key[:12]}…, found key {str(meta.get('key'))[:12]}…")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise KVBlockMismatchError(
            f"KV file {str(meta.get('key'))[:12]}… was encoded by model fingerprint "
            f"{str(meta.get('fingerprint'))[:12]}, this store holds blocks of {fingerprint[:12]}; "
            "it is never used for this model"
        )
    dtype = _DTYPES.get(meta.get("dtype", ""))
    if dtype is None:
        raise CorruptBlockError(f"expected a dtype in {sorted(_DTYPES)}, found {meta.get('dtype')!r}")
    try:
        tensors = st_load(bytes(data) if isinstance(data, bytearray) else data)
        token_ids = tuple(int(t) for t in json.loads(meta["token_ids"]))
        shapes = (json.loads(meta["shape_keys"]), json.loads(meta["shape_values"]))
    except (SafetensorError, KeyError, TypeError, ValueError) as e:
        raise CorruptBlockError(f"expected a readable block, found {type(e).__name__}: {e}") from None
    codec = meta.get("codec")
    if codec == "fp8_e4m3":
        expected = {"keys": FP8_DTYPE, "values": FP8_DTYPE, "keys_scale": torch.float32, "values_scale": torch.float32}
    elif codec == "none":
        expected = {"keys": dtype, "values": dtype}
    else:
        raise CorruptBlockError(f"expected codec 'none' or 'fp8_e4m3', found {codec!r}")
    found = {name: t.dtype for name, t in tensors.items()}
    if found != expected or (dtype == FP8_DTYPE and codec != "fp8_e4m3"):
        raise CorruptBlockError(f"expected tensors {expected} (fp8 only with scales), found {found}")
    keys, values = tensors["keys"], tensors["values"]
    if [list(keys.shape), list(values.shape)] != list(shapes) or keys.dim() != 4 or \
            keys.shape[:3] != values.shape[:3] or keys.shape[2] != len(token_ids):
        raise CorruptBlockError(
            f"expected shapes {shapes} with T = {len(token_ids)} token ids, found {list(keys.shape)} and "
            f"{list(values.shape)}"
        )
    scales = {}
    if codec == "fp8_e4m3" and dequantize and dtype != FP8_DTYPE:
        keys = dequantize_fp8(keys, tensors["keys_scale"], dtype)
        values = dequantize_fp8(values, tensors["values_scale"], dtype)
    elif codec == "fp8_e4m3":
        scales = {"key_scale": tensors["keys_scale"], "value_scale": tensors["values_scale"]}
    return KVBlock(keys=keys, values=values, token_ids=token_ids, fingerprint=meta["fingerprint"], key=meta["key"],
                   text=meta.get("text"), **scales)


class DiskKVStore(KVStore):
    """KV blocks as files under ``root``, one per content key.

    Args:
        root: directory (created if missing).
        fp8: store new blocks as e4m3 with per-(layer, head) scales (lossy; about half of bf16, a quarter
            of fp32). Blocks that are already quantized (``KVBlock.quantize``) are stored as they are.
        dequantize: return fp8 blocks in the dtype they were put with (default); False returns them
            quantized, with scales, for the engine to dequantise while assembling (half the bytes to move).
        fingerprint: if given, only blocks of this model fingerprint are accepted by ``put`` and returned by
            ``get``; a file of another model under a key of this store is treated as damaged.
        strict: on a damaged or wrong-model file, ``get`` raises instead of discarding it and returning None
            (which makes the caller recompute the block).
        max_bytes: byte budget of the block files; past it the least recently used files are deleted (down to
            90% of the budget), so a miss later recomputes them. Recency is the file's mtime, refreshed on
            every hit, so it holds across processes and restarts. None: unbounded.
    """

    def __init__(self, root: str | os.PathLike, *, fp8: bool = False, fingerprint: str | None = None,
                 strict: bool = False, dequantize: bool = True, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise InvalidInputError(f"expected max_bytes >= 1 (or None for no budget), found {max_bytes}")
        self.root = Path(root)
        self.tmp_dir = self.root / ".tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.fp8 = fp8
        self.fingerprint = fingerprint
        self.strict = strict
        self.dequantize = dequantize
        self._lock = threading.Lock()
        self.discarded: dict[str, int] = {"corrupt": 0, "wrong_model": 0}
        self.max_bytes = max_bytes
        self.evicted = 0
        self._evict_lock = threading.Lock()
        self._bytes = self.usage()["bytes"] if max_bytes is not None else 0

    def __repr__(self) -> str:
        budget = f", max_bytes={self.max_bytes}" if self.max_bytes is not None else ""
        return f"DiskKVStore({str(self.root)!r}, fp8={self.fp8}, strict={self.strict}{budget})"

    def path_of(self, key: str) -> Path:
        """File of a key. Keys are content hashes (64 hex digits); anything else is refused."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise InvalidInputError(f"expected a block key of 64 lowercase hex digits, found {key!r}")
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def get(self, key: str) -> KVBlock | None:
        path = self.path_of(key)
        try:
            with open(path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            block = decode_block(data, key=key, fingerprint=self.fingerprint, dequantize=self.dequantize)
            if self.max_bytes is not None:
                self._touch(path)
            return block
        except (CorruptBlockError, KVBlockMismatchError) as e:
            kind = "wrong_model" if isinstance(e, KVBlockMismatchError) else "corrupt"
            if self.strict:
                raise type(e)(f"{path}: {e}; refusing it (strict mode)") from None
            logger.warning("discarding KV file %s (%s); the block will be recomputed", path, e)
            with self._lock:
                self.discarded[kind] += 1
            self._discard(path, inode)
            return None

    def _discard(self, path: Path, inode: int) -> None:
        # NOTE: only remove the file we read; a writer may have renamed a good one over it meanwhile.
        try:
            if os.stat(path).st_ino == inode:
                path.unlink()
        except FileNotFoundError:
            pass

    def put(self, block: KVBlock) -> None:
        path = self.path_of(block.key)
        if self.fingerprint is not None and block.fingerprint != self.fingerprint:
            raise KVBlockMismatchError(
                f"KVBlock {block.key[:12]} was encoded by model fingerprint {block.fingerprint[:12]}, this store "
                f"holds blocks of {self.fingerprint[:12]}; encode it with the store's model"
            )
        if path.exists():
            return  # same key, same content
        data = encode_block(block, self.fp8)
        if self.max_bytes is not None and len(data) > self.max_bytes:
            logger.warning("block %s (%d bytes) exceeds the disk budget of %d bytes; not stored", block.key[:12],
                           len(data), self.max_bytes)
            return
        if not path.parent.is_dir():
            path.parent.mkdir(exist_ok=True)
        atomic_write(path, data, tmp_dir=self.tmp_dir)
        if self.max_bytes is not None:
            with self._lock:
                self._bytes += len(data)
                over = self._bytes > self.max_bytes
            if over:
                self._evict(keep=block.key)

    def _touch(self, path: Path) -> None:
        try:
            os.utime(path)
        except FileNotFoundError:
            pass  # evicted meanwhile (by this or another process)

    def _evict(self, keep: str) -> None:
        """Delete least recently used files until the store is at 90% of its budget (never ``keep``)."""
        if not self._evict_lock.acquire(blocking=False):
            return  # another thread is evicting already
        try:
            # NOTE: rescan rather than trust the running total: other processes write and evict too.
            files = []
            for key in self.keys():
                try:
                    st = self.path_of(key).stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime_ns, st.st_size, key))
            total = sum(size for _, size, _ in files)
            target = int(self.max_bytes * 0.9)
            for _, size, key in sorted(files):
                if total <= target:
                    break
                if key == keep:
                    continue
                if self.delete(key):
                    self.evicted += 1
                total -= size
            with self._lock:
                self._bytes = total
        finally:
            self._evict_lock.release()

    def contains(self, key: str) -> bool:
        return self.path_of(key).exists()

    def delete(self, key: str) -> bool:
        try:
            self.path_of(key).unlink()
        except FileNotFoundError:
            return False
        return True

    # --- maintenance -----------------------------------------------------------------------------

    def keys(self) -> Iterator[str]:
        """Every key with a file (complete files only: temp files live elsewhere)."""
        for sub in sorted(self.root.iterdir()):
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                name = entry.name
                if name.endswith(SUFFIX) and _KEY_RE.fullmatch(name[: -len(SUFFIX)]):
                    yield name[: -len(SUFFIX)]

    def usage(self) -> dict[str, int]:
        """Number of block files and their total bytes."""
        files = total = 0
        for key in self.keys():
            try:
                total += self.path_of(key).stat().st_size
                files += 1
            except FileNotFoundError:
                continue
        return {"blocks": files, "bytes": total}

    def temp_files(self) -> list[Path]:
        return [p for p in self.tmp_dir.iterdir() if p.name.startswith(TEMP_PREFIX)]

    def clean_temp(self) -> int:
        """Remove temp files left by processes that no longer run; returns how many were removed."""
        removed = 0
        for path in self.temp_files():
            pid = temp_owner_pid(path.name)
            if pid is not None and pid_alive(pid):
                continue  # still being written (this process or another live one)
            path.unlink(missing_ok=True)
            removed += 1
        return removed
