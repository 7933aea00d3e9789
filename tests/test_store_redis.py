"""RedisKVStore on a real redis-server: same bytes and checks as the disk store, tolerant of an outage."""

from __future__ import annotations

import logging
import uuid

import pytest
import torch

redis = pytest.importorskip("redis")

from redis_helpers import RedisProcess, shared_redis_url  # noqa: E402

from blockrag.errors import KVBlockMismatchError  # noqa: E402
from blockrag.kv import KVBlock  # noqa: E402
from blockrag.store import DiskKVStore, MemoryKVStore, TieredKVStore, create_store  # noqa: E402
from blockrag.store.disk import encode_block  # noqa: E402
from blockrag.store.errors import CorruptBlockError, StoreURLError  # noqa: E402
from blockrag.store.redis import RedisKVStore  # noqa: E402


@pytest.fixture(scope="module")
def redis_url():
    yield from shared_redis_url()


@pytest.fixture
def store(redis_url):
    s = create_store(f"{redis_url}?prefix=test-{uuid.uuid4().hex[:8]}:")
    yield s
    for key in s.keys():
        s.delete(key)
    s.close()


def _block(seed: int, fingerprint: str = "f" * 64, tokens: int = 5, dtype=torch.float32) -> KVBlock:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 2, tokens, 8, generator=g).to(dtype)
    values = torch.randn(2, 2, tokens, 8, generator=g).to(dtype)
    key = f"{seed:064x}"
    return KVBlock(keys=keys, values=values, token_ids=tuple(range(tokens)), fingerprint=fingerprint, key=key,
                   text=f"passage {seed}")


def test_round_trip_same_bytes_as_disk(store, tmp_path):
    block = _block(1)
    store.put(block)
    got = store.get(block.key)
    torch.testing.assert_close(got.keys, block.keys, rtol=0, atol=0)
    torch.testing.assert_close(got.values, block.values, rtol=0, atol=0)
    assert got.token_ids == block.token_ids and got.text == block.text and got.fingerprint == block.fingerprint
    raw = store.client.get(store.name_of(block.key))
    disk = DiskKVStore(tmp_path)  # the disk store's file format: its value, written as a file, reads back
    disk.path_of(block.key).parent.mkdir(parents=True)
    disk.path_of(block.key).write_bytes(raw)
    torch.testing.assert_close(disk.get(block.key).keys, block.keys, rtol=0, atol=0)
    assert store.contains(block.key) and block.key in store.keys()
    assert store.delete(block.key) and store.get(block.key) is None


def test_get_many_is_one_round_trip(store, monkeypatch):
    blocks = [_block(i) for i in range(10, 16)]
    store.put_many(blocks)
    calls = []
    original = store.client.mget
    monkeypatch.setattr(store.client, "mget", lambda names: calls.append(len(names)) or original(names))
    missing = f"{999:064x}"
    got = store.get_many([b.key for b in blocks] + [missing])
    assert calls == [7]
    assert [g.key for g in got[:-1]] == [b.key for b in blocks] and got[-1] is None


def test_fp8_and_ttl(redis_url):
    s = create_store(f"{redis_url}?prefix=fp8-{uuid.uuid4().hex[:8]}:&fp8=1&ttl=60")
    block = _block(3)
    s.put(block)
    assert 0 < s.client.ttl(s.name_of(block.key)) <= 60
    got = s.get(block.key)
    assert got.dtype == torch.float32
    err = (got.keys - block.keys).abs().max()
    assert 0 < err <= block.keys.abs().amax() / 16  # e4m3 bound; not bit-exact (negative control: it is lossy)
    s.delete(block.key)
    s.close()


def test_damaged_value_is_dropped_never_served(store, caplog):
    block = _block(4)
    store.put(block)
    name = store.name_of(block.key)
    raw = bytearray(store.client.get(name))
    raw[-3] ^= 0x01  # one bit of the payload
    store.client.set(name, bytes(raw))
    with caplog.at_level(logging.WARNING, logger="blockrag.store"):
        assert store.get(block.key) is None
    assert "discarding" in caplog.text and store.counts["corrupt"] == 1
    assert store.client.get(name) is None  # dropped, so the next put stores a good copy
    store.put(block)
    assert store.get(block.key) is not None


