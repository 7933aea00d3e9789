"""KV stores: disk format (checksum, header, atomic writes), fp8, tiered promotion, URL factory."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import threading

import pytest
import torch
from kb_helpers import torch_threads

from blockrag import InvalidInputError, KVBlock, KVBlockMismatchError
from blockrag import atomic as atomic_module
from blockrag.atomic import TEMP_PREFIX, atomic_write
from blockrag.store import (
    CorruptBlockError,
    DiskKVStore,
    MemoryKVStore,
    StoreURLError,
    StoreWriteError,
    TieredKVStore,
    create_store,
    dequantize_fp8,
    quantize_fp8,
)
from blockrag.store.disk import decode_block, encode_block


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield

PASSAGE = "Block attention caches each passage on its own; 東京は日本の首都です 🚀."


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine("llama")


@pytest.fixture(scope="module")
def block(engine) -> KVBlock:
    return engine.encode([PASSAGE])[0]


def small_block(fingerprint: str = "f" * 32, key: str = "a" * 64, dtype=torch.float32, seed: int = 0) -> KVBlock:
    """A tiny block (L=2, H=2, T=3, D=4): small enough to corrupt every byte of its file."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 2, 3, 4, generator=g).to(dtype)
    values = torch.randn(2, 2, 3, 4, generator=g).to(dtype)
    return KVBlock(keys=keys, values=values, token_ids=(5, 6, 7), fingerprint=fingerprint, key=key, text="abc")


def assert_same_block(a: KVBlock, b: KVBlock) -> None:
    assert (a.key, a.fingerprint, a.token_ids, a.text) == (b.key, b.fingerprint, b.token_ids, b.text)
    assert a.keys.dtype == b.keys.dtype and a.values.dtype == b.values.dtype
    torch.testing.assert_close(a.keys.cpu(), b.keys.cpu(), atol=0, rtol=0)
    torch.testing.assert_close(a.values.cpu(), b.values.cpu(), atol=0, rtol=0)


# --- disk format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disk_roundtrip_is_exact_and_named_by_content_key(tmp_path, block, dtype):
    store = DiskKVStore(tmp_path)
    b = KVBlock(keys=block.keys.to(dtype), values=block.values.to(dtype), token_ids=block.token_ids,
                fingerprint=block.fingerprint, key=block.key, text=block.text)
    assert store.get(b.key) is None and not store.contains(b.key)
    store.put(b)
    assert store.contains(b.key) and b.key in store
    path = tmp_path / b.key[:2] / f"{b.key}.safetensors"
    assert path.is_file() and list(store.keys()) == [b.key]
    assert_same_block(store.get(b.key), b)
    # The header says what the block is, without loading tensors.
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    meta = json.loads(path.read_bytes()[8:8 + size])["__metadata__"]
    assert meta["fingerprint"] == b.fingerprint and meta["key"] == b.key
    assert json.loads(meta["token_ids"]) == list(b.token_ids)
    assert json.loads(meta["shape_keys"]) == list(b.keys.shape) and meta["dtype"] == str(dtype)[6:]
    assert meta["checksum"].startswith("sha256:") and len(meta["checksum"]) == 71
    assert store.delete(b.key) and not store.delete(b.key) and store.get(b.key) is None


def test_keys_must_be_content_hashes(tmp_path):
    store = DiskKVStore(tmp_path)
    for bad in ["../../etc/passwd", "A" * 64, "abc", "g" * 64, ""]:
        with pytest.raises(InvalidInputError, match="64 lowercase hex"):
            store.get(bad)


def test_every_single_byte_change_is_detected():
    data = encode_block(small_block())
    decode_block(data, key="a" * 64)  # negative control: the intact file decodes
    for pos in range(len(data)):
        for flip in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[pos] ^= flip
            with pytest.raises(CorruptBlockError):
                decode_block(bytes(damaged), key="a" * 64)


