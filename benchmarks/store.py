"""KV store throughput (memory, disk, disk + fp8) and knowledge-base ingest throughput on this machine.

Store: N blocks of one passage each, shape (L, H, T, D) of a real model (default Qwen2.5-0.5B: 24 layers,
2 KV heads, head dim 64; 512 tokens), random values. put = serialise + checksum + atomic write (fsync) for
disk; get = read + verify checksum + parse (+ dequantise for fp8). MB/s counts the block's logical bytes
(keys + values in the model dtype), so fp8 rows are comparable with the others; the "on disk" column is the
file size. The memory store keeps references (no copy): its rows show the per-call overhead only. Disk reads
are from the page cache unless --drop-caches works (root, not in a container).

Ingest: KnowledgeBase.add_documents end to end (chunk, encode KV, write, embed with all-MiniLM-L6-v2, SQLite,
FAISS) on a generated corpus, with the tiny random model and with a random model of Qwen2.5-0.5B shape;
tokens/s counts passage-block tokens whose KV was encoded. Encode and embed are also timed alone.

    python benchmarks/store.py                       # prints a table, ends with one JSON line
    python benchmarks/store.py --out benchmarks/results/store_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockrag import BlockEngine, KVBlock  # noqa: E402
from blockrag.index import Document, Embedder, KnowledgeBase  # noqa: E402
from blockrag.store import DiskKVStore, MemoryKVStore, dequantize_fp8, quantize_fp8  # noqa: E402
from blockrag.testing import build_tokenizer, tiny_pipeline  # noqa: E402

SHAPES = {"qwen05b": (24, 2, 64), "llama8b": (32, 8, 128)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WORDS = ("harbour pier kelp tonnes winter island ferry lighthouse keeper storm granite quarry railway station "
         "signal bridge river weir salmon meadow village church bell tower market square bakery rye loaf").split()


def device_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_blocks(n: int, shape: tuple[int, int, int, int], dtype: torch.dtype) -> list[KVBlock]:
    g = torch.Generator().manual_seed(0)
    blocks = []
    for i in range(n):
        keys = torch.randn(*shape, generator=g).to(dtype)
        values = torch.randn(*shape, generator=g).to(dtype)
        blocks.append(KVBlock(keys=keys, values=values, token_ids=tuple(range(shape[2])), fingerprint="bench" * 4,
                              key=f"{i + 1:064x}"))
    return blocks


def time_store(store, blocks, cold: bool) -> dict:
    """Seconds for put of every block, then get of every block (each get fully read and verified)."""
    start = time.perf_counter()
    for b in blocks:
        store.put(b)
    put_s = time.perf_counter() - start
    dropped = drop_caches() if cold else False
    start = time.perf_counter()
    for b in blocks:
        got = store.get(b.key)
        assert got is not None and got.keys.shape == b.keys.shape
    get_s = time.perf_counter() - start
    return {"put_s": put_s, "get_s": get_s, "cold_read": dropped}


def bench_stores(args) -> list[dict]:
    L, H, D = SHAPES[args.shape]
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        blocks = make_blocks(args.blocks, (L, H, args.tokens, D), dtype)
        logical = sum(b.nbytes for b in blocks)
        for name in ("memory", "disk", "disk+fp8"):
            root = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.tmp))
            try:
                store = MemoryKVStore(max_bytes=4 * logical) if name == "memory" else \
                    DiskKVStore(root, fp8=name == "disk+fp8")
                result = time_store(store, blocks, cold=args.drop_caches and name != "memory")
                on_disk = store.usage()["bytes"] if name != "memory" else logical
            finally:
                shutil.rmtree(root, ignore_errors=True)
            rows.append({"store": name, "dtype": dtype_name, "blocks": len(blocks),
                         "block_mb": logical / len(blocks) / 1e6, "put_mb_s": logical / 1e6 / result["put_s"],
                         "get_mb_s": logical / 1e6 / result["get_s"],
                         "put_ms_per_block": 1e3 * result["put_s"] / len(blocks),
                         "get_ms_per_block": 1e3 * result["get_s"] / len(blocks),
                         "on_disk_ratio": on_disk / logical, "cold_read": result["cold_read"]})
        q, s = quantize_fp8(blocks[0].keys)
        back = dequantize_fp8(q, s, dtype)
        x = blocks[0].keys.float()
        err = (back.float() - x).abs()
        rows[-1]["fp8_max_abs_error"] = float(err.max())
        rows[-1]["fp8_max_error_over_amax"] = float((err.amax(dim=(2, 3)) / x.abs().amax(dim=(2, 3))).max())
        rows[-1]["fp8_relative_error"] = float((back.float() - x).norm() / x.norm())
    return rows


def corpus(n_docs: int, words_per_doc: int) -> list[Document]:
    import random

    rng = random.Random(0)
    docs = []
    for i in range(n_docs):
        sentences = []
        while sum(len(s.split()) for s in sentences) < words_per_doc:
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
        docs.append(Document(" ".join(sentences), id=f"doc-{i}", title=f"Document {i}"))
    return docs


def qwen05b_random(tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, bos_token_id=3, eos_token_id=2, pad_token_id=4)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def bench_ingest(args, embedder: Embedder) -> list[dict]:
    rows = []
    for model_name in args.ingest_models:
        if model_name == "tiny-random":
            model, tokenizer = tiny_pipeline("llama")
            docs = corpus(args.docs, args.words)
        else:
            tokenizer = build_tokenizer()
            model = qwen05b_random(tokenizer)
            docs = corpus(max(2, args.docs // 32), args.words)
        engine = BlockEngine(model, tokenizer, template="chat")
        path = Path(tempfile.mkdtemp(prefix="bench-kb-", dir=args.tmp)) / "kb"
        try:
            with KnowledgeBase.create(path, engine, embedder, chunk_tokens=args.chunk_tokens, chunk_overlap=0) as kb:
                report = kb.add_documents(docs, progress=False)
                hits = kb.search(docs[0].text[:80], 4)
                passages = [row["text"] for row in kb.docstore.iter_passages()]
            encode_texts = passages[: max(4, len(passages) // 4)]
            engine.store = MemoryKVStore()
            start = time.perf_counter()
            blocks = engine.encode(encode_texts)
            encode_s = time.perf_counter() - start
            encode_tokens = sum(b.num_tokens for b in blocks)
            start = time.perf_counter()
            embedder.embed(passages)
            embed_s = time.perf_counter() - start
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
        assert hits and report.passages_added == len(passages)
        rows.append({"model": model_name, "documents": report.documents_added, "passages": report.passages_added,
                     "tokens": report.tokens_encoded, "seconds": report.seconds,
                     "ingest_tokens_s": report.tokens_encoded / report.seconds,
                     "encode_only_tokens_s": encode_tokens / encode_s,
                     "embed_only_passages_s": len(passages) / embed_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen05b", help="(L, H, D) of the stored blocks")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per block")
    parser.add_argument("--blocks", type=int, default=16, help="blocks per store measurement")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES),
                        help="KV dtypes to measure")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before disk reads (root)")
    parser.add_argument("--docs", type=int, default=64, help="documents in the tiny-model ingest corpus")
    parser.add_argument("--words", type=int, default=400, help="words per generated document")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="chunk size for the ingest runs")
    parser.add_argument("--ingest-models", nargs="*", default=["tiny-random", "qwen2.5-0.5b-shape-random"],
                        help="models for the ingest runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--tmp", default=None, help="directory for temporary stores (default: system temp)")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    stores = bench_stores(args)
    embedder = Embedder()
    ingest = bench_ingest(args, embedder)
    load_after = os.getloadavg()

    L, H, D = SHAPES[args.shape]
    print(f"device: {device_name()} | torch {torch.__version__} | {args.threads} threads | load average "
          f"{load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"blocks: {args.shape} shape (L={L}, H={H}, T={args.tokens}, D={D}), {args.blocks} per run")
    print(f"{'store':<10} {'dtype':<9} {'MB/block':>8} {'put MB/s':>9} {'get MB/s':>9} {'put ms':>8} {'get ms':>8} "
          f"{'on disk':>8}")
    for r in stores:
        put, get = (f"{r['put_mb_s']:>9.0f}", f"{r['get_mb_s']:>9.0f}") if r["store"] != "memory" else \
            (f"{'no copy':>9}", f"{'no copy':>9}")
        print(f"{r['store']:<10} {r['dtype']:<9} {r['block_mb']:>8.2f} {put} {get} "
              f"{r['put_ms_per_block']:>8.2f} {r['get_ms_per_block']:>8.2f} {r['on_disk_ratio']:>8.3f}")
        if "fp8_max_abs_error" in r:
            print(f"{'':<10} fp8 error vs {r['dtype']}: max abs {r['fp8_max_abs_error']:.4f} (<= "
                  f"{r['fp8_max_error_over_amax']:.4f} x amax of its (layer, head)), "
                  f"relative {r['fp8_relative_error']:.4f}")
    print(f"\ningest (chunk {args.chunk_tokens} tokens, embedder all-MiniLM-L6-v2)")
    print(f"{'model':<28} {'docs':>5} {'passages':>8} {'tokens':>8} {'seconds':>8} {'ingest tok/s':>12} "
          f"{'encode tok/s':>12} {'embed pass/s':>12}")
    for r in ingest:
        print(f"{r['model']:<28} {r['documents']:>5} {r['passages']:>8} {r['tokens']:>8} {r['seconds']:>8.2f} "
              f"{r['ingest_tokens_s']:>12.0f} {r['encode_only_tokens_s']:>12.0f} {r['embed_only_passages_s']:>12.1f}")
    result = {"benchmark": "store", "device": device_name(), "torch": torch.__version__, "threads": args.threads,
              "commit": commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "load_average": [load_before[0], load_after[0]],
              "block_shape": {"model": args.shape, "L": L, "H": H, "T": args.tokens, "D": D}, "stores": stores,
              "ingest": ingest}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
