"""Quickstart: the core API. Build a knowledge base, ask questions, compare block and full mode.

    python examples/quickstart.py                      # the embedded SmolLM2-135M-Instruct, block fine-tuned (offline)
    python examples/quickstart.py --model smollm2-135m --recompute recommended   # the base model, with recovery
    python examples/quickstart.py --model m.gguf       # any GGUF file, model directory or Hub name
    python examples/quickstart.py --model tiny-random  # a tiny random model (answers are noise)

Ingest encodes every passage once (its KV block is stored under a content hash). A question then
retrieves passages, loads their blocks, rotates them into place and prefills only the question
(block mode). The same prompt in full mode prefills everything: compare the answers and the time to
first token. The default model, smollm2-135m-block, was block fine-tuned: on held-out real questions its block
mode is within a point of its full mode. A model that was not (e.g. the base smollm2-135m) answers less reliably in
block mode; --recompute recommended adds a column with training-free recovery, which re-encodes about a fifth of
the context with full attention before the question (see "Training-free recovery" in the README).
"""

from __future__ import annotations

import sys

from _common import (
    QUESTIONS,
    describe_kb,
    describe_source,
    describe_usage,
    knowledge_base,
    load_engine,
    parser,
    quiet_terminal,
)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--recompute", default=None, metavar="SEL",
                   help="also answer in block mode with this training-free recovery selection (e.g. 'recommended', "
                        "for a model that was not block fine-tuned)")
    args = p.parse_args(argv)
    quiet_terminal(args.verbose)
    engine = load_engine(args.model)
    with knowledge_base(args.kb, engine, progress=args.verbose) as kb:
        print(describe_kb(kb.stats()))
        for question in QUESTIONS:
            answers = {"block mode": kb.ask(question, k=args.k, max_new_tokens=args.max_tokens)}
            if args.recompute:
                answers["block + recovery"] = kb.ask(question, k=args.k, max_new_tokens=args.max_tokens,
                                                     recompute=args.recompute)
            answers["full mode"] = kb.ask(question, k=args.k, mode="full", max_new_tokens=args.max_tokens)
            print(f"\nQ: {question}")
            for label, answer in answers.items():
                print(f"  {label + ':':<17} {answer.text.strip()}")
            print("sources:")
            for rank, hit in enumerate(answers["block mode"].sources, start=1):
                print(describe_source(rank, hit.title, hit.source, hit.score))
            for label, answer in answers.items():
                print(f"  {label + ':':<17} {describe_usage(answer.usage)}")
            full_ms = answers["full mode"].usage.ttft_s * 1000
            print("  TTFT: " + ", ".join(f"{label} {a.usage.ttft_s * 1000:.0f} ms "
                                         f"({full_ms / max(a.usage.ttft_s * 1000, 1e-6):.1f}x)"
                                         for label, a in answers.items() if label != "full mode")
                  + f" vs full {full_ms:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
