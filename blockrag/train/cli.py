"""``blockrag finetune``: block-fine-tune a model on JSONL records so that BlockEngine can serve it in block mode.

``blockrag.cli`` (the one ``main``) registers it: it imports this module only for ``blockrag finetune`` and calls
``add_parser(subparsers)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blockrag.errors import BlockRAGError, InvalidInputError

DESCRIPTION = """\
Block-fine-tune a causal LM (full fine-tuning or LoRA) on JSONL records. Each sample is trained as a block copy
(passages attend only to themselves; the question and answer attend to everything) and a full-attention copy,
1:1 as in the Block-Attention paper. The output directory holds the model (safetensors), its tokenizer and
block_template.json; serve it with
  BlockEngine.from_pretrained(OUT, template=blockrag.train.load_template(OUT))

Records, one JSON object per line:
  RAG:  {"instruction"?: str, "passages": [{"title"?: str, "text": str} | str], "question": str, "answer": str}
  chat: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}  (ends with the assistant turn)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``finetune`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("finetune", help="block-fine-tune a model on JSONL RAG / chat records",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("model and data")
    io.add_argument("--model", default="smollm2-135m",
                    help="a short offline name, a .gguf file, a local model directory or a Hub name "
                         "(default: smollm2-135m, the embedded SmolLM2-135M-Instruct base model)")
    io.add_argument("--data", required=True, nargs="+", help="one or more JSONL files of RAG and/or chat records")
    io.add_argument("--output-dir", required=True, help="where the fine-tuned model, log and checkpoints go")
    io.add_argument("--template", default="chat",
                    help="block template: a preset ('chat', 'tulu3-block') or a block_template.json file; "
                         "serve the model with the same one (default: chat)")
    io.add_argument("--max-length", type=int, default=4096,
                    help="drop samples longer than this many tokens (default: 4096, the paper's)")
    io.add_argument("--max-blocks", type=int, default=15,
                    help="split chat records into at most this many blocks (default: 15, the paper's)")
    io.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the Hub")

    mix = p.add_argument_group("block fine-tuning")
    mix.add_argument("--ratio", default="1:1",
                     help="block copies : full copies per sample (default: 1:1, the paper's; '1:0' = block only)")
    mix.add_argument("--objective", choices=("answer", "distill"), default="answer",
                     help="'answer': cross-entropy on the records' answers (the paper's); 'distill': label-free, "
                          "the KL from the frozen model's full-attention next-token distributions on the question "
                          "and answer positions of every copy (default: answer)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default: 2e-5)")
    opt.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default: 1)")
    opt.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    opt.add_argument("--batch-size", type=int, default=4, help="samples per micro-batch (default: 4)")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    opt.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps warming up (default: 0.03)")
    opt.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine",
                     help="learning-rate decay after warm-up (default: cosine)")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm; 0 disables (default: 1)")
    opt.add_argument("--seed", type=int, default=0, help="seed of data order and adapter init (default: 0)")

    lora = p.add_argument_group("LoRA (peft)")
    lora.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights; the "
                                                          "adapter is merged into the saved model")
    lora.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    lora.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default: 32)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: 0)")
    lora.add_argument("--lora-targets", default="all-linear",
                      help="comma-separated module names to adapt, or 'all-linear' (default)")

    hw = p.add_argument_group("hardware")
    hw.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    hw.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of the loaded weights (default: float32; use --bf16 for mixed precision)")
    hw.add_argument("--bf16", action="store_true", help="autocast forward passes to bfloat16 (CUDA)")
    hw.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    hw.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa",
                    help="attention backend; both take the block mask (default: sdpa)")
    hw.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default: 0)")

    run_group = p.add_argument_group("logging and checkpoints")
    run_group.add_argument("--log-every", type=int, default=10, help="steps between log lines (default: 10)")
    run_group.add_argument("--save-every", type=int, default=0,
                           help="steps between resumable checkpoints; 0 = final model only (default: 0)")
    run_group.add_argument("--resume", nargs="?", const="latest", default=None,
                           help="resume from a checkpoint directory, or (no value) the latest one in --output-dir")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _template(spec: str, tokenizer):
    from blockrag.template import PRESETS, get_template
    from blockrag.train.data import load_template

    if spec in PRESETS:
        return get_template(spec, tokenizer)
    if Path(spec).exists():
        return load_template(spec)
    raise InvalidInputError(f"expected --template to be a preset in {PRESETS} or a block_template.json file, "
                            f"found {spec!r}")


def _train(args) -> int:
    from blockrag.models import load
    from blockrag.rope import rope_spec
    from blockrag.train.collator import CopyRatio
    from blockrag.train.data import load_jsonl, render_all
    from blockrag.train.trainer import LoraSettings, TrainConfig, Trainer

    ratio = CopyRatio.parse(args.ratio)
    loaded = load(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
                  trust_remote_code=args.trust_remote_code, progress=getattr(args, "verbose", False))
    model, tokenizer = loaded.model, loaded.tokenizer
    template = _template(args.template, tokenizer)
    records = [r for path in args.data for r in load_jsonl(path)]
    samples, dropped = render_all(records, template, tokenizer, max_length=args.max_length,
                                  max_blocks=args.max_blocks)
    print(f"{len(records)} records -> {len(samples)} samples ({dropped} longer than {args.max_length} tokens dropped)",
          file=sys.stderr)
    if len(samples) < args.batch_size:
        raise InvalidInputError(f"expected at least --batch-size={args.batch_size} usable samples, found "
                                f"{len(samples)}")
    rope_spec(model)  # NOTE: refuse, before training, a model the engine could not serve in block mode.
    lora = None
    if args.lora:
        targets = args.lora_targets if args.lora_targets == "all-linear" else tuple(
            t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets)
    config = TrainConfig(
        output_dir=args.output_dir, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio,
        schedule=args.schedule, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, ratio=ratio,
        objective=args.objective,
        lora=lora, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        log_every=args.log_every, save_every=args.save_every, num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    trainer = Trainer(model, tokenizer, config, template=template)
    resume = None
    if args.resume is not None:
        resume = args.output_dir if args.resume == "latest" else args.resume
    result = trainer.fit(samples, resume_from=resume)
    print(f"trained {result.steps} steps in {result.wall_s:.1f} s, final loss {result.final_loss:.4f}; "
          f"model saved to {result.output_dir}", file=sys.stderr)
    return 0


def run(args) -> int:
    """Run ``finetune`` from parsed arguments; 0 on success, 2 on a BlockRAGError (message on stderr)."""
    try:
        return _train(args)
    except BlockRAGError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
