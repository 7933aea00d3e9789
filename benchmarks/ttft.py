"""Time-to-first-token: full prefill vs block mode, through BlockEngine.prefill (the path users call).

GPU (default when CUDA is present): Llama-3.1-8B shape (32 layers, 32 heads, 8 KV heads, head dim 128,
llama3 rope scaling), random bf16 weights, passages of ~512 tokens, a ~64-token question, totals
4K/8K/16K/32K. Columns, all measured in this run:
  full            one causal prefill over all ids (mode="full", HF sdpa)
  block-naive     block mode, eager rotation + HF sdpa attention (the path before the fast path)
  block-gpu       block mode, KV resident on the GPU (Triton gather+rotate, GQA-native attention)
  block-host      block mode, KV in pinned host memory (layer-wise pipelined copies)
  block-host-fp8  the same with fp8 (e4m3) KV and per-(layer, head) scales, dequantised while gathering
  block-graph     block-gpu with the final-block forward replayed from a CUDA graph (cuda_graphs=...): blocks
                  gathered into the static buffer, the Triton split-KV attention over it
                  (blockrag.kernels.final_block_attention), RMSNorm and rotary as fused kernels (blockrag.fused)
  block-graph-unfused  the same graph with RMSNorm and the rotary embedding captured as the model's own kernels
                  (fuse=False), the previous graph path
  block-graph-in-place  the same graph reading the blocks where they are stored through a segment table
                  (read_in_place=True, blockrag.kernels.table_attention): nothing is copied before the first token
  block-graph-flash  the same graph with the previous attention (flash varlen over 4K chunks + causal tail +
                  log-sum-exp merge), same run, for the side-by-side comparison
  block-graph-host      bf16 blocks from pinned host memory through the graph path: copies go group of 4
                  layers by group on a side stream, each graph piece (4 layers) waits for its group
  block-graph-host-fp8  the same with fp8 blocks
  block-graph-host(-fp8)-serial  the previous graph host path, same run: copy everything, then replay
  block-disk-cold      blocks (bf16) in a DiskKVStore with the page cache of every file dropped
                  (posix_fadvise DONTNEED) before each repeat; the keys are known (retrieval returned), reader
                  threads read, verify and upload each block as soon as it is read, then the graph path
  block-disk-cold-fp8  the same with the store's fp8 codec (read quantized, dequantised while gathering)
  graph_replay    GPU time of the captured forward alone (replay, no host work around it), both attentions
  attn_layer      one layer's attention at this context alone, each version captured in a CUDA graph
  floor           (weights + KV bytes) / measured device bandwidth (host: KV bytes / measured H2D bandwidth);
                  device bandwidth = a large device-to-device copy's (read + write) bytes per second
CPU (--cpu or no CUDA): Qwen2.5-0.5B shape, fp32, totals 1K/2K/4K, full vs block.

Prints a table, writes a PNG plot and a JSON file (``--out``), and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockrag import BlockEngine, BlockTemplate  # noqa: E402
from blockrag.testing import build_tokenizer  # noqa: E402

TEMPLATE = BlockTemplate(prefix="System: {instruction}\n", passage="{text}\n", final="Question: {question}\nAnswer:",
                         instruction="Answer from the passages.", bos=False, name="bench")


def llama8b_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192}, tie_word_embeddings=False)


def qwen05b_config(vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True)


def build_model(config, dtype, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def passage_texts(tokenizer, count: int, tokens: int, seed: int = 0) -> list[str]:
    """Texts of ``tokens`` tokens each (content does not matter for timing).

    Made of whole words the tokenizer holds as single tokens, so re-tokenizing a text gives back as many
    tokens as it was built from.
    """
    g = torch.Generator().manual_seed(seed)
    words = sorted({tokenizer.decode([i]) for i in range(len(tokenizer))})
    words = [w for w in words if w.startswith(" ") and w[1:].isalpha()
             and len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    texts = []
    for _ in range(count):
        picks = torch.randint(len(words), (tokens,), generator=g).tolist()
        texts.append("".join(words[j] for j in picks))
    return texts


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_bandwidth(device) -> tuple[float, float]:
    """(device-to-device GB/s counting read+write, pinned host-to-device GB/s), measured."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    d2d = 2 * x.numel() / median_time(lambda: y.copy_(x), 10) / 1e9
    h = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    h2d = h.numel() / median_time(lambda: y.copy_(h, non_blocking=True), 5) / 1e9
    return d2d, h2d


