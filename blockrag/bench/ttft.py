"""Time to first token, block mode vs full mode, through the engine API a user calls.

For each context size: deterministic passages of about that many context tokens (text generated here, so
nothing outside the package is needed), their blocks encoded once (timed apart, as at ingest), then
``BlockEngine.prefill`` timed in block mode (cached blocks, only the final block prefilled) and in full
mode (one causal prefill over the same token ids). The two modes alternate call by call, so a machine
that drifts or gets busy slows both alike and their ratio stays meaningful. TTFT is the engine's own
``Usage.ttft_s`` (from the call to the first token's logits, device synchronised). Every row records the
load average before and after it was timed: on a shared machine that is the first thing to read beside
a figure.

Knows nothing of argparse or files: ``blockrag.bench.cli`` validates, loads the model, prints and writes.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from blockrag.eval.report import cpu_name

MODES = ("block", "full")
DEFAULT_QUESTION = "Which bridge was rebuilt after the winter flood, and who carried the stone for it?"

# Pseudo-English filler: content does not matter for timing, but real words tokenize like real text does.
_WORDS = ("river", "harbour", "tide", "bridge", "station", "valley", "engine", "signal", "winter", "tunnel",
          "village", "market", "quarry", "lantern", "ferry", "mill", "orchard", "granite", "canal", "beacon",
          "north", "south", "old", "new", "long", "narrow", "early", "late", "quiet", "busy",
          "built", "closed", "opened", "crossed", "carried", "measured", "repaired", "flooded", "rebuilt", "named",
          "the", "a", "of", "in", "on", "by", "after", "before", "near", "under",
          "1821", "1904", "three", "twelve", "forty", "miles", "metres", "years", "workers", "keepers")


@dataclass(frozen=True)
class ModeTiming:
    """TTFT of one mode at one size, over the timed calls (milliseconds).

    Token counts are the last timed call's ``Usage`` (every timed call runs the same prompt).
    """

    median_ms: float
    min_ms: float
    times_ms: tuple[float, ...]
    cached_tokens: int
    encoded_tokens: int
    prefilled_tokens: int

    @classmethod
    def of(cls, usages: Sequence[Any]) -> ModeTiming:
        times = [u.ttft_s * 1e3 for u in usages]
        last = usages[-1]
        return cls(round(statistics.median(times), 3), round(min(times), 3), tuple(round(t, 3) for t in times),
                   last.cached_tokens, last.encoded_tokens, last.prefilled_tokens)


@dataclass(frozen=True)
class SizeResult:
    """One context size: the prompt measured, its encoding, both modes side by side, the load around them.

    Attributes:
        size: the context tokens asked for (block 0 + passages, before the final block).
        context_tokens / question_tokens / prompt_tokens: what the prompt really held (final block = question).
        passages: passage blocks in the context (block 0, the instruction, not counted).
        encode_ms: encoding block 0 and every passage block once (one measurement, not a median).
        full_over_block: full-mode median TTFT / block-mode median TTFT, both from this run.
        load_avg_before / load_avg_after: os.getloadavg() (1, 5, 15 min) before the encoding and after the
            last timed call; None where the platform has none.
    """

    size: int
    context_tokens: int
    question_tokens: int
    prompt_tokens: int
    passages: int
    encode_ms: float
    block: ModeTiming
    full: ModeTiming
    full_over_block: float
    load_avg_before: tuple[float, float, float] | None
    load_avg_after: tuple[float, float, float] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- prompt ----------------------------------------------------------------------------------------

def _words(rng: random.Random, count: int) -> list[str]:
    """About ``count`` words in sentences of 7-15 words (capitalised first word, full stop)."""
    words: list[str] = []
    while len(words) < count:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(7, 15))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        words += sentence
    return words


def _fill(engine, tokens: int, rng: random.Random) -> str:
    """The longest run of seeded words whose passage block has at most ``tokens`` tokens (one word at least)."""
    def size(n: int) -> int:
        return len(engine.block_ids(" ".join(words[:n])))

    words = _words(rng, tokens)
    for _ in range(8):  # NOTE: a word is at least one token in every tokenizer we know; grow if one is not
        if size(len(words)) >= tokens:
            break
        words += _words(rng, tokens)
    low, high = 1, len(words)
    while low < high:
        middle = (low + high + 1) // 2
        if size(middle) <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def build_passages(engine, context_tokens: int, passage_tokens: int, *, seed: str = "blockrag-bench",
                   instruction: str | None = None) -> list[str]:
    """Passages that, after block 0, fill about ``context_tokens`` context tokens.

    Each passage block (as the engine's template renders it) holds at most ``passage_tokens`` tokens, the
    last one what is left. The words are drawn by a generator seeded with ``seed`` and the passage's index:
    the same arguments give the same token ids on every run and machine (for one tokenizer and template).
    """
    left = context_tokens - len(engine.prefix_ids(instruction))
    passages: list[str] = []
    while left > 0:
        text = _fill(engine, min(passage_tokens, left), random.Random(f"{seed}:{len(passages)}"))
        tokens = len(engine.block_ids(text))
        if passages and tokens - left > left:
            break  # NOTE: the smallest block left would overshoot the size by more than stopping falls short
        passages.append(text)
        left -= tokens
    return passages


# --- measurement -----------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_size(engine, size: int, *, passage_tokens: int, question: str, repeats: int, warmup: int,
                 instruction: str | None = None) -> SizeResult:
    """Build the prompt of ``size`` context tokens, encode it once, then time both modes (see the module doc)."""
    assert repeats >= 1 and warmup >= 0, (repeats, warmup)
    passages = build_passages(engine, size, passage_tokens, seed=f"blockrag-bench:{size}", instruction=instruction)
    before = load_average()
    start = time.perf_counter()
    # NOTE: block 0 too, so that no timed block-mode call encodes anything (its Usage shows encoded_tokens 0)
    engine.source_blocks([engine.prefix_ids(instruction)])
    blocks = engine.encode(passages)
    _sync(engine.device)
    encode_ms = (time.perf_counter() - start) * 1e3

    def call(mode: str):
        return engine.prefill(blocks, question, instruction=instruction, mode=mode)

    for _ in range(warmup):
        for mode in MODES:
            call(mode)
    usages: dict[str, list[Any]] = {mode: [] for mode in MODES}
    last = None
    for _ in range(repeats):
        for mode in MODES:  # NOTE: alternating, so drift or a burst of outside load hits both modes alike
            last = call(mode)
            usages[mode].append(last.usage)
    after = load_average()
    block, full = ModeTiming.of(usages["block"]), ModeTiming.of(usages["full"])
    return SizeResult(size=size, context_tokens=len(last.input_ids) - len(last.final_ids),
                      question_tokens=len(last.final_ids), prompt_tokens=len(last.input_ids), passages=len(blocks),
                      encode_ms=round(encode_ms, 3), block=block, full=full,
                      full_over_block=round(full.median_ms / block.median_ms, 3) if block.median_ms else float("nan"),
                      load_avg_before=before, load_avg_after=after)


def measure(engine, sizes: Sequence[int], *, passage_tokens: int = 256, question: str = DEFAULT_QUESTION,
            repeats: int = 5, warmup: int = 1, instruction: str | None = None,
            progress: Callable[[SizeResult], None] | None = None) -> list[SizeResult]:
    """``measure_size`` for each size, in order; ``progress`` is called with each row as it is done.

    With ``warmup`` > 0 one short prompt runs in both modes first, so that the first size's encoding does
    not pay for the process's first forward passes.
    """
    if warmup:
        short = [_fill(engine, 16, random.Random("blockrag-bench:warm-up"))]
        for mode in MODES:
            engine.prefill(short, question, instruction=instruction, mode=mode)
    rows = []
    for size in sizes:
        row = measure_size(engine, size, passage_tokens=passage_tokens, question=question, repeats=repeats,
                           warmup=warmup, instruction=instruction)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


# --- the machine -----------------------------------------------------------------------------------

def load_average() -> tuple[float, float, float] | None:
    """os.getloadavg() rounded to 2 digits (1, 5, 15 minutes), or None where the platform has none."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return None
    return round(one, 2), round(five, 2), round(fifteen, 2)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({cpu_name()}, {os.cpu_count()} cores)"


def commit() -> str | None:
    """Short git commit of the blockrag tree that was imported ('+dirty' if its tracked files under blockrag/
    differ), or None if it is not a git checkout. BLOCKRAG_COMMIT overrides (a copy without .git)."""
    if os.environ.get("BLOCKRAG_COMMIT"):
        return os.environ["BLOCKRAG_COMMIT"]
    package = Path(__file__).resolve().parents[1]

    def git(where: Path, *args: str) -> str:
        done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        top = git(package, "rev-parse", "--show-toplevel")
        # NOTE: an installed copy inside another checkout (a venv in a repo) is not that checkout's commit
        if not top or Path(top, "blockrag").resolve() != package:
            return None
        sha = git(Path(top), "rev-parse", "--short", "HEAD")
        dirty = git(Path(top), "status", "--porcelain", "--untracked-files=no", "--", "blockrag")
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def environment(engine) -> dict[str, Any]:
    """What a figure needs beside it: device, dtype, threads, library versions, blockrag version and commit, date."""
    import transformers

    from blockrag import __version__

    return {"device": describe_device(engine.device), "device_type": engine.device.type,
            "dtype": str(engine.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "fast_attention": bool(engine.fast_attention),
            "cuda_graphs": engine.graphs.max_context if engine.graphs is not None else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "blockrag": __version__, "commit": commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# --- table -----------------------------------------------------------------------------------------

def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def _load(value) -> str:
    return "/".join(f"{x:.2f}" for x in value) if value else "n/a"


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one line naming the run, one saying what was timed, one row per size.

    ``result`` is the document ``blockrag bench`` writes (environment, settings and ``rows`` as dicts), so a
    results.json read back renders the same table.
    """
    version = result["blockrag"] + (f" ({result['commit']})" if result.get("commit") else "")
    lines = [f"blockrag bench | model {result['model']} | {result['device']} | {result['dtype']}, "
             f"torch threads {result['threads']} | torch {result['torch']}, transformers {result['transformers']} | "
             f"blockrag {version} | {result['date']}",
             "",
             f"TTFT: BlockEngine.prefill to the first token's logits (Usage.ttft_s), median (min) of "
             f"{result['repeats']} after {result['warmup']} warm-up; block and full mode alternate in one run. "
             f"Passages of at most {result['passage_tokens']} tokens; encode: block 0 and every passage once.",
             "",
             "| context tokens | passages | question tokens | encode ms | block TTFT ms | full TTFT ms | full / block "
             "| prefilled block / full | load avg 1/5/15 min before -> after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        block, full = row["block"], row["full"]
        lines.append(f"| {row['context_tokens']} | {row['passages']} | {row['question_tokens']} | "
                     f"{_ms(row['encode_ms'])} | {_ms(block['median_ms'])} ({_ms(block['min_ms'])}) | "
                     f"{_ms(full['median_ms'])} ({_ms(full['min_ms'])}) | {_ratio(row['full_over_block'])} | "
                     f"{block['prefilled_tokens']} / {full['prefilled_tokens']} | "
                     f"{_load(row['load_avg_before'])} -> {_load(row['load_avg_after'])} |")
    return "\n".join(lines) + "\n"
