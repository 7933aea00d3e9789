"""Block fine-tuning on the synthetic RAG task: does block mode drop, and does block fine-tuning recover it?

One variant runs the issue's experiment end to end:
  1. train a small Llama from scratch with full attention (curriculum 1 -> 2 -> 4 -> 8 passages);
  2. evaluate held-out accuracy in full mode, block mode and block mode without position re-encoding;
  3. block-fine-tune (one block copy + one full copy per sample) and evaluate again;
  4. control: fine-tune the same number of steps with full copies only, and evaluate again;
  5. cross-check: BlockEngine.generate on held-out examples (first question) in both modes.
Accuracy is exact match per question (single-hop and 2-hop separately), computed by one masked forward per
batch (the same masks as training; the engine cross-check confirms it). Prints a table, writes
``results.json`` and the pretrained / block-fine-tuned models under ``--out``, and ends with one JSON line.

  python benchmarks/finetune_synthetic.py --preset cpu --out /tmp/ft_cpu
  python benchmarks/finetune_synthetic.py --preset gpu --budget-s 500 --out /tmp/ft_gpu   # on a CUDA GPU
  python benchmarks/finetune_synthetic.py --preset cpu --init tests/data/synthetic_lookup --passages 8 \
      --ft-steps 60 --ft-batch 16 --ft-lr 5e-4 --eval-examples 200 --out /tmp/ft_cpu   # steps 2-5 from the
      # GPU-pretrained checkpoint, on a CPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockrag import BlockEngine  # noqa: E402
from blockrag.train import CopyRatio, TrainConfig, Trainer  # noqa: E402
from blockrag.train.synthetic import (  # noqa: E402
    Curriculum,
    SyntheticDataset,
    SyntheticTask,
    TaskConfig,
    build_tokenizer,
    evaluate,
    new_model,
    template,
)

MODES = ("full", "block", "block_no_pos")


@dataclasses.dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    passages: int
    entities: int
    questions: int
    batch: int
    pretrain_steps: int
    pretrain_lr: float
    ft_steps: int
    ft_batch: int
    ft_lr: float
    eval_examples: int
    engine_examples: int
    curve_every: int
    workers: int
    attn: str
    bf16: bool


PRESETS = {
    # 2 CPU cores, minutes: a small model, 4 passages.
    "cpu": Preset(hidden=64, layers=4, heads=4, passages=4, entities=32, questions=16, batch=16, pretrain_steps=600,
                  pretrain_lr=3e-3, ft_steps=60, ft_batch=16, ft_lr=3e-4, eval_examples=150, engine_examples=20,
                  curve_every=100, workers=0, attn="eager", bf16=False),
    # One H100, a few minutes: the configuration that learned the task (2 layers, d=128; see README).
    "gpu": Preset(hidden=128, layers=2, heads=4, passages=8, entities=64, questions=16, batch=256, pretrain_steps=4000,
                  pretrain_lr=3e-3, ft_steps=400, ft_batch=128, ft_lr=3e-4, eval_examples=1000,
                  engine_examples=100, curve_every=500, workers=6, attn="sdpa", bf16=True),
}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def evaluate_modes(model, items, pad_id, batch=128) -> dict:
    # NOTE: evaluation runs in float32 even after bf16 training, like the engine cross-check.
    return {m: evaluate(model, items, m, pad_token_id=pad_id, batch_size=batch) for m in MODES}


def engine_check(model, tokenizer, task, count, seed_offset=0) -> dict:
    """First-question accuracy of BlockEngine.generate (block and full mode)."""
    try:
        return _engine_check(model, tokenizer, task, count, seed_offset)
    except Exception as e:  # noqa: BLE001 - a cross-check failure is recorded, the measured table is kept
        return {"error": repr(e)}


def _engine_check(model, tokenizer, task, count, seed_offset=0) -> dict:
    engine = BlockEngine(model.eval(), tokenizer, template=template())
    out = {}
    for mode in ("full", "block"):
        right = 0
        for i in range(count):
            example = task.example("heldout", seed_offset + i)
            q = example.questions[0]
            gen = engine.generate(list(example.passages), q.text, mode=mode, max_new_tokens=4, stop=[";"])
            right += gen.text.strip() == q.answer
        out[mode] = 100.0 * right / max(1, count)
    return out


def finetune(model, tokenizer, task, preset: Preset, ratio: CopyRatio, out_dir: Path, seed: int, offset: int,
             steps: int, log) -> dict:
    config = TrainConfig(output_dir=str(out_dir), lr=preset.ft_lr, max_steps=steps, batch_size=preset.ft_batch,
                         ratio=ratio, warmup_ratio=0.05, schedule="cosine", min_lr_ratio=0.1, seed=seed,
                         log_every=max(1, steps // 10), shuffle=False, num_workers=preset.workers,
                         bf16=preset.bf16, progress=False)
    dataset = SyntheticDataset(task, tokenizer, template(), steps * preset.ft_batch, offset=offset,
                               curriculum=Curriculum(((0.0, task.config.passages),)))
    trainer = Trainer(model, tokenizer, config, template=template())
    start = time.perf_counter()
    result = trainer.fit(dataset, on_log=lambda e: log(f"  ft[{ratio}] step {e.step} loss {e.loss:.4f} "
                                                       f"(block {e.block_loss:.4f}, full {e.full_loss:.4f})"))
    task.config.save(out_dir)
    return {"steps": result.steps, "wall_s": round(time.perf_counter() - start, 1), "final_loss": result.final_loss,
            "ratio": str(ratio)}


def fit_budget(preset: Preset, model, tokenizer, task, args, t0: float, log) -> Preset:
    """Size pretraining to the time budget: time a few steps on a copy of the model, keep the rest for the
    fine-tuning runs (block-FT and control: 2 x ft_steps, twice the sequences per step) and evaluation."""
    probe_steps = 30
    config = TrainConfig(output_dir=str(Path(args.out) / "probe"), lr=preset.pretrain_lr, max_steps=probe_steps,
                         batch_size=preset.batch, ratio=CopyRatio(0, 1), shuffle=False, num_workers=preset.workers,
                         bf16=preset.bf16, progress=False, log_every=10)
    dataset = SyntheticDataset(task, tokenizer, template(), probe_steps * preset.batch, curriculum=Curriculum())
    trainer = Trainer(copy.deepcopy(model), tokenizer, config)
    times = []
    trainer.fit(dataset, save_final=False, on_log=lambda e: times.append(e.elapsed_s))
    step_s = (times[-1] - times[0]) / (probe_steps - 10)
    ft_cost = (1 if args.no_control else 2) * preset.ft_steps * step_s * 1.2
    left = args.budget_s - (time.perf_counter() - t0) - ft_cost - args.reserve_s
    steps = max(100, min(preset.pretrain_steps, int(left / step_s)))
    log(f"probe: {step_s * 1000:.1f} ms/step; pretraining {steps} steps to fit {args.budget_s} s")
    return dataclasses.replace(preset, pretrain_steps=steps)


def run(args) -> dict:
    preset = PRESETS[args.preset]
    overrides = {k: v for k, v in (("hidden", args.hidden), ("layers", args.layers),
                                   ("pretrain_steps", args.pretrain_steps), ("ft_steps", args.ft_steps),
                                   ("pretrain_lr", args.pretrain_lr), ("ft_lr", args.ft_lr),
                                   ("batch", args.batch), ("ft_batch", args.ft_batch), ("workers", args.workers),
                                   ("heads", args.heads), ("questions", args.questions),
                                   ("passages", args.passages), ("eval_examples", args.eval_examples))
                 if v is not None}
    preset = dataclasses.replace(preset, **overrides)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "log.txt").open("a", encoding="utf-8")

    def save(results: dict) -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    t0 = time.perf_counter()
    results: dict = {"preset": args.preset, "settings": dataclasses.asdict(preset), "seed": args.seed,
                     "device": device_name(device), "torch": torch.__version__, "commit": git_commit(),
                     "date": time.strftime("%Y-%m-%d")}
    import transformers

    results["transformers"] = transformers.__version__
    if args.init:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        task_config = TaskConfig.load(args.init)
        task_config = dataclasses.replace(task_config, passages=preset.passages)
        tokenizer = AutoTokenizer.from_pretrained(args.init)
        model = AutoModelForCausalLM.from_pretrained(args.init, attn_implementation=preset.attn).to(device)
        results["init"] = str(args.init)
    else:
        task_config = TaskConfig(entities=preset.entities, passages=preset.passages, questions=preset.questions,
                                 style=args.style, seed=args.seed)
        tokenizer = build_tokenizer(task_config)
        model = new_model(tokenizer, preset.hidden, preset.layers, preset.heads, seed=args.seed,
                          attn_implementation=preset.attn).to(device)
    task = SyntheticTask(task_config)
    results["task"] = dataclasses.asdict(task_config)
    results["parameters"] = sum(p.numel() for p in model.parameters())
    pad = tokenizer.pad_token_id
    items = task.eval_items(preset.eval_examples, tokenizer, template())
    curve_items = items[: min(200, len(items))]
    log(f"{args.preset}: {results['parameters']} parameters on {results['device']}, task {task_config}")

    # 1. Pretrain with full attention.
    if not args.init:
        if args.budget_s:
            preset = fit_budget(preset, model, tokenizer, task, args, t0, log)
            results["settings"] = dataclasses.asdict(preset)
        curve = []

        def on_log(entry):
            line = f"  pretrain step {entry.step} loss {entry.loss:.4f} lr {entry.lr:.2e} ({entry.elapsed_s:.0f}s)"
            if entry.step % preset.curve_every == 0 or entry.step == preset.pretrain_steps:
                acc = evaluate(trainer.model, curve_items, "full", pad_token_id=pad)
                curve.append({"step": entry.step, "loss": entry.loss, "full_accuracy": acc["accuracy"],
                              "elapsed_s": entry.elapsed_s})
                line += f" | held-out full acc {acc['accuracy']:.1f} (1-hop {acc['1hop']:.1f}, 2-hop {acc['2hop']:.1f})"
            log(line)

        config = TrainConfig(output_dir=str(out / "pretrained"), lr=preset.pretrain_lr,
                             max_steps=preset.pretrain_steps, batch_size=preset.batch, ratio=CopyRatio(0, 1),
                             warmup_ratio=0.02, schedule="cosine", min_lr_ratio=0.05, weight_decay=0.01,
                             seed=args.seed, log_every=max(1, preset.curve_every // 5), shuffle=False,
                             num_workers=preset.workers, bf16=preset.bf16, progress=False)
        dataset = SyntheticDataset(task, tokenizer, template(), preset.pretrain_steps * preset.batch,
                                   curriculum=Curriculum())
        trainer = Trainer(model, tokenizer, config, template=template())
        start = time.perf_counter()
        trainer.fit(dataset, on_log=on_log)
        task_config.save(out / "pretrained")
        results["pretrain"] = {"steps": preset.pretrain_steps, "wall_s": round(time.perf_counter() - start, 1),
                               "curve": curve}
        model = trainer.model
        save(results)
    pretrain_offset = 10_000_000  # fine-tuning examples never repeat pretraining ones

    # 2. Before block fine-tuning.
    before = evaluate_modes(model, items, pad)
    results["before"] = before
    save(results)
    log("before: " + json.dumps({m: round(before[m]["accuracy"], 2) for m in MODES}))
    base_state = copy.deepcopy(model.state_dict())

    # 3. Block fine-tuning (1 block copy : 1 full copy).
    results["blockft"] = finetune(model, tokenizer, task, preset, CopyRatio(1, 1), out / "blockft", args.seed,
                                  pretrain_offset, preset.ft_steps, log)
    after = evaluate_modes(model, items, pad)
    results["after"] = after
    save(results)
    log("after block-FT: " + json.dumps({m: round(after[m]["accuracy"], 2) for m in MODES}))
    if preset.engine_examples:
        results["engine_after"] = engine_check(model, tokenizer, task, preset.engine_examples)
        log(f"engine (block-FT, first question, {preset.engine_examples} examples): {results['engine_after']}")

    # 4. Control: the same steps with full copies only.
    if not args.no_control:
        model.load_state_dict(base_state)
        if preset.engine_examples:
            results["engine_before"] = engine_check(model, tokenizer, task, preset.engine_examples)
            log(f"engine (before, first question): {results['engine_before']}")
        results["control"] = finetune(model, tokenizer, task, preset, CopyRatio(0, 1), out / "fullft", args.seed,
                                      pretrain_offset, preset.ft_steps, log)
        results["control_after"] = evaluate_modes(model, items, pad)
        log("after full-only FT (control): " + json.dumps(
            {m: round(results["control_after"][m]["accuracy"], 2) for m in MODES}))
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    save(results)
    print_table(results)
    summary = {"bench": "finetune_synthetic", "preset": args.preset, "device": results["device"],
               **{f"{phase}_{m}": round(results[phase][m]["accuracy"], 2)
                  for phase in ("before", "after") for m in MODES},
               "wall_s": results["wall_s"]}
    print(json.dumps(summary))
    return results


def print_table(results: dict) -> None:
    rows = [("pretrained (full attention), full mode", "before", "full"),
            ("pretrained, block mode", "before", "block"),
            ("pretrained, block mode w/o pos. re-encoding", "before", "block_no_pos"),
            ("block-FT, block mode", "after", "block"),
            ("block-FT, full mode", "after", "full"),
            ("block-FT, block mode w/o pos. re-encoding", "after", "block_no_pos")]
    if "control_after" in results:
        rows += [("full-only FT (control), block mode", "control_after", "block"),
                 ("full-only FT (control), full mode", "control_after", "full")]
    print(f"\n{'model / mode':46} | {'all':>6} | {'1-hop':>6} | {'2-hop':>6}")
    print("-" * 74)
    for label, phase, mode in rows:
        r = results[phase][mode]
        print(f"{label:46} | {r['accuracy']:6.1f} | {r['1hop']:6.1f} | {r['2hop']:6.1f}")
    n = results["before"]["full"]
    print(f"(held-out questions: {n['n']} = {n['n_1hop']} 1-hop + {n['n_2hop']} 2-hop; wall {results['wall_s']} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="experiment size")
    parser.add_argument("--out", required=True, help="output directory (results.json, log.txt, models)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, the model and the data order")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--init", default=None, help="start from this pretrained model directory (skips step 1)")
    parser.add_argument("--style", choices=("lookup", "triples"), default="lookup", help="task style (TaskConfig)")
    parser.add_argument("--no-control", action="store_true", help="skip the full-copies-only control")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget: size pretraining steps (at most the preset's) to fit it")
    parser.add_argument("--reserve-s", type=float, default=60.0,
                        help="seconds of the budget kept for evaluation, engine checks and saving")
    for name, kind in (("hidden", int), ("layers", int), ("pretrain-steps", int), ("ft-steps", int),
                       ("pretrain-lr", float), ("ft-lr", float), ("passages", int), ("eval-examples", int),
                       ("batch", int), ("ft-batch", int), ("workers", int), ("heads", int),
                       ("questions", int)):
        parser.add_argument(f"--{name}", type=kind, default=None, help=f"override the preset's {name}")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    if os.environ.get("BLOCKRAG_THREADS"):
        torch.set_num_threads(int(os.environ["BLOCKRAG_THREADS"]))
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
