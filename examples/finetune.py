"""Block fine-tuning end to end: JSONL -> `blockrag finetune` -> the fine-tuned model answering from a knowledge base.

    python examples/finetune.py --model tiny-random            # seconds on a CPU (a tiny random model: noise)
    python examples/finetune.py                                # the embedded SmolLM2-135M-Instruct (minutes)
    python examples/finetune.py --model ./my-model --workdir out --kb calder-kb --steps 200

A handful of RAG and chat records are written to `train.jsonl` and `blockrag finetune` trains on them (every
sample once with full attention, once with the block mask). The fine-tuned model, served with the block
template saved next to it, then opens or creates the knowledge base (`--kb`) and answers the sample questions
in block mode (passages from cached blocks) and in full mode: the same weights serve both. A knowledge base
built with another model gets the fine-tuned model's KV added beside it (encoded when first needed). For real
settings see the README section "Make your model block-ready"; eight steps on four records teach nothing.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import QUESTIONS, describe_kb, describe_source, describe_usage, knowledge_base, parser, quiet_terminal

RECORDS = [
    {"passages": [{"title": "Paris", "text": "Paris is the capital of France."},
                  "The Seine flows through Paris."],
     "question": "What is the capital of France?", "answer": "Paris."},
    {"instruction": "Answer in one word.",
     "passages": ["Rotary embeddings rotate keys by position.", "The quick brown fox jumps."],
     "question": "What rotates keys?", "answer": "Rotary embeddings."},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Notes:\n\nThe fox jumps.\n\nThe dog sleeps.\n\nWho jumps?"},
                  {"role": "assistant", "content": "The fox."}]},
    {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
                  {"role": "user", "content": "What did I say?"}, {"role": "assistant", "content": "Hello."}]},
]


def finetune(model: str, workdir: Path, steps: int, verbose: bool) -> Path:
    """Write the records and run `blockrag finetune` on them (as a user would); returns the output directory."""
    data, out = workdir / "train.jsonl", workdir / "block-ready"
    workdir.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    command = ["blockrag", "finetune", "--model", model, "--data", str(data), "--output-dir", str(out),
               "--template", "chat", "--ratio", "1:1", "--max-steps", str(steps), "--batch-size", "2",
               "--lr", "1e-3", "--log-every", "2", *([] if verbose else ["--no-progress"])]
    print(f"[finetune] {' '.join(command)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "blockrag.cli", *command[1:]])
    if done.returncode != 0:  # the CLI printed why (e.g. a model it cannot load)
        raise SystemExit(1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None,
                   help="where train.jsonl and the fine-tuned model (block-ready/) go (default: a temporary folder, "
                        "removed at the end: keep one to ask a --kb built here again with `blockrag ask`)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (default: 8)")
    args = p.parse_args(argv)
    quiet_terminal(args.verbose)
    from blockrag import BlockEngine
    from blockrag.models import TINY_NOTE, is_tiny
    from blockrag.train import load_template

    if is_tiny(args.model):
        print(f"[model] {TINY_NOTE.format(name=args.model)}")
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="blockrag-ft-")))
        out = finetune(args.model, workdir, args.steps, args.verbose)
        losses = [round(json.loads(line)["loss"], 3) for line in (out / "train_log.jsonl").read_text().splitlines()]
        print(f"[finetune] losses: {losses}")
        engine = BlockEngine.from_pretrained(str(out), template=load_template(out))
        print(f"[model] fine-tuned {args.model} from {out} on {engine.device} ({engine.dtype})")
        with knowledge_base(args.kb, engine, progress=args.verbose) as kb:
            print(describe_kb(kb.stats()))
            for question in QUESTIONS:
                block = kb.ask(question, k=args.k, max_new_tokens=args.max_tokens)
                full = kb.ask(question, k=args.k, mode="full", max_new_tokens=args.max_tokens)
                print(f"\nQ: {question}")
                print(f"  block mode: {block.text.strip()}")
                print(f"  full mode:  {full.text.strip()}")
                print("sources:")
                for rank, hit in enumerate(block.sources, start=1):
                    print(describe_source(rank, hit.title, hit.source, hit.score))
                print(f"  block mode: {describe_usage(block.usage)}")
                print(f"  full mode:  {describe_usage(full.usage)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
