"""Time to first token per turn over a multi-turn chat: finished turns as cached blocks vs one full prefill.

A ``blockrag.chat.ChatSession`` answers N user messages (greedy, the model's own answers join the
conversation). For every turn it records the block-mode prefill (cached turns from the store, only the new
message and the assistant header prefilled) and, on the very same messages, a full-mode prefill (the whole
conversation as one causal prompt). TTFT = time from the call to the first token's logits.

    python benchmarks/chat_turns.py --model tiny-random --turns 20
    python benchmarks/chat_turns.py --model smollm2-135m --turns 20 --out benchmarks/results/chat_turns_cpu_smollm2.json

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockrag.chat import ChatSession  # noqa: E402
from blockrag.cli_common import load_engine  # noqa: E402
from blockrag.errors import PromptTooLongError  # noqa: E402

QUESTIONS = [
    "Which river flows through the town of the old stone bridge?", "How long is that bridge?",
    "Who built it, and when?", "What was carried over it in winter?", "Why did the ferry stop running?",
    "What does the lighthouse keeper do during a storm?", "How far is the lighthouse from the harbour?",
    "Which fish are caught near the pier?", "When is the market held in the square?",
    "What is sold at the bakery on Sundays?", "How old is the church bell tower?",
    "Which bell is the largest, and how heavy is it?", "Where does the railway line end?",
    "How many trains stop at the station each day?", "What grows in the meadow by the weir?",
    "Why is the quarry closed?", "What stone was cut there?", "Who lives on the island?",
    "How do they reach the mainland?", "Summarise what we said about the town in one sentence.",
]


def device_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = load_engine(args.model, quiet=True)
    session = ChatSession(engine, "You are a helpful assistant. Answer briefly.")
    rows = []
    for turn in range(args.turns):
        question = QUESTIONS[turn % len(QUESTIONS)]
        try:
            full = engine.prefill_segments(session.segments(question), mode="full")
        except PromptTooLongError as e:
            print(f"stopped before turn {turn + 1}: {e}", file=sys.stderr)
            break
        started = time.perf_counter()
        generation = session.ask(question, max_new_tokens=args.max_new_tokens)
        wall = time.perf_counter() - started
        usage = generation.prefill.usage
        rows.append({"turn": turn + 1, "context_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens,
                     "encoded_tokens": usage.encoded_tokens, "prefilled_tokens": usage.prefilled_tokens,
                     "block_ttft_ms": round(usage.ttft_s * 1000, 2),
                     "full_ttft_ms": round(full.usage.ttft_s * 1000, 2),
                     "full_prefilled_tokens": full.usage.prefilled_tokens, "answer_s": round(wall, 3)})
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'prefill':>7} {'block ms':>9} {'full ms':>9}")
    for r in rows:
        print(f"{r['turn']:>4} {r['context_tokens']:>7} {r['cached_tokens']:>7} {r['prefilled_tokens']:>7} "
              f"{r['block_ttft_ms']:>9.1f} {r['full_ttft_ms']:>9.1f}")
    last = rows[-5:]
    summary = {
        "benchmark": "chat_turns", "model": args.model, "turns": len(rows), "device": device_name(),
        "dtype": str(engine.dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0], "commit": commit(), "date": datetime.now(timezone.utc).isoformat(),
        "block_ttft_ms_last5_median": sorted(r["block_ttft_ms"] for r in last)[len(last) // 2],
        "full_ttft_ms_last5_median": sorted(r["full_ttft_ms"] for r in last)[len(last) // 2],
        "rows": rows,
    }
    line = json.dumps(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