def test_truncation_and_appended_bytes_are_detected():
    data = encode_block(small_block())
    for length in range(len(data)):
        with pytest.raises(CorruptBlockError):
            decode_block(data[:length], key="a" * 64)
    with pytest.raises(CorruptBlockError, match="checksum"):
        decode_block(data + b"\x00", key="a" * 64)


def test_a_file_under_another_key_is_refused():
    data = encode_block(small_block(key="b" * 64))
    with pytest.raises(CorruptBlockError, match="expected a block with key aaaa"):
        decode_block(data, key="a" * 64)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_store_discards_damaged_file_or_refuses_in_strict_mode(tmp_path, block, damage, caplog):
    store = DiskKVStore(tmp_path, fingerprint=block.fingerprint)
    store.put(block)
    path = store.path_of(block.key)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray(os.urandom(len(data)))
    path.write_bytes(bytes(data))
    strict = DiskKVStore(tmp_path, fingerprint=block.fingerprint, strict=True)
    with pytest.raises(CorruptBlockError, match="strict"):
        strict.get(block.key)
    assert path.exists()  # strict mode leaves the evidence
    assert store.get(block.key) is None
    assert not path.exists() and store.discarded["corrupt"] == 1
    assert "discarding KV file" in caplog.text
    store.put(block)  # recomputed block replaces it
    assert_same_block(store.get(block.key), block)


def test_wrong_model_block_is_never_returned(tmp_path, block, make_engine, tokenizer):
    from blockrag import BlockEngine
    from blockrag.testing import tiny_model

    other = BlockEngine(tiny_model("llama", vocab_size=len(tokenizer), seed=1), tokenizer)
    assert other.fingerprint != block.fingerprint
    foreign = other.encode([PASSAGE])[0]
    assert foreign.key != block.key  # keys include the fingerprint: a legitimate file can never collide
    store = DiskKVStore(tmp_path, fingerprint=block.fingerprint)
    with pytest.raises(KVBlockMismatchError, match="fingerprint"):
        store.put(foreign)
    # A file of the other model placed under this model's key (copied or renamed by hand).
    forged = KVBlock(keys=foreign.keys, values=foreign.values, token_ids=foreign.token_ids,
                     fingerprint=foreign.fingerprint, key=block.key, text=foreign.text)
    store.path_of(block.key).parent.mkdir(parents=True, exist_ok=True)
    store.path_of(block.key).write_bytes(encode_block(forged))
    with pytest.raises(KVBlockMismatchError, match="never used"):
        DiskKVStore(tmp_path, fingerprint=block.fingerprint, strict=True).get(block.key)
    assert store.get(block.key) is None and store.discarded["wrong_model"] == 1
    assert not store.contains(block.key)


# --- fp8 -----------------------------------------------------------------------------------------

def test_fp8_error_bound_and_bytes_saved(tmp_path, engine, block):
    """Per-element error <= amax(layer, head) / 16; file about 1/4 of fp32 and 1/2 of bf16 (reported)."""
    g = torch.Generator().manual_seed(0)
    spiky = torch.randn(2, 2, 64, 16, generator=g)
    spiky[0, 1, 3, 5] = 300.0  # an outlier only widens its own (layer, head) scale
    for x in (block.keys, block.values, spiky):
        q, scale = quantize_fp8(x)
        assert q.dtype == torch.float8_e4m3fn and scale.shape == x.shape[:2]
        back = dequantize_fp8(q, scale, x.dtype)
        bound = x.abs().amax(dim=(2, 3), keepdim=True) / 16
        assert ((back - x).abs() <= bound + 1e-12).all()
        assert (back - x).abs().max() > 0  # lossy: the test can fail if quantisation were skipped
    q, scale = quantize_fp8(spiky)
    other_head = (dequantize_fp8(q, scale, torch.float32) - spiky)[0, 0].abs().max()
    assert other_head <= spiky[0, 0].abs().max() / 16

    exact, fp8 = DiskKVStore(tmp_path / "exact"), DiskKVStore(tmp_path / "fp8", fp8=True)
    exact.put(block)
    fp8.put(block)
    got = fp8.get(block.key)
    assert got.dtype == block.dtype and got.token_ids == block.token_ids
    rel = float((got.keys - block.keys).norm() / block.keys.norm())
    max_abs = float((got.keys - block.keys).abs().max())
    ratio = fp8.usage()["bytes"] / exact.usage()["bytes"]
    payload = block.keys.numel() * 2
    print(f"\nfp8 KV: max abs error {max_abs:.4g} (keys amax {float(block.keys.abs().max()):.3g}), "
          f"relative error {rel:.4f}; file {fp8.usage()['bytes']} vs {exact.usage()['bytes']} bytes fp32 "
          f"({ratio:.3f}); payload {payload} vs {payload * 4} bytes fp32 / {payload * 2} bf16")
    assert rel < 0.04
    assert ratio < 0.4  # header (token ids, text) included; the payload alone is exactly 1/4
    # The lossy blocks still drive the engine: logits move, but little.
    ref = engine.prefill([block], "Which city?").logits
    out = engine.prefill([got], "Which city?").logits
    drift = float((out - ref).abs().max())
    assert 0 < drift < 0.1 * float(ref.abs().max())


