"""RedisKVStore: KV blocks in Redis (or Valkey), shared by every process and machine that points at it.

Same content keys and the same bytes as the disk store: each block is one safetensors file (``encode_block``)
with its sha256 checksum and model fingerprint, stored as the value of ``<prefix><key>``. A value that fails
its checks is never handed out. Reads are one round trip for any number of keys (MGET), writes one pipeline;
``SET NX`` skips keys already present (same key, same content). Expiry (``ttl``) is optional; eviction under
memory pressure is left to Redis's ``maxmemory-policy`` (e.g. ``allkeys-lru``).

Redis is a cache here, never the source of truth: if it cannot be reached, ``get`` reports a miss and ``put``
skips the write (a warning is logged once per outage, then again when it is back), so a server keeps answering
by recomputing blocks. For ``retry_interval_s`` after a failure the store does not try again, so an outage
costs no connect timeout per request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence

from blockrag.errors import KVBlockMismatchError
from blockrag.kv import KVBlock
from blockrag.store.base import KVStore
from blockrag.store.disk import _KEY_RE, decode_block, encode_block
from blockrag.store.errors import CorruptBlockError, StoreURLError

logger = logging.getLogger("blockrag.store")

DEFAULT_PREFIX = "blockrag:kv:"


class RedisKVStore(KVStore):
    """KV blocks as Redis values under ``prefix + key``.

    Args:
        url: a redis-py URL (``redis://host:port/db``, ``rediss://`` for TLS, ``unix:///path.sock``).
        prefix: namespace for this store's keys (several stores can share one Redis).
        ttl_s: expire each block this many seconds after it was written (None: never).
        fp8: store new blocks as e4m3 with per-(layer, head) scales (lossy, half the bytes of bf16).
        fingerprint: if given, only blocks of this model fingerprint are accepted and returned.
        strict: raise on a damaged or wrong-model value instead of dropping it (which makes the caller recompute).
        dequantize: return fp8 blocks in the dtype they were put with (default).
        socket_timeout_s: longest wait for Redis on one call before it counts as unavailable.
        retry_interval_s: after a failure, report misses without trying for this long.
        client: an existing redis.Redis client (url is then ignored).
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = DEFAULT_PREFIX,
                 ttl_s: int | None = None, fp8: bool = False, fingerprint: str | None = None, strict: bool = False,
                 dequantize: bool = True, socket_timeout_s: float = 2.0, retry_interval_s: float = 1.0,
                 client=None) -> None:
        try:
            import redis
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError("the redis store needs redis-py: pip install 'blockrag[serve]' (or redis)",
                                      name=e.name) from e
        if ttl_s is not None and ttl_s < 1:
            raise StoreURLError(f"expected ttl >= 1 second, found {ttl_s}")
        self._errors = (redis.RedisError, OSError)
        self.url = url
        self.client = client if client is not None else redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            health_check_interval=30)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.fp8 = fp8
        self.fingerprint = fingerprint
        self.strict = strict
        self.dequantize = dequantize
        self.retry_interval_s = retry_interval_s
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down = False
        self.counts: dict[str, int] = {"unavailable": 0, "corrupt": 0, "wrong_model": 0}

    def __repr__(self) -> str:
        return f"RedisKVStore({self._safe_url()!r}, prefix={self.prefix!r}, ttl_s={self.ttl_s}, fp8={self.fp8})"

    def _safe_url(self) -> str:
        return self.url.split("@", 1)[-1] if "@" in self.url else self.url  # NOTE: never log a password

    def name_of(self, key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise CorruptBlockError(f"expected a block key of 64 lowercase hex digits, found {key!r}")
        return self.prefix + key

    # --- availability ---------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while the store is backing off after a failure."""
        return time.monotonic() >= self._down_until

    def _failed(self, error: Exception) -> None:
        with self._lock:
            self.counts["unavailable"] += 1
            self._down_until = time.monotonic() + self.retry_interval_s
            first = not self._down
            self._down = True
        if first:
            logger.warning("Redis KV store %s unavailable (%s: %s); serving without it (blocks are recomputed) "
                           "and retrying every %.1f s", self._safe_url(), type(error).__name__, error,
                           self.retry_interval_s)

    def _succeeded(self) -> None:
        if self._down:
            with self._lock:
                was_down, self._down = self._down, False
            if was_down:
                logger.warning("Redis KV store %s reachable again", self._safe_url())

    def _call(self, fn, default):
        if not self.available:
            return default
        try:
            result = fn()
        except self._errors as e:
            self._failed(e)
            return default
        self._succeeded()
        return result

    # --- KVStore --------------------------------------------------------------------------------------

    def _decode(self, key: str, data: bytes | None) -> KVBlock | None:
        if data is None:
            return None
        try:
            return decode_block(data, key=key, fingerprint=self.fingerprint, dequantize=self.dequantize)
        except (CorruptBlockError, KVBlockMismatchError) as e:
            kind = "wrong_model" if isinstance(e, KVBlockMismatchError) else "corrupt"
            if self.strict:
                raise type(e)(f"Redis key {self.prefix}{key}: {e}; refusing it (strict mode)") from None
            logger.warning("discarding Redis value %s%s (%s); the block will be recomputed", self.prefix, key[:12], e)
            with self._lock:
                self.counts[kind] += 1
            # NOTE: delete only the damaged bytes: a writer may have replaced them with a good value meanwhile.
            self._call(lambda: self._delete_if_equal(self.name_of(key), data), None)
            return None

    def _delete_if_equal(self, name: str, data: bytes) -> None:
        from redis.exceptions import WatchError

        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(name)
                if pipe.get(name) == data:
                    pipe.multi()
                    pipe.delete(name)
                    pipe.execute()
            except WatchError:
                pass  # changed meanwhile: keep the new value

    def get(self, key: str) -> KVBlock | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[KVBlock | None]:
        if not keys:
            return []
        names = [self.name_of(key) for key in keys]
        values = self._call(lambda: self.client.mget(names), [None] * len(keys))
        return [self._decode(key, data) for key, data in zip(keys, values)]

    def _check(self, block: KVBlock) -> None:
        if self.fingerprint is not None and block.fingerprint != self.fingerprint:
            raise KVBlockMismatchError(
                f"KVBlock {block.key[:12]} was encoded by model fingerprint {block.fingerprint[:12]}, this store "
                f"holds blocks of {self.fingerprint[:12]}; encode it with the store's model")

    def put(self, block: KVBlock) -> None:
        self.put_many([block])

    def put_many(self, blocks: Iterable[KVBlock]) -> None:
        blocks = list(blocks)
        if not blocks or not self.available:
            return
        for block in blocks:
            self._check(block)
        payloads = [(self.name_of(b.key), bytes(encode_block(b, self.fp8))) for b in blocks]

        def write() -> None:
            with self.client.pipeline(transaction=False) as pipe:
                for name, data in payloads:
                    pipe.set(name, data, ex=self.ttl_s, nx=True)
                pipe.execute()

        self._call(write, None)

    def contains(self, key: str) -> bool:
        return bool(self._call(lambda: self.client.exists(self.name_of(key)), 0))

    def delete(self, key: str) -> bool:
        return bool(self._call(lambda: self.client.delete(self.name_of(key)), 0))

    def keys(self) -> list[str]:
        """Every block key under this store's prefix (SCAN; for maintenance and tests)."""
        found = self._call(lambda: list(self.client.scan_iter(match=self.prefix + "*", count=1000)), [])
        out = []
        for name in found:
            key = name.decode() if isinstance(name, bytes) else name
            key = key[len(self.prefix):]
            if _KEY_RE.fullmatch(key):
                out.append(key)
        return out

    def close(self) -> None:
        try:
            self.client.close()
        except self._errors:
            pass