def test_wrong_key_and_wrong_model_refused(store, redis_url):
    block = _block(5)
    store.client.set(store.name_of(f"{6:064x}"), bytes(encode_block(block)))  # a valid file under another key
    assert store.get(f"{6:064x}") is None and store.counts["corrupt"] == 1
    scoped = RedisKVStore(redis_url, prefix=store.prefix, fingerprint="a" * 64)
    with pytest.raises(KVBlockMismatchError):
        scoped.put(block)
    store.put(block)
    assert scoped.get(block.key) is None and scoped.counts["wrong_model"] == 1
    strict = RedisKVStore(redis_url, prefix=store.prefix, strict=True)
    store.client.set(store.name_of(block.key), b"garbage")
    with pytest.raises(CorruptBlockError):
        strict.get(block.key)


def test_url_options_refused(redis_url):
    with pytest.raises(StoreURLError):
        create_store(f"{redis_url}?ttl=soon")
    with pytest.raises(StoreURLError):
        create_store(f"{redis_url}?colour=blue")


def test_back_tier_of_a_tiered_store(store):
    front = MemoryKVStore()
    tiered = TieredKVStore(front, store)
    block = _block(7)
    tiered.put(block)
    assert store.get(block.key) is not None
    other = TieredKVStore(MemoryKVStore(), store)  # another process's tiered store over the same Redis
    assert other.get(block.key).key == block.key and other.front.contains(block.key)


def test_outage_is_a_miss_with_one_warning_then_hits_resume(caplog):
    with RedisProcess() as server:
        s = RedisKVStore(server.url, retry_interval_s=0.2, socket_timeout_s=0.5)
        block = _block(8)
        s.put(block)
        assert s.get(block.key) is not None
        server.kill()
        with caplog.at_level(logging.WARNING, logger="blockrag.store"):
            assert s.get(block.key) is None
            s.put(_block(9))  # skipped, no exception
            assert s.get_many([block.key, block.key]) == [None, None]
        assert caplog.text.count("unavailable") == 1 and s.counts["unavailable"] >= 1
        server.start()  # same port, empty (no persistence)
        import time

        time.sleep(0.25)
        assert s.get(block.key) is None  # reachable again: a true miss
        s.put(block)
        assert s.get(block.key) is not None
        assert "reachable again" in caplog.text or s.available
        s.close()


def test_disk_byte_budget_evicts_least_recently_used(tmp_path):
    size = len(encode_block(_block(0)))
    disk = create_store(f"disk://{tmp_path}?max_bytes={size * 4}")
    blocks = [_block(i) for i in range(20, 24)]
    for b in blocks:
        disk.put(b)
    assert all(disk.contains(b.key) for b in blocks)
    import os
    import time

    for i, b in enumerate(blocks):  # make recency explicit (mtime resolution can be coarse)
        os.utime(disk.path_of(b.key), ns=(time.time_ns(), time.time_ns() - (10 - i) * 10**9))
    assert disk.get(blocks[0].key) is not None  # a hit refreshes the oldest one
    disk.put(_block(24))  # over budget: evict down to 90% -> the two least recently used go
    assert disk.usage()["bytes"] <= size * 4 * 0.9 + 1
    assert disk.contains(blocks[0].key) and disk.contains(f"{24:064x}")
    assert not disk.contains(blocks[1].key) and not disk.contains(blocks[2].key)
    assert disk.evicted == 2 and disk.get(blocks[1].key) is None  # a miss: the caller recomputes
    unbounded = DiskKVStore(tmp_path / "u")
    for b in blocks:
        unbounded.put(b)
    assert unbounded.usage()["blocks"] == 4  # negative control: no budget, nothing evicted