# --- memory, tiered, factory ---------------------------------------------------------------------

def test_tiered_promotes_on_hit_and_writes_through(tmp_path, block):
    front, back = MemoryKVStore(), DiskKVStore(tmp_path)
    tiered = TieredKVStore(front, back)
    back.put(block)
    assert not front.contains(block.key) and tiered.contains(block.key)
    assert_same_block(tiered.get(block.key), block)
    assert front.contains(block.key)  # promoted
    other = small_block(key="c" * 64)
    tiered.put(other)
    assert front.contains(other.key) and back.contains(other.key)
    assert tiered.delete(other.key) and not front.contains(other.key) and not back.contains(other.key)
    assert tiered.get_many([block.key, "d" * 64])[1] is None


def test_tiered_write_errors_raise_or_are_tolerated(tmp_path, block, monkeypatch):
    def full(*args, **kwargs):
        raise StoreWriteError(errno.ENOSPC, "no space left on device")

    back = DiskKVStore(tmp_path)
    monkeypatch.setattr(back, "put", full)
    with pytest.raises(StoreWriteError):
        TieredKVStore(MemoryKVStore(), back).put(block)
    tolerant = TieredKVStore(MemoryKVStore(), back, tolerate_write_errors=True)
    tolerant.put(block)
    assert tolerant.front.contains(block.key)


def test_create_store_urls(tmp_path):
    memory = create_store("memory://?max_bytes=1M")
    assert isinstance(memory, MemoryKVStore) and memory.max_bytes == 1 << 20
    disk = create_store(f"disk://{tmp_path}/kv?fp8=1&strict=true")
    assert isinstance(disk, DiskKVStore) and disk.fp8 and disk.strict and disk.root == tmp_path / "kv"
    plain = create_store(str(tmp_path / "plain"))
    assert isinstance(plain, DiskKVStore) and not plain.fp8
    tiered = create_store(f"tiered://{tmp_path}/t?max_bytes=2G&fp8=0")
    assert isinstance(tiered, TieredKVStore) and tiered.front.max_bytes == 2 << 30
    assert isinstance(tiered.back, DiskKVStore) and tiered.back.root == tmp_path / "t"
    for bad, message in [("s3://bucket", "scheme"), ("memory://?max_bytes=lots", "size"),
                         (f"disk://{tmp_path}?fp8=maybe", "fp8=1"), (f"disk://{tmp_path}?colour=red", "unknown option"),
                         ("disk://", "directory"), ("", "store URL")]:
        with pytest.raises(StoreURLError, match=message):
            create_store(bad)


# --- atomic writes, temp files, threads ----------------------------------------------------------

def _fail_after(limit: int, target_dir):
    """An os.write that writes up to ``limit`` bytes into files under target_dir, then fails with ENOSPC."""
    real_write = os.write
    written = {"n": 0}

    def write(fd, data):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not path.startswith(str(target_dir)):
            return real_write(fd, data)
        room = limit - written["n"]
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data[:room]))
        written["n"] += n
        return n

    return write


