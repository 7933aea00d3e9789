"""What every example shares: the `--model` option, loading (or the tiny random stand-in), the sample data."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from blockrag import BlockEngine

DATA_DIR = Path(__file__).resolve().parent / "data" / "calder_fell"
DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
TINY = "tiny-random"
QUESTIONS = (
    "When did trains run all the way to Harrowgill again?",
    "How long is Skelwith Tunnel, and why is work inside it done only in winter?",
    "How much is a family ticket?",
)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hub name or local path of a chat model (default {DEFAULT_MODEL}); "
                        f"'{TINY}' uses a tiny random model offline (its answers are noise)")
    p.add_argument("--kb", default=None,
                   help="knowledge-base folder: opened if it exists, else created and filled with the sample "
                        "documents (default: a temporary folder)")
    p.add_argument("--k", type=int, default=4, help="passages per question")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens per answer")
    return p


def load_engine(model: str) -> BlockEngine:
    """The engine for `model`, or a tiny random model when asked for one or when `model` cannot be loaded."""
    if model == TINY:
        print(f"[model] --model {TINY}: a tiny random model (offline). Its answers are noise; retrieval, "
              "caching and timings are real.")
        return _tiny_engine()
    try:
        engine = BlockEngine.from_pretrained(model)
    except OSError as error:  # transformers raises OSError when the Hub is unreachable or the name is unknown
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"[model] could not load {model!r} ({reason}).\n[model] The Hub may be unreachable from here. "
              "Falling back to a tiny random model: its answers are noise; retrieval, caching and timings are real.")
        return _tiny_engine()
    print(f"[model] {model} on {engine.device} ({engine.dtype})")
    return engine


def _tiny_engine() -> BlockEngine:
    from blockrag.testing import tiny_pipeline

    return BlockEngine(*tiny_pipeline("llama"))


@contextlib.contextmanager
def knowledge_base(folder: str | None, engine: BlockEngine) -> Iterator:
    """Open the knowledge base in `folder`, or create it there (or in a temporary folder) from the sample data."""
    from blockrag.index import KnowledgeBase

    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="blockrag-kb-")), "kb")
        if Path(folder).exists():
            kb = KnowledgeBase.open(folder, engine)
            print(f"[kb] opened {folder}")
        else:
            kb = KnowledgeBase.create(folder, engine)
            kb.add_paths([DATA_DIR])
            print(f"[kb] created {folder} from {len(list(DATA_DIR.glob('*.md')))} documents in {DATA_DIR.name}/")
        stack.callback(kb.close)
        yield kb


def describe_usage(usage) -> str:
    """One line about a request's `blockrag.Usage`: where its tokens came from and how fast it started."""
    return (f"TTFT {usage.ttft_s * 1000:.1f} ms | context: {usage.cached_tokens} tokens from cached blocks, "
            f"{usage.encoded_tokens} encoded now | {usage.prefilled_tokens} prefilled | "
            f"{usage.generated_tokens} generated")


def describe_source(rank: int, title: str | None, source: str | None, score: float) -> str:
    where = Path(source).name if source else "?"
    return f"  [{rank}] {title or where} ({where}, score {score:.2f})"
