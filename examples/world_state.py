"""Long-lived state as cached blocks: world lore, one block per character, a live situation.

A game keeps a fixed world description and a state block per character, and asks the model to answer in
character about the current situation. Each of those is a cached segment (a KV block keyed by its text):
only the live situation and the question are prefilled per request, and when one character's state changes
only that character's block is encoded again.

    python examples/world_state.py                      # the embedded model (smollm2-135m), offline
    python examples/world_state.py --model tiny-random  # a tiny random model: answers are noise
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockrag.cli_common import load_engine  # noqa: E402
from blockrag.prompt import Segment  # noqa: E402

LORE = ("World: the river town of Emberford. A stone bridge joins the market bank to the mill bank. "
        "The ferry stopped when the bridge opened. Winter floods close the lower road.")
CHARACTERS = {
    "Mara": "Mara, the miller. Calm, practical. Owns the mill on the east bank. Knows the flood marks.",
    "Tobin": "Tobin, the ferryman. Bitter since the bridge opened. Still keeps his boat tied at the old pier.",
}


def character_block(name: str, state: str) -> Segment:
    return Segment(f"\n[{name}] {state}\n")


def ask(engine, states: dict[str, str], situation: str, speaker: str, max_tokens: int):
    segments = [Segment(f"{LORE}\n"), *(character_block(n, s) for n, s in states.items()),
                Segment(f"\nSituation: {situation}\n{speaker} says:", cached=False)]
    return engine.generate_segments(segments, max_new_tokens=max_tokens, stop=["\n"])


def report(label: str, generation) -> None:
    usage = generation.usage
    print(f"{label}: {generation.text.strip()!r}")
    print(f"  TTFT {usage.ttft_s * 1000:.1f} ms | {usage.cached_tokens} tokens from cached blocks, "
          f"{usage.encoded_tokens} encoded now, {usage.prefilled_tokens} prefilled")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model name (default: the embedded smollm2-135m)")
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    engine = load_engine(args.model)
    states = dict(CHARACTERS)
    report("first request", ask(engine, states, "Rain has fallen for three days.", "Mara", args.max_tokens))
    report("same state, new situation",
           ask(engine, states, "The river is rising fast.", "Tobin", args.max_tokens))
    states["Tobin"] = CHARACTERS["Tobin"] + " Today he offered to ferry people across for free."
    report("Tobin's state changed",
           ask(engine, states, "The bridge is closed by the flood.", "Tobin", args.max_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
