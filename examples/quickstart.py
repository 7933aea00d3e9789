"""Quickstart: the core API. Build a knowledge base, ask questions, compare block and full mode.

    python examples/quickstart.py                      # the embedded SmolLM2-135M-Instruct (offline)
    python examples/quickstart.py --model m.gguf       # any GGUF file, model directory or Hub name
    python examples/quickstart.py --model tiny-random  # a tiny random model (answers are noise)

Ingest encodes every passage once (its KV block is stored under a content hash). A question then
retrieves passages, loads their blocks, rotates them into place and prefills only the question
(block mode). The same prompt in full mode prefills everything: compare the answers and the time to
first token. SmolLM2-135M was not block-fine-tuned, so its block-mode answers are less reliable than
its full-mode ones (see "Accuracy" in the README).
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
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    quiet_terminal(args.verbose)
    engine = load_engine(args.model)
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
            speedup = full.usage.ttft_s / max(block.usage.ttft_s, 1e-9)
            print(f"  TTFT: block {block.usage.ttft_s * 1000:.0f} ms vs full {full.usage.ttft_s * 1000:.0f} ms "
                  f"({speedup:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
