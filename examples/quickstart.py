"""Quickstart: the core API. Build a knowledge base, ask questions, see cached blocks at work.

    python examples/quickstart.py                      # the embedded SmolLM2-135M-Instruct (offline)
    python examples/quickstart.py --model m.gguf       # any GGUF file, model directory or Hub name
    python examples/quickstart.py --model tiny-random  # offline; a tiny random model (answers are noise)

Ingest encodes every passage once (its KV block is stored under a content hash). A question then
retrieves passages, loads their blocks, rotates them into place and prefills only the question.
The same prompt in mode="full" prefills everything: compare the time to first token.
"""

from __future__ import annotations

import sys

from _common import QUESTIONS, describe_kb, describe_source, describe_usage, knowledge_base, load_engine, parser


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    engine = load_engine(args.model)
    with knowledge_base(args.kb, engine) as kb:
        print(describe_kb(kb.stats()))
        for question in QUESTIONS:
            answer = kb.ask(question, k=args.k, max_new_tokens=args.max_tokens)
            print(f"\nQ: {question}\nA: {answer.text.strip()}")
            for rank, hit in enumerate(answer.sources, start=1):
                print(describe_source(rank, hit.title, hit.source, hit.score))
            print(f"  block mode: {describe_usage(answer.usage)}")
            full = kb.ask(question, k=args.k, mode="full", max_new_tokens=1)
            print(f"  full mode:  TTFT {full.usage.ttft_s * 1000:.1f} ms, "
                  f"{full.usage.prefilled_tokens} tokens prefilled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