def commit() -> str:
    """BLOCKRAG_COMMIT if set (a copy without .git inside another checkout would report that one), else git's."""
    if os.environ.get("BLOCKRAG_COMMIT"):
        return os.environ["BLOCKRAG_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "?"
    except OSError:
        return "?"


def breakdown(engine, gpu_blocks, host_blocks, repeats: int) -> dict:
    """Where block-mode TTFT goes: assembling the cache from GPU-resident blocks, and from host blocks
    (transfer + gather + rotation, all layers); the rest of block-mode TTFT is the final-block forward."""
    from blockrag.assemble import assemble_cache

    prefix = engine.source_blocks([engine.prefix_ids()], [None])[0]
    capacity = len(engine.final_ids("question " * 60))

    def assemble(blocks, path):
        cache, n = assemble_cache(prefix + blocks, engine.rope, engine.model.config, engine.device,
                                  capacity=capacity, path=path)
        return cache, n

    def from_host():
        cache, _ = assemble(host_blocks, "host")
        for layer in cache.layers:
            layer._before_use()
            layer._before_use = None

    return {"assemble_gpu_ms": 1e3 * median_time(lambda: assemble(gpu_blocks, "gpu"), repeats),
            "assemble_host_ms": 1e3 * median_time(from_host, repeats)}


def replay_ms(engine) -> float:
    """Median GPU time of the last-used captured graph's replay (events around the replay only)."""
    import triton.testing

    captured = next(iter(engine.graphs._graphs.values()))

    def replay():
        for graph in captured.graphs:  # the pieces, in order
            graph.replay()

    return triton.testing.do_bench(replay, warmup=25, rep=200, return_mode="median")


def attention_layer_us(context: int, final: int, bucket: int = 96) -> dict:
    """One layer's final-block attention (32 q heads, 8 KV heads, head dim 128, bf16), each version captured
    in its own CUDA graph, median microseconds: the split-KV kernel vs flash varlen + tail + merge."""
    import triton.testing

    from blockrag.graphs import GraphState, graph_attention
    from blockrag.kernels import split_meta

    device = torch.device("cuda")
    chunk, chunks = 4096, -(-context // 4096)
    q = torch.randn(1, bucket, 32, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, 8, chunks * chunk + bucket, 128, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    used = (context - torch.arange(chunks) * chunk).clamp(0, chunk)
    rows = 4 * bucket
    flash = GraphState(chunk=chunk, seqused=used.to(torch.int32).to(device), valid=(used > 0).to(device),
                       cu_q=torch.arange(0, (chunks + 1) * rows, rows, dtype=torch.int32, device=device),
                       cu_k=torch.arange(0, (chunks + 1) * chunk, chunk, dtype=torch.int32, device=device),
                       tail=torch.arange(context, context + bucket, device=device))
    split = dataclasses.replace(flash, meta=torch.tensor(split_meta(context, final, 16), dtype=torch.int32,
                                                         device=device), max_splits=16)
    out = {}
    for name, state in (("attn_layer_triton_us", split), ("attn_layer_flash_us", flash)):
        graph_attention(q, k, v, 128 ** -0.5, state)  # compile / select kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_attention(q, k, v, 128 ** -0.5, state)
        out[name] = 1e3 * triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    return out


def _drop_page_cache(paths) -> None:
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_tier(engine, gpu_blocks, question: str, root: Path, repeats: int) -> dict:
    """TTFT with the context blocks on disk and a cold page cache, bf16 and fp8 stores.

    The clock starts when the block keys are known (retrieval has returned); 8 reader threads read, verify
    and upload each block (prefetch), then the graph path runs over the device-resident blocks. Also
    reported: the same with a warm page cache, and the cold read rate alone (file bytes / s).
    """
    out = {}
    for fp8 in (False, True):
        out.update(_disk_tier_one(engine, gpu_blocks, question, root, repeats, fp8))
    return out


def _disk_tier_one(engine, gpu_blocks, question, root, repeats, fp8) -> dict:
    import shutil
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from blockrag.store.disk import DiskKVStore

    tag = "_fp8" if fp8 else ""
    folder = Path(tempfile.mkdtemp(dir=root))
    try:
        store = DiskKVStore(folder, fp8=fp8, dequantize=False)
        for b in gpu_blocks:
            store.put(b.to("cpu"))
        keys = [b.key for b in gpu_blocks]
        paths = [store.path_of(k) for k in keys]
        file_bytes = sum(p.stat().st_size for p in paths)

        def fetch(key):
            return store.get(key).to(engine.device)

        cold, warm, reads = [], [], []
        with ThreadPoolExecutor(max_workers=8) as pool:
            engine.prefill(list(pool.map(fetch, keys)), question)  # warm-up: graph captured, threads started
            for _ in range(repeats):
                _drop_page_cache(paths)
                torch.cuda.synchronize()
                start = time.perf_counter()
                engine.prefill(list(pool.map(fetch, keys)), question)
                torch.cuda.synchronize()
                cold.append(time.perf_counter() - start)
                _drop_page_cache(paths)
                start = time.perf_counter()
                list(pool.map(store.get, keys))
                reads.append(time.perf_counter() - start)
                start = time.perf_counter()
                engine.prefill(list(pool.map(fetch, keys)), question)  # page cache warm now
                torch.cuda.synchronize()
                warm.append(time.perf_counter() - start)
        return {f"block_disk_cold{tag}_ms": 1e3 * statistics.median(cold),
                f"block_disk_warm{tag}_ms": 1e3 * statistics.median(warm),
                f"disk_read_cold{tag}_GBps": file_bytes / statistics.median(reads) / 1e9,
                f"disk_file{tag}_bytes": file_bytes}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_gpu(args) -> dict:
    device = torch.device("cuda")
    tokenizer = build_tokenizer(vocab_size=4096)
    model = build_model(llama8b_config(128256), torch.bfloat16, device)  # real vocab: lm_head bytes count
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fast = BlockEngine(model, tokenizer, template=TEMPLATE)
    naive = BlockEngine(model, tokenizer, template=TEMPLATE, fast_attention=False, assemble_path="eager")
    graphed = BlockEngine(model, tokenizer, template=TEMPLATE, cuda_graphs=max(args.totals))
    graphed_flash = BlockEngine(model, tokenizer, template=TEMPLATE)
    graphed_in_place = BlockEngine(model, tokenizer, template=TEMPLATE)
    graphed_unfused = BlockEngine(model, tokenizer, template=TEMPLATE)
    from blockrag.graphs import FinalBlockGraphs

    graphed_flash.graphs = FinalBlockGraphs(model, max(args.totals), attention="flash")
    graphed_in_place.graphs = FinalBlockGraphs(model, max(args.totals), rotary_half=64, read_in_place=True)
    graphed_unfused.graphs = FinalBlockGraphs(model, max(args.totals), fuse=False)
    assert graphed_in_place.graphs.rotary_half == 64, "the segment table is in use"
    assert graphed.graphs.attention == "triton", graphed.graphs.attention
    question = passage_texts(tokenizer, 1, args.question_tokens, seed=99)[0]
    d2d, h2d = device_bandwidth(device)
    kv_per_token = 2 * 32 * 8 * 128 * 2
    rows = []
    all_texts = passage_texts(tokenizer, max(args.totals) // args.block_tokens, args.block_tokens)
    # Encoding: a warm-up of the request's size (kernels chosen, the allocator grown to hold a request's blocks),
    # then the median of three encodes of fresh passages (stored blocks are not encoded again).
    encode_tps = []
    fresh = [passage_texts(tokenizer, len(all_texts), args.block_tokens, seed=seed) for seed in (7, 8, 9)]
    for texts in [*fresh, all_texts]:  # the warm-up, two more, then the request's own passages
        torch.cuda.synchronize()
        start = time.perf_counter()
        encoded = fast.encode(texts)
        torch.cuda.synchronize()
        encode_tps.append(sum(b.num_tokens for b in encoded) / (time.perf_counter() - start))
    gpu_blocks_all = encoded  # the request's passages (encoded last)
    encode_tps = statistics.median(encode_tps[1:])
    for total in args.totals:
        texts = all_texts[: total // args.block_tokens - 1]
        gpu_blocks = gpu_blocks_all[: len(texts)]
        host_blocks = [dataclasses.replace(b, keys=b.keys.cpu().pin_memory(), values=b.values.cpu().pin_memory())
                       for b in gpu_blocks]
        host_fp8 = [dataclasses.replace(q, keys=q.keys.cpu().pin_memory(), values=q.values.cpu().pin_memory(),
                                        key_scale=q.key_scale.cpu(), value_scale=q.value_scale.cpu())
                    for q in (b.quantize() for b in gpu_blocks)]
        probe = fast.prefill(gpu_blocks, question)
        n = len(probe.input_ids)
        kv_bytes = (n - len(probe.final_ids)) * kv_per_token
        row = {"total_tokens": n, "context_tokens": n - len(probe.final_ids), "final_tokens": len(probe.final_ids)}
        full = functools.partial(fast.prefill, texts, question, mode="full")
        row["full_ms"] = 1e3 * median_time(full, args.repeats_full)
        row["block_naive_ms"] = 1e3 * median_time(functools.partial(naive.prefill, gpu_blocks, question), args.repeats)
        row["block_gpu_ms"] = 1e3 * median_time(functools.partial(fast.prefill, gpu_blocks, question), args.repeats)
        row["block_host_ms"] = 1e3 * median_time(functools.partial(fast.prefill, host_blocks, question), args.repeats)
        row["block_host_fp8_ms"] = 1e3 * median_time(functools.partial(fast.prefill, host_fp8, question), args.repeats)
        fp8_logits = fast.prefill(host_fp8, question).logits
        graph_call = functools.partial(graphed.prefill, gpu_blocks, question)
        row["block_graph_ms"] = 1e3 * median_time(graph_call, args.repeats)
        row["block_graph_in_place_ms"] = 1e3 * median_time(
            functools.partial(graphed_in_place.prefill, gpu_blocks, question), args.repeats)
        row["block_graph_unfused_ms"] = 1e3 * median_time(
            functools.partial(graphed_unfused.prefill, gpu_blocks, question), args.repeats)
        row["block_graph_flash_ms"] = 1e3 * median_time(functools.partial(graphed_flash.prefill, gpu_blocks, question),
                                                        args.repeats)
        row["block_graph_host_ms"] = 1e3 * median_time(functools.partial(graphed.prefill, host_blocks, question),
                                                       args.repeats)
        row["block_graph_host_fp8_ms"] = 1e3 * median_time(functools.partial(graphed.prefill, host_fp8, question),
                                                           args.repeats)
        graphed.graphs.pipeline_host = False  # the previous host path: copy everything, then replay
        row["block_graph_host_serial_ms"] = 1e3 * median_time(functools.partial(graphed.prefill, host_blocks, question),
                                                              args.repeats)
        row["block_graph_host_fp8_serial_ms"] = 1e3 * median_time(
            functools.partial(graphed.prefill, host_fp8, question), args.repeats)
        graphed.graphs.pipeline_host = True
        host_logits = graphed.prefill(host_blocks, question).logits
        reference = fast.prefill(gpu_blocks, question).logits
        row["graph_vs_fast_max_abs_logit_diff"] = float((graphed.prefill(gpu_blocks, question).logits
                                                         - reference).abs().max())
        row["graph_flash_vs_fast_max_abs_logit_diff"] = float((graphed_flash.prefill(gpu_blocks, question).logits
                                                               - reference).abs().max())
        row["graph_in_place_vs_fast_max_abs_logit_diff"] = float(
            (graphed_in_place.prefill(gpu_blocks, question).logits - reference).abs().max())
        row["graph_replay_ms"] = replay_ms(graphed)
        row["graph_replay_in_place_ms"] = replay_ms(graphed_in_place)
        row["graph_replay_unfused_ms"] = replay_ms(graphed_unfused)
        row["graph_unfused_vs_fast_max_abs_logit_diff"] = float(
            (graphed_unfused.prefill(gpu_blocks, question).logits - reference).abs().max())
        row["graph_replay_flash_ms"] = replay_ms(graphed_flash)
        row.update(attention_layer_us(row["context_tokens"], row["final_tokens"]))
        if args.disk:
            try:
                row.update(disk_tier(graphed, gpu_blocks, question, args.disk, args.repeats_disk))
            except OSError as e:  # the disk tier depends on the machine's file system: record, carry on
                row["disk_tier_error"] = repr(e)
        row["max_abs_logit"] = float(reference.abs().max())
        row["graph_host_vs_fast_max_abs_logit_diff"] = float((host_logits - reference).abs().max())
        row["fp8_vs_bf16_max_abs_logit_diff"] = float((fp8_logits - reference).abs().max())
        row["naive_vs_fast_max_abs_logit_diff"] = float((naive.prefill(gpu_blocks, question).logits
                                                         - reference).abs().max())
        row["floor_gpu_ms"] = 1e3 * (weight_bytes + kv_bytes) / (d2d * 1e9)  # read once at the copy's bus rate
        row["floor_host_ms"] = 1e3 * kv_bytes / (h2d * 1e9)
        row["floor_host_fp8_ms"] = 1e3 * kv_bytes / 2 / (h2d * 1e9)
        row["speedup_gpu"] = row["full_ms"] / row["block_gpu_ms"]
        row["speedup_graph"] = row["full_ms"] / row["block_graph_ms"]
        row.update(breakdown(fast, gpu_blocks, host_blocks, args.repeats))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"device": torch.cuda.get_device_name(), "model": "Llama-3.1-8B shape, random weights", "dtype": "bfloat16",
            "fused": graphed.graphs.fused.decisions,
            "block_tokens": args.block_tokens, "question_tokens": args.question_tokens,
            "d2d_GBps_read_plus_write": d2d, "h2d_GBps": h2d, "weight_bytes": weight_bytes,
            "encode_tokens_per_s": encode_tps, "rows": rows}


def run_cpu(args) -> dict:
    device = torch.device("cpu")
    tokenizer = build_tokenizer(vocab_size=4096)
    model = build_model(qwen05b_config(151936), torch.float32, device)
    engine = BlockEngine(model, tokenizer, template=TEMPLATE)
    question = passage_texts(tokenizer, 1, args.question_tokens, seed=99)[0]
    rows = []
    for total in args.totals:
        texts = passage_texts(tokenizer, total // args.block_tokens - 1, args.block_tokens)
        blocks = engine.encode(texts)
        probe = engine.prefill(blocks, question)
        row = {"total_tokens": len(probe.input_ids), "final_tokens": len(probe.final_ids)}
        full = functools.partial(engine.prefill, texts, question, mode="full")
        row["full_ms"] = 1e3 * median_time(full, args.repeats_full, 0)
        row["block_ms"] = 1e3 * median_time(functools.partial(engine.prefill, blocks, question), args.repeats)
        row["speedup"] = row["full_ms"] / row["block_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"device": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
            "model": "Qwen2.5-0.5B shape, random weights", "dtype": "float32", "block_tokens": args.block_tokens,
            "question_tokens": args.question_tokens, "rows": rows}


def print_table(result: dict) -> None:
    rows = result["rows"]
    cols = [c for c in rows[0] if c.endswith("_ms") or c.startswith("speedup")]
    print(f"\n{result['device']} | {result['model']} | {result['dtype']}")
    print("| total tokens | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in rows:
        print(f"| {r['total_tokens']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["total_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for col in [c for c in rows[0] if c.endswith("_ms") and (c.startswith(("full", "block", "floor")))]:
        style = "--" if col.startswith("floor") else "-"
        ax.plot(x, [r[col] for r in rows], style, marker="o", label=col.removesuffix("_ms"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("total prompt tokens")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"{result['device']}\n{result['model']}, {result['dtype']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the CPU table even if CUDA is present")
    parser.add_argument("--totals", type=int, nargs="+", help="total prompt tokens to test")
    parser.add_argument("--block-tokens", type=int, default=None, help="tokens per passage block")
    parser.add_argument("--question-tokens", type=int, default=None, help="tokens in the question")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats of block mode (median)")
    parser.add_argument("--repeats-full", type=int, default=3, help="timed repeats of full prefill (median)")
    parser.add_argument("--disk", type=Path, default=None, help="folder for the disk-tier columns (off if unset)")
    parser.add_argument("--repeats-disk", type=int, default=3, help="timed cold-cache repeats of the disk tier")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    if args.disk:
        args.disk.mkdir(parents=True, exist_ok=True)
    args.totals = args.totals or ([4096, 8192, 16384, 32768] if gpu else [1024, 2048, 4096])
    args.block_tokens = args.block_tokens or (512 if gpu else 256)
    args.question_tokens = args.question_tokens or (64 if gpu else 32)
    result = run_gpu(args) if gpu else run_cpu(args)
    result.update(commit=commit(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                  transformers=__import__("transformers").__version__)
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "ttft_gpu" if gpu else "ttft_cpu"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{stem}.png")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
