"""create_store(url): a KV store from a URL. Implementations are registered by scheme and imported lazily.

    memory://?max_bytes=2G&device=cuda     LRU in memory, bounded by bytes, on any torch device
    disk:///var/kv?fp8=1&strict=1          one safetensors file per block under /var/kv
                                           (dequantize=0: hand fp8 blocks out quantized; max_bytes=50G:
                                           least recently used files deleted past the budget)
    tiered:///var/kv?max_bytes=4G&fp8=1    memory in front of disk, promotion on hit (disk_max_bytes=...)
    redis://host:6379/0?prefix=kv:&ttl=3600   shared by processes and machines (also rediss://, fp8, strict)

A plain path (no scheme) means disk. Relative paths: ``disk://kv`` or ``disk://./kv``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from blockrag.store.base import KVStore
from blockrag.store.errors import StoreURLError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_size(text: str) -> int:
    """'2G' -> 2147483648; plain numbers are bytes."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise StoreURLError(f"expected a size such as 512M or 2G, found {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _flag(params: dict[str, str], name: str) -> bool:
    value = params.pop(name, "0").lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise StoreURLError(f"expected {name}=1 or {name}=0, found {name}={value!r}")


def _memory(path: str, params: dict[str, str]) -> KVStore:
    from blockrag.store.memory import MemoryKVStore

    kwargs = {}
    if "max_bytes" in params:
        kwargs["max_bytes"] = parse_size(params.pop("max_bytes"))
    return MemoryKVStore(device=params.pop("device", None), **kwargs)


def _disk(path: str, params: dict[str, str]) -> KVStore:
    from blockrag.store.disk import DiskKVStore

    if not path:
        raise StoreURLError("expected a directory in the disk URL (disk:///abs/path or disk://rel/path), found none")
    dequantize = _flag(params, "dequantize") if "dequantize" in params else True
    max_bytes = parse_size(params.pop("max_bytes")) if "max_bytes" in params else None
    return DiskKVStore(path, fp8=_flag(params, "fp8"), strict=_flag(params, "strict"), dequantize=dequantize,
                       fingerprint=params.pop("fingerprint", None), max_bytes=max_bytes)


def _tiered(path: str, params: dict[str, str]) -> KVStore:
    from blockrag.store.tiered import TieredKVStore

    memory_params = {k: params.pop(k) for k in ("max_bytes", "device") if k in params}
    if "disk_max_bytes" in params:
        params["max_bytes"] = params.pop("disk_max_bytes")
    return TieredKVStore(_memory("", memory_params), _disk(path, params))


def _redis_scheme(scheme: str) -> Callable[[str, dict[str, str]], KVStore]:
    def build(path: str, params: dict[str, str]) -> KVStore:
        from blockrag.store.redis import DEFAULT_PREFIX, RedisKVStore

        ttl = params.pop("ttl", None)
        if ttl is not None and not ttl.isdigit():
            raise StoreURLError(f"expected ttl in whole seconds (ttl=3600), found ttl={ttl!r}")
        dequantize = _flag(params, "dequantize") if "dequantize" in params else True
        return RedisKVStore(f"{scheme}://{path or '127.0.0.1:6379/0'}", prefix=params.pop("prefix", DEFAULT_PREFIX),
                            ttl_s=int(ttl) if ttl is not None else None, fp8=_flag(params, "fp8"),
                            strict=_flag(params, "strict"), dequantize=dequantize,
                            fingerprint=params.pop("fingerprint", None))

    return build


SCHEMES: dict[str, Callable[[str, dict[str, str]], KVStore]] = {
    "memory": _memory,
    "disk": _disk,
    "tiered": _tiered,
    "redis": _redis_scheme("redis"),
    "rediss": _redis_scheme("rediss"),
}


def create_store(url: str) -> KVStore:
    """A KVStore from a URL (see the module docstring for schemes and options).

    Raises:
        StoreURLError: unknown scheme or option, or a malformed value.
    """
    if not isinstance(url, str) or not url.strip():
        raise StoreURLError(f"expected a store URL such as memory:// or disk:///path, found {url!r}")
    if "://" not in url:
        url = "disk://" + url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise StoreURLError(f"expected a store scheme in {sorted(SCHEMES)}, found {parts.scheme!r} in {url!r}")
    path = parts.netloc + parts.path
    raw = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    params = {k: v[-1] for k, v in raw.items()}
    store = SCHEMES[scheme](path, params)
    if params:
        store.close()
        raise StoreURLError(f"unknown option(s) {sorted(params)} for {scheme}:// in {url!r}")
    return store
