"""Where block-mode TTFT and encoding time go on the GPU, and which split-KV attention launch shape is fastest.

Llama-3.1-8B shape, random bf16 weights, the same passages and question as ``benchmarks/ttft.py``. Three parts:

  profile   one request through ``BlockEngine.prefill`` (the CUDA-graph path, blocks on the GPU) under
            torch.profiler: GPU time per kind of kernel (matrix products, attention, the gather of the
            context, copies, everything else), kernels launched, and the wall time the GPU sat idle;
            the same for the encoding of the request's passages (``BlockEngine.encode``), with the longest
            stretches the GPU sat idle.
  sweep     the split-KV kernel over the gathered buffer and over 512-token blocks read in place, for every
            launch shape in a grid (row tile, key tile, warps, stages, splits), each captured in a CUDA graph,
            at the context lengths asked for; each output is checked against the default shape's.
  encode    encoding throughput (tokens/s) at several token budgets per batch.
  stages    the host's and the GPU's timeline of one request, stage by stage: for each step of the request path
            (prompt, block lookup, graph inputs, gather, each graph piece, result), when the host entered and
            left it and when the GPU reached those points (CUDA events recorded at the same calls), median over
            runs; and the functions where the host spends its time (cProfile, own time). Where the GPU reaches
            a point right after the host does, the GPU was waiting for the host.

Prints tables and ends with one JSON line (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ttft import TEMPLATE, build_model, commit, llama8b_config, passage_texts  # noqa: E402

from blockrag import BlockEngine  # noqa: E402
from blockrag.testing import build_tokenizer  # noqa: E402

KINDS = (("gemm", ("gemm", "nvjet", "gemv", "xmma", "cutlass", "cublas")),
         ("attention", ("split_kv", "merge_splits", "flash", "fmha", "attention")),
         ("gather", ("gather_rotate",)),
         ("copy", ("memcpy", "memset")))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, marks in KINDS if any(m in low for m in marks)), "other")


def profile(fn, runs: int = 3) -> dict:
    """GPU time per kernel kind per run (ms), kernels per run, wall ms per run, GPU idle ms per run."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / runs
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_kind = collections.Counter()
    top = collections.Counter()
    spans = []
    for e in kernels:
        per_kind[kind_of(e.name)] += e.device_time_total
        top[e.name[:90]] += e.device_time_total
        spans.append((e.time_range.start, e.time_range.end))
    busy = _union(spans)
    return {"wall_ms": 1e3 * wall, "gpu_busy_ms": busy / 1e3 / runs,
            "gpu_idle_ms": 1e3 * wall - busy / 1e3 / runs, "kernels": len(kernels) / runs,
            "by_kind_ms": {k: v / 1e3 / runs for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k: v / 1e3 / runs for k, v in top.most_common(12)},
            "largest_gaps": _gaps(kernels)}


def _gaps(kernels, count: int = 8) -> list[dict]:
    """The longest stretches with no kernel running: length, when (ms after the first kernel), and the kernels on
    either side (what the GPU waited after, and for)."""
    events = sorted(kernels, key=lambda e: e.time_range.start)
    gaps, end, last = [], None, None
    for e in events:
        if end is not None and e.time_range.start > end:
            gaps.append((e.time_range.start - end, end, last.name[:60], e.name[:60]))
        if end is None or e.time_range.end > end:
            end, last = e.time_range.end, e
    first = events[0].time_range.start if events else 0
    return [{"ms": gap / 1e3, "at_ms": (at - first) / 1e3, "after": after, "before": before}
            for gap, at, after, before in sorted(gaps, reverse=True)[:count]]


def _union(spans) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _patch(targets, marks: list) -> list:
    """Wrap each (owner, attribute, label): a host time and a CUDA event on entry and exit go to ``marks``.
    Returns the undo list."""
    undo = []
    for owner, attr, label in targets:
        original = getattr(owner, attr)

        def timed(*args, _original=original, _label=label, **kwargs):
            for side in ("enter", "exit"):
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks.append((f"{_label} {side}", time.perf_counter(), event))
                if side == "enter":
                    try:
                        result = _original(*args, **kwargs)
                    except BaseException:
                        marks.pop()
                        raise
            return result

        undo.append((owner, attr, original, attr in vars(owner)))
        setattr(owner, attr, timed)
    return undo


