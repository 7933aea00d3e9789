"""What every example shares: the `--model` option, loading (or the tiny random stand-in), the sample data."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from blockrag import BlockEngine
from blockrag.models import DEFAULT_MODEL  # smollm2-135m-block: the embedded model block fine-tuned

DATA_DIR = Path(__file__).resolve().parent / "data" / "calder_fell"
TINY = "tiny-random"
# NOTE: questions whose answer one passage states and that smollm2-135m answers correctly in full mode (checked when
# they were chosen, before any block fine-tuning; the README's demo output says how each model answers them).
QUESTIONS = (
    "How long is Skelwith Tunnel?",
    "How much does an adult return ticket cost?",
    "In what year was the railway built?",
    "Who founded the Calder Fell Railway Trust?",
)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a short offline name (default {DEFAULT_MODEL}: the embedded SmolLM2-135M-Instruct, block "
                        "fine-tuned; smollm2-135m is the base model), a .gguf file, a local model directory or a Hub "
                        f"name; '{TINY}' uses a tiny random model offline (its answers are noise)")
    p.add_argument("--kb", default=None,
                   help="knowledge-base folder: opened if it exists, else created and filled with the sample "
                        "documents (default: a temporary folder)")
    p.add_argument("--k", type=int, default=4, help="passages per question")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens per answer")
    p.add_argument("--verbose", action="store_true", help="show library warnings and loading progress bars")
    return p


def quiet_terminal(verbose: bool = False) -> None:
    """No deprecation chatter from the libraries and no progress bars, unless ``verbose``."""
    if verbose:
        return
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    hf_logging.disable_progress_bar()


def load_engine(model: str) -> BlockEngine:
    """The engine for `model` (any name blockrag.models resolves); a clear error and exit if it cannot be loaded."""
    from blockrag.errors import BlockRAGError
    from blockrag.models import is_tiny, resolve

    if is_tiny(model):
        print(f"[model] --model {model}: a tiny random model (offline). Its answers are noise; retrieval, "
              "caching and timings are real.")
    try:
        print(f"[model] loading {resolve(model).describe()}", flush=True)
        engine = BlockEngine.from_pretrained(model)
    except BlockRAGError as error:  # no silent fallback to another model: say what failed and stop
        print(f"[model] error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"[model] {model} on {engine.device} ({engine.dtype})")
    return engine


@contextlib.contextmanager
def knowledge_base(folder: str | None, engine: BlockEngine, progress: bool = False) -> Iterator:
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
            kb.add_paths([DATA_DIR], progress=progress)
            print(f"[kb] created {folder} from {len(list(DATA_DIR.glob('*.md')))} documents in {DATA_DIR.name}/")
        stack.callback(kb.close)
        yield kb


def describe_kb(stats: dict) -> str:
    return (f"[kb] {stats['documents']} documents, {stats['passages']} passages, {stats['kv_blocks']} KV blocks "
            f"({stats['kv_bytes'] / 1e6:.1f} MB, {stats['kv_dtype']}) for model {stats['model']['name']}")


def describe_usage(usage) -> str:
    """One line about a request's `blockrag.Usage`: where its tokens came from and how fast it started."""
    recomputed = f", {usage.recomputed_tokens} recomputed" if usage.recomputed_tokens else ""
    return (f"TTFT {usage.ttft_s * 1000:.1f} ms | context: {usage.cached_tokens} tokens from cached blocks, "
            f"{usage.encoded_tokens} encoded now{recomputed} | {usage.prefilled_tokens} prefilled | "
            f"{usage.generated_tokens} generated")


def describe_source(rank: int, title: str | None, source: str | None, score: float) -> str:
    where = Path(source).name if source else "?"
    return f"  [{rank}] {title or where} ({where}, score {score:.2f})"
