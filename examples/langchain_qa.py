"""LangChain question answering over the sample documents: BlockRAGRetriever + ChatBlockRAG in an LCEL chain.

    pip install -e integrations/langchain
    python examples/langchain_qa.py --model tiny-random
    python examples/langchain_qa.py --question "What does a Rover ticket cost?"

Retrieved documents reach the chat model as `text-plain` content blocks carrying their block keys, so
their KV comes from the knowledge base's cache; `usage_metadata.input_token_details.cache_read` shows it.
"""

from __future__ import annotations

import sys

from _common import QUESTIONS, describe_source, knowledge_base, load_engine, parser
from langchain_blockrag import BlockRAGRetriever, ChatBlockRAG, create_rag_chain


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--question", action="append", help="a question to ask (repeatable; default: three samples)")
    args = p.parse_args(argv)
    engine = load_engine(args.model)
    with knowledge_base(args.kb, engine) as kb:
        chain = create_rag_chain(BlockRAGRetriever(knowledge_base=kb, k=args.k),
                                 ChatBlockRAG(engine=kb.engine, max_tokens=args.max_tokens))
        for question in args.question or QUESTIONS:
            print(f"\nQ: {question}\nA: ", end="", flush=True)
            message, sources = None, []
            for part in chain.stream(question):  # parts of the output dict, as they are ready
                if "sources" in part:
                    sources = part["sources"]
                if "message" in part:
                    print(part["message"].text, end="", flush=True)
                    message = part["message"] if message is None else message + part["message"]
            print()
            for rank, doc in enumerate(sources, start=1):
                print(describe_source(rank, doc.metadata["title"], doc.metadata["source"], doc.metadata["score"]))
            usage = message.usage_metadata
            print(f"  {usage['input_token_details']['cache_read']} of {usage['input_tokens']} prompt tokens read from "
                  f"cached blocks | TTFT {message.response_metadata['ttft_s'] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