def _unpatch(undo) -> None:
    for owner, attr, original, own in reversed(undo):
        if own:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)


def stages(fn, targets, runs: int = 7, profiled: int = 10) -> dict:
    """Timeline of ``fn`` (one request): per stage mark, host ms and GPU ms since the request began (median over
    runs), the host's return and the GPU's end; then cProfile's top functions by own time over ``profiled`` calls."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    marks: list = []
    undo = _patch(targets, marks)
    timelines = []
    try:
        for _ in range(runs):
            marks.clear()
            torch.cuda.synchronize()
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            start = time.perf_counter()
            fn()
            returned = time.perf_counter()
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            seen = collections.Counter()
            timeline = []
            for name, host, event in marks:
                seen[name] += 1
                timeline.append((f"{name} #{seen[name]}" if seen[name] > 1 else name, 1e3 * (host - start),
                                 begin.elapsed_time(event)))
            timeline.append(("request returned", 1e3 * (returned - start), begin.elapsed_time(end)))
            timelines.append(timeline)
    finally:
        _unpatch(undo)
    rows = []
    for i, (name, _, _) in enumerate(timelines[0]):
        same = [t[i] for t in timelines if len(t) == len(timelines[0]) and t[i][0] == name]
        rows.append({"mark": name, "host_ms": statistics.median(h for _, h, _ in same),
                     "gpu_ms": statistics.median(g for _, _, g in same)})
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(profiled):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:25]  # (file, line, name) -> (cc, nc, tt, ct, ...)
    own = [{"function": f"{Path(path).name}:{line} {name}", "calls": nc / profiled, "own_ms": 1e3 * tt / profiled,
            "cumulative_ms": 1e3 * ct / profiled} for (path, line, name), (_, nc, tt, ct, _) in top]
    return {"timeline": rows, "host_own_time": own}


def request_targets(engine) -> list:
    """The steps of a block-mode request through ``BlockEngine.prefill`` that ``stages`` marks."""
    import blockrag.engine as engine_module
    import blockrag.graphs as graphs_module

    targets = [(engine.prompts, "build", "prompt"), (engine.blocks, "for_prompt", "blocks for prompt"),
               (engine_module, "sync", "sync"), (engine_module, "PrefillResult", "result"),
               (graphs_module, "buffer_cache", "decode cache")]
    if engine.graphs is not None:
        targets += [(engine.graphs, "try_prefill", "graph prefill"), (graphs_module._GraphInputs, "upload", "inputs"),
                    (engine.graphs, "_gather", "gather"), (graphs_module, "_copy_from_host", "host copies issued"),
                    (torch.cuda.CUDAGraph, "replay", "piece")]
    return targets


def encode_targets(engine) -> list:
    """The steps of ``BlockEngine.encode`` that ``stages`` marks."""
    import blockrag.encoder as encoder_module

    return [(type(engine.template), "tokenize_many", "tokenize"), (engine.blocks.encoder, "_forward", "batch forward"),
            (encoder_module, "prefill_kv", "model forward"), (engine.blocks.store, "put", "store put")]


def print_stages(name: str, result: dict) -> None:
    print(f"\n{name}: host and GPU time since the request began (ms, median)")
    print("| mark | host | GPU |")
    print("|---|---|---|")
    for row in result["timeline"]:
        print(f"| {row['mark']} | {row['host_ms']:.3f} | {row['gpu_ms']:.3f} |")
    print(f"{name}: host own time per call (cProfile)")
    for row in result["host_own_time"][:15]:
        print(f"  {row['own_ms']:8.3f} ms own {row['cumulative_ms']:8.3f} cum {row['calls']:7.1f} calls  "
              f"{row['function']}")


def kernel_facts(kernel) -> list[dict]:
    """Per compiled variant of a Triton kernel: its constexprs, registers, spills, and in its PTX the
    asynchronous copies (software pipelining) and 16-byte global loads (vectorised reads)."""
    facts = []
    for caches in getattr(kernel, "device_caches", {}).values():
        for compiled in caches[0].values():
            ptx = compiled.asm.get("ptx", "")
            facts.append({"constants": str(getattr(compiled, "src", None) and compiled.src.constants)[:300],
                          "registers": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None),
                          "cp_async": ptx.count("cp.async."), "ld_global_v4": ptx.count("ld.global.v4"),
                          "wgmma": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync")})
    return facts


def sweep(contexts, q_real: int, bucket: int, block: int = 512) -> list[dict]:
    """Each launch shape of the split-KV kernel over the gathered buffer ("buffer") and over blocks of ``block``
    tokens read in place through a segment table ("table", deltas 0 so both see the same keys)."""
    import triton.testing

    from blockrag.kernels import (
        SPLIT_CONFIG,
        Segment,
        SplitConfig,
        empty_segment_table,
        fill_segment_table,
        final_block_attention,
        split_meta,
        table_attention,
    )

    device = torch.device("cuda")
    rows = []
    shapes = [SplitConfig(128, 64, 8, 3), SplitConfig(128, 128, 8, 3), SplitConfig(64, 64, 8, 3),
              SplitConfig(64, 64, 4, 3), SplitConfig(64, 128, 8, 3)]
    for context in contexts:
        q = torch.randn(1, bucket, 32, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
        cap = context + bucket + 64
        k = torch.randn(1, 8, cap, 128, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        blocks = [(k[0, :, a:a + block].contiguous(), v[0, :, a:a + block].contiguous())
                  for a in range(0, context, block)]
        segments = [Segment(bk, bv, 0, 8 * bk.shape[1] * 128, bk.shape[1] * 128, bk.shape[1], 0) for bk, bv in blocks]
        segments.append(Segment(k, v, context * 128, 8 * cap * 128, cap * 128, q_real, 0))
        reference = final_block_attention(
            q, k, v, 128 ** -0.5, torch.tensor(split_meta(context, q_real, 16), dtype=torch.int32, device=device), 16,
            SPLIT_CONFIG)
        for splits in (16, 32):
            meta = torch.tensor(split_meta(context, q_real, splits), dtype=torch.int32, device=device)
            table = empty_segment_table(len(segments), splits, 64, device)
            fill_segment_table(table, segments, q_real, torch.zeros(64), splits, k)
            for shape, kind in itertools.product(shapes, ("buffer", "table")):
                if kind == "buffer":
                    call = functools.partial(final_block_attention, q, k, v, 128 ** -0.5, meta, splits, shape)
                else:
                    call = functools.partial(table_attention, q, table, 0, 128 ** -0.5, 8, k, shape)
                row = {"context": context, "kind": kind, "splits": splits, **shape._asdict()}
                try:
                    out = call()
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        call()
                    row["us"] = 1e3 * triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
                    row["max_abs_diff"] = float((out[:, :q_real] - reference[:, :q_real]).abs().max())
                except Exception as e:  # e.g. out of shared memory for this shape: record, go on
                    row["error"] = repr(e)[:200]
                rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=int, default=32768, help="total prompt tokens of the profiled request")
    parser.add_argument("--sweep-contexts", type=int, nargs="*", default=[32768])
    parser.add_argument("--budgets", type=int, nargs="*", default=[4096, 8192, 16384])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_ttft.json"))
    args = parser.parse_args()
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "model": "Llama-3.1-8B shape, random weights",
              "dtype": "bfloat16", "commit": commit(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    sweep_rows = sweep(args.sweep_contexts, 71, 96)
    result["sweep"] = sweep_rows
    print("| context | kind | splits | block_m | block_n | warps | stages | us | max_abs_diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted((r for r in sweep_rows if "us" in r), key=lambda r: (r["context"], r["kind"], r["us"])):
        print(f"| {r['context']} | {r['kind']} | {r['splits']} | {r['block_m']} | {r['block_n']} | {r['warps']} | "
              f"{r['stages']} | {r['us']:.1f} | {r['max_abs_diff']:.4f} |")
    print("errors:", sum("error" in r for r in sweep_rows))
    from blockrag.kernels import _split_kv_kernel

    try:
        result["split_kv_compiled"] = kernel_facts(_split_kv_kernel)
    except Exception as e:  # the compiled kernel's attributes differ between Triton versions
        result["split_kv_compiled"] = repr(e)[:300]
    print("split-KV kernel variants:", json.dumps(result["split_kv_compiled"], indent=1))
    tokenizer = build_tokenizer(vocab_size=4096)
    model = build_model(llama8b_config(128256), torch.bfloat16, device)
    engine = BlockEngine(model, tokenizer, template=TEMPLATE, cuda_graphs=args.total)
    texts = passage_texts(tokenizer, args.total // 512, 512)
    question = passage_texts(tokenizer, 1, 64, seed=99)[0]
    engine.encode(passage_texts(tokenizer, 16, 512, seed=7))  # warm-up
    encode = {}
    for seed, budget in enumerate(args.budgets, start=10):  # new texts each time: stored blocks are not re-encoded
        engine.encoder.token_budget = budget
        fresh = passage_texts(tokenizer, args.total // 512, 512, seed=seed)
        torch.cuda.synchronize()
        start = time.perf_counter()
        encoded = engine.encode(fresh)
        torch.cuda.synchronize()
        encode[budget] = sum(b.num_tokens for b in encoded) / (time.perf_counter() - start)
    blocks = engine.encode(texts)
    result["encode_tokens_per_s_by_budget"] = encode
    engine.encoder.token_budget = 8192
    blocks = blocks[: args.total // 512 - 1]
    result["prefill_graph"] = profile(lambda: engine.prefill(blocks, question))
    host = [dataclasses.replace(b, keys=b.keys.cpu().pin_memory(), values=b.values.cpu().pin_memory()) for b in blocks]
    host_fp8 = [dataclasses.replace(q, keys=q.keys.cpu().pin_memory(), values=q.values.cpu().pin_memory(),
                                    key_scale=q.key_scale.cpu(), value_scale=q.value_scale.cpu())
                for q in (b.quantize() for b in blocks)]
    result["prefill_graph_host"] = profile(lambda: engine.prefill(host, question), runs=2)
    result["prefill_graph_host_fp8"] = profile(lambda: engine.prefill(host_fp8, question), runs=2)
    fresh = iter([passage_texts(tokenizer, 16, 512, seed=200 + i) for i in range(16)])
    for name, call, targets, runs in (
            ("stages_graph", lambda: engine.prefill(blocks, question), request_targets(engine), 7),
            ("stages_graph_host", lambda: engine.prefill(host, question), request_targets(engine), 3),
            ("stages_graph_host_fp8", lambda: engine.prefill(host_fp8, question), request_targets(engine), 3),
            ("stages_encode", lambda: engine.encode(next(fresh)), encode_targets(engine), 3)):
        try:
            result[name] = stages(call, targets, runs=runs, profiled=min(runs, 10))
            print_stages(name, result[name])
        except Exception as e:  # a profiling failure must not lose the rest of the run
            traceback.print_exc()
            result[name] = repr(e)[:300]
    # the encode that benchmarks/ttft.py times: all the request's passages, in batches of the default budget
    batches = iter([passage_texts(tokenizer, args.total // 512, 512, seed=100 + i) for i in range(2)])
    result["encode_batch"] = profile(lambda: engine.encode(next(batches)), runs=1)
    for name in ("prefill_graph", "prefill_graph_host", "prefill_graph_host_fp8", "encode_batch"):
        p = result[name]
        print(f"\n{name}: wall {p['wall_ms']:.2f} ms, GPU busy {p['gpu_busy_ms']:.2f} ms, "
              f"idle {p['gpu_idle_ms']:.2f} ms, {p['kernels']:.0f} kernels")
        for kind, ms in p["by_kind_ms"].items():
            print(f"  {kind:10s} {ms:8.2f} ms")
        for kernel, ms in p["top_kernels_ms"].items():
            print(f"    {ms:8.3f} ms  {kernel}")
        for gap in p["largest_gaps"]:
            print(f"    idle {gap['ms']:7.3f} ms at {gap['at_ms']:8.3f} ms, "
                  f"after {gap['after']} before {gap['before']}")
    print("encode tokens/s by budget:", {k: round(v) for k, v in encode.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
