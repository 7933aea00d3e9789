"""LlamaIndex question answering over the sample documents: a RetrieverQueryEngine with blockrag parts.

    pip install -e integrations/llamaindex
    python examples/llamaindex_qa.py --model tiny-random
    python examples/llamaindex_qa.py --question "Where are the engines overhauled?"

BlockRAGRetriever searches the knowledge base; BlockSynthesizer hands each retrieved node to
BlockRAGLLM as its own cached KV block (stock synthesizers would flatten them into one string).
"""

from __future__ import annotations

import sys
import time

from _common import QUESTIONS, describe_source, knowledge_base, load_engine, parser
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.llms.blockrag import BlockRAGLLM, BlockSynthesizer
from llama_index.retrievers.blockrag import BlockRAGRetriever


class UsageLog(BaseEventHandler):
    """Keeps the engine usage of the latest completion (LlamaIndex instrumentation event)."""

    usage: dict = {}

    @classmethod
    def class_name(cls) -> str:
        return "UsageLog"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMCompletionEndEvent) and event.response is not None and event.response.raw:
            self.usage = event.response.raw["usage"]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--question", action="append", help="a question to ask (repeatable; default: three samples)")
    args = p.parse_args(argv)
    engine = load_engine(args.model)
    log = UsageLog()
    get_dispatcher().add_event_handler(log)
    with knowledge_base(args.kb, engine) as kb:
        llm = BlockRAGLLM(engine=kb.engine, max_new_tokens=args.max_tokens)  # always pass llm= explicitly
        query_engine = RetrieverQueryEngine(BlockRAGRetriever(kb, similarity_top_k=args.k),
                                            response_synthesizer=BlockSynthesizer(llm, streaming=True))
        for question in args.question or QUESTIONS:
            print(f"\nQ: {question}\nA: ", end="", flush=True)
            start, first = time.perf_counter(), None
            response = query_engine.query(question)
            for delta in response.response_gen:
                first = first or time.perf_counter() - start
                print(delta, end="", flush=True)
            print()
            for rank, scored in enumerate(response.source_nodes, start=1):
                meta = scored.node.metadata
                print(describe_source(rank, meta["title"], meta["source"], scored.score or 0.0))
            usage = log.usage
            print(f"  {usage['cached_tokens']} of {usage['prompt_tokens']} prompt tokens from cached blocks | "
                  f"engine TTFT {usage['ttft_s'] * 1000:.1f} ms | first text after {(first or 0) * 1000:.1f} ms "
                  "(incl. retrieval)")
    get_dispatcher().event_handlers.remove(log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
