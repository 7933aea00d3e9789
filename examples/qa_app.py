"""Interactive question answering in the terminal over a knowledge base, with sources and TTFT per answer.

    python examples/qa_app.py --model tiny-random
    python examples/qa_app.py --kb ~/calder-kb        # keep the knowledge base (and its KV blocks) between runs

Type a question and press Enter; an empty line, 'quit' or Ctrl-D leaves.
"""

from __future__ import annotations

import sys

from _common import describe_source, describe_usage, knowledge_base, load_engine, parser

from blockrag.errors import BlockRAGError


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    engine = load_engine(args.model)
    with knowledge_base(args.kb, engine) as kb:
        print("Ask about the Calder Fell Railway. An empty line, 'quit' or Ctrl-D leaves.")
        while True:
            try:
                question = input("\nquestion> ").strip()
            except EOFError:
                print()
                break
            if not question or question.lower() in ("quit", "exit"):
                break
            try:
                sources, stream = kb.stream(question, k=args.k, max_new_tokens=args.max_tokens)
                for delta in stream:
                    print(delta, end="", flush=True)
            except BlockRAGError as error:  # e.g. a question too long for the model: say so, keep going
                print(f"[error] {error}")
                continue
            print()
            for rank, hit in enumerate(sources, start=1):
                print(describe_source(rank, hit.title, hit.source, hit.score))
            print(f"  {describe_usage(stream.result.usage)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