def test_disk_full_leaves_no_partial_file(tmp_path, block, monkeypatch):
    store = DiskKVStore(tmp_path)
    monkeypatch.setattr(atomic_module.os, "write", _fail_after(1000, tmp_path))
    with pytest.raises(StoreWriteError, match="no space left on device") as info:
        store.put(block)
    assert info.value.errno == errno.ENOSPC
    assert not store.contains(block.key) and store.temp_files() == []
    monkeypatch.undo()
    store.put(block)
    assert_same_block(store.get(block.key), block)


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write(target, b"old" * 1000)
    monkeypatch.setattr(atomic_module.os, "write", _fail_after(10, tmp_path))
    with pytest.raises(StoreWriteError):
        atomic_write(target, b"new" * 1000)
    assert target.read_bytes() == b"old" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_clean_temp_removes_only_files_of_dead_processes(tmp_path):
    store = DiskKVStore(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = store.tmp_dir / f"{TEMP_PREFIX}{dead.pid}-0123456789ab-x.safetensors"
    live = store.tmp_dir / f"{TEMP_PREFIX}{os.getpid()}-0123456789ab-y.safetensors"
    stale.write_bytes(b"partial")
    live.write_bytes(b"in flight")
    assert store.clean_temp() == 1
    assert not stale.exists() and live.exists()


def test_concurrent_puts_and_gets_never_see_partial_blocks(tmp_path):
    store = DiskKVStore(tmp_path)
    blocks = [small_block(key=f"{i:064x}", seed=i) for i in range(6)]
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for round_ in range(30):
                b = blocks[(seed + round_) % len(blocks)]
                if round_ % 3 == 0:
                    store.delete(b.key)
                store.put(b)
                got = store.get(b.key)
                if got is not None:
                    assert_same_block(got, b)
        except BaseException as e:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert store.discarded == {"corrupt": 0, "wrong_model": 0}
    assert store.temp_files() == []


def test_quantized_blocks_are_stored_as_they_are_and_fp8_can_stay_quantized(tmp_path, engine, block):
    quantized = block.quantize()
    plain = DiskKVStore(tmp_path / "plain")
    plain.put(quantized)
    got = plain.get(block.key)
    assert got.quantized and got.keys.dtype == torch.float8_e4m3fn
    for a, b in [(got.keys, quantized.keys), (got.values, quantized.values), (got.key_scale, quantized.key_scale),
                 (got.value_scale, quantized.value_scale)]:
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    # An fp8 store hands blocks out dequantised (default) or quantized; the engine accepts both, same logits.
    fp8 = DiskKVStore(tmp_path / "fp8", fp8=True)
    fp8.put(block)
    loaded = fp8.get(block.key)
    raw = DiskKVStore(tmp_path / "fp8", fp8=True, dequantize=False).get(block.key)
    assert not loaded.quantized and loaded.dtype == block.dtype and raw.quantized
    assert raw.nbytes < loaded.nbytes / 3
    a = engine.prefill([loaded], "Which city?").logits
    b = engine.prefill([raw], "Which city?").logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert isinstance(create_store(f"disk://{tmp_path}/x?fp8=1&dequantize=0"), DiskKVStore)
    assert not create_store(f"disk://{tmp_path}/x?fp8=1&dequantize=0").dequantize


def test_same_device_compares_type_and_index():
    from blockrag.kv import same_device

    assert same_device(torch.device("cpu"), torch.device("cpu")) and same_device(torch.device("cpu"), "cpu")
    assert same_device(torch.device("cuda", 1), torch.device("cuda", 1))
    assert not same_device(torch.device("cuda", 0), torch.device("cuda", 1))  # controls: another index, type
    assert not same_device(torch.device("cpu"), torch.device("cuda", 0)) and not same_device("cuda:0", "cpu")
