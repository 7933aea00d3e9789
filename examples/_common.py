"""What every example shares: the `--model` option, loading (or the tiny random stand-in), the sample data."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

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
        engine = BlockEngine.from_pretrained(_local_or_hub(model))
    except OSError as error:  # what transformers and huggingface_hub raise for unreachable or unknown models
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"[model] could not load {model!r}: {reason}\n[model] Falling back to a tiny random model: its "
              "answers are noise; retrieval, caching and timings are real.")
        return _tiny_engine()
    print(f"[model] {model} on {engine.device} ({engine.dtype})")
    return engine


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # NOTE: behind a proxy a direct connection proves nothing; let the download decide.
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _local_or_hub(model: str) -> str:
    """`model` itself when it is a folder or the Hub answers; else its copy in the local Hub cache.

    Without this, an unreachable Hub costs a minute of download retries before the error.
    """
    if Path(model).exists() or _hub_reachable():
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, local_files_only=True)
    except (OSError, ValueError) as error:  # not in the cache, or not a valid repo id
        raise OSError(f"the Hub is unreachable from here and {model!r} is not in the local cache "
                      f"({type(error).__name__})") from error


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


def describe_kb(stats: dict) -> str:
    return (f"[kb] {stats['documents']} documents, {stats['passages']} passages, {stats['kv_blocks']} KV blocks "
            f"({stats['kv_bytes'] / 1e6:.1f} MB, {stats['kv_dtype']}) for model {stats['model']['name']}")


def describe_usage(usage) -> str:
    """One line about a request's `blockrag.Usage`: where its tokens came from and how fast it started."""
    return (f"TTFT {usage.ttft_s * 1000:.1f} ms | context: {usage.cached_tokens} tokens from cached blocks, "
            f"{usage.encoded_tokens} encoded now | {usage.prefilled_tokens} prefilled | "
            f"{usage.generated_tokens} generated")


def describe_source(rank: int, title: str | None, source: str | None, score: float) -> str:
    where = Path(source).name if source else "?"
    return f"  [{rank}] {title or where} ({where}, score {score:.2f})"
