"""``blockrag bench``: time to first token of block mode vs full mode on this machine, in one command.

    blockrag bench                                         smollm2-135m-block, 1K/2K/4K context, cuda if available
    blockrag bench --model tiny-random --sizes 256,512 --repeats 2 --out bench/

``blockrag.cli`` (the one ``main``) registers it: it imports this module only for ``blockrag bench`` and
calls ``add_parser(subparsers)`` and ``run(args)``. Every argument is checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from blockrag.errors import InvalidInputError

DEFAULT_SIZES = "1024,2048,4096"
DEFAULT_PASSAGE_TOKENS = 256
DEFAULT_REPEATS = 5
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"

DESCRIPTION = """\
Time to first token (TTFT) of block mode against full mode, through the engine API a user calls
(BlockEngine.prefill; TTFT is the Usage.ttft_s the engine reports).

For each --sizes entry: passages of generated text, about that many context tokens in all (block 0, the
instruction, included), are encoded once (timed apart: 'encode'); then block mode (cached passage KV, only
the question prefilled) and full mode (one ordinary prefill of the same tokens) are timed call by call in
turn, --repeats each after --warmup rounds; the table shows median (min) and their ratio full / block.
Every row carries the load average (1/5/15 min) before its encoding and after its last timed call; a busy
machine is slow in both modes, so compare figures only where the load was alike.

Writes OUT/results.json (device, dtype, threads, torch / transformers versions, blockrag version and git
commit, date, every timed call) and OUT/table.md, prints the table and ends with one JSON line.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on an argparse subparsers object."""
    from blockrag.models import DEFAULT_MODEL, TINY_PREFIX

    p = subparsers.add_parser("bench", help="time to first token: block vs full mode on this machine",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, metavar="M",
                       help=f"a short offline name (default {DEFAULT_MODEL!r}, the embedded model), a .gguf file, a "
                            f"local model directory or a Hugging Face Hub name; '{TINY_PREFIX}' builds a tiny random "
                            "model (offline; checks the command, its timings say little)")
    model.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="weight and KV dtype (default: bfloat16 on CUDA, float32 on CPU)")
    model.add_argument("--cuda-graphs", type=int, default=None, metavar="N",
                       help="replay the final-block prefill from CUDA graphs for contexts up to N tokens (CUDA, "
                            "16-bit dtype; reserves a KV buffer of N tokens); default: off")
    model.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch CPU threads (intra-op); default: torch's choice (all cores). Recorded with the "
                            "results")

    prompt = p.add_argument_group("prompt")
    prompt.add_argument("--sizes", default=DEFAULT_SIZES, metavar="LIST",
                        help=f"comma-separated context sizes in tokens, one row each (default {DEFAULT_SIZES})")
    prompt.add_argument("--passage-tokens", type=int, default=DEFAULT_PASSAGE_TOKENS, metavar="N",
                        help=f"most tokens per passage block (default {DEFAULT_PASSAGE_TOKENS})")
    prompt.add_argument("--question", default=None, metavar="TEXT",
                        help="the question (the final block, the only part block mode prefills); default: a "
                             "fixed sentence")

    timing = p.add_argument_group("timing and output")
    timing.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, metavar="N",
                        help=f"timed calls per mode and size; the median is reported (default {DEFAULT_REPEATS})")
    timing.add_argument("--warmup", type=int, default=1, metavar="N",
                        help="untimed calls per mode and size before the timed ones (default 1)")
    timing.add_argument("--out", default=None, metavar="DIR",
                        help=f"directory for {RESULTS_FILE} and {TABLE_FILE} (created if missing; earlier files "
                             "there are replaced). Default: a new temporary directory, printed")
    timing.add_argument("--json", action="store_true", help="print only the JSON line, not the table")
    p.set_defaults(func=run)
    return p


def _sizes(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")]
    try:
        sizes = tuple(int(part) for part in parts)
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise InvalidInputError(f"expected --sizes as comma-separated positive integers (context tokens, e.g. "
                                f"{DEFAULT_SIZES}), found {text!r}")
    return sizes


def _check(args) -> tuple[int, ...]:
    """The sizes; every other argument that needs no model checked too (InvalidInputError)."""
    sizes = _sizes(args.sizes)
    for name, value, least in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                               ("--passage-tokens", args.passage_tokens, 1)):
        if value < least:
            raise InvalidInputError(f"expected {name} >= {least}, found {value}")
    if args.cuda_graphs is not None and args.cuda_graphs < 1:
        raise InvalidInputError(f"expected --cuda-graphs >= 1 (context tokens), found {args.cuda_graphs}")
    if args.threads is not None and args.threads < 1:
        raise InvalidInputError(f"expected --threads >= 1, found {args.threads}")
    if args.question is not None and not args.question.strip():
        raise InvalidInputError(f"expected a non-empty --question, found {args.question!r}")
    if args.out is not None:
        _check_out(args.out)
    return sizes


def _check_out(given: str) -> None:
    """Refuse an --out that is a file or cannot be created, without creating anything yet."""
    out = Path(given)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"expected --out to be a directory (created if missing), found the file {given}; "
                                "give a directory")
    parent = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"expected --out to be a directory that can be created, found {parent or given} is "
                                f"{'not a directory' if parent is not None and not parent.is_dir() else 'not writable'}"
                                "; give another directory")


def _out_dir(given: str | None) -> Path:
    if given is None:
        return Path(tempfile.mkdtemp(prefix="blockrag-bench-"))
    out = Path(given)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"expected --out to be a directory that can be created, found {given} cannot "
                                f"({e.strerror or e}); give another directory") from None
    return out


def _check_fits(engine, sizes: tuple[int, ...], question: str) -> None:
    """Refuse sizes the model cannot hold, or that leave no room for a passage, before any is encoded."""
    question_tokens = len(engine.final_ids(question))
    block0 = len(engine.prefix_ids())
    if engine.max_positions and max(sizes) + question_tokens > engine.max_positions:
        raise InvalidInputError(f"expected --sizes up to {engine.max_positions - question_tokens} for this model "
                                f"({engine.max_positions} positions, {question_tokens} of them the question's), "
                                f"found {max(sizes)}; give smaller sizes")
    if min(sizes) <= block0:
        raise InvalidInputError(f"expected --sizes above {block0}, the tokens of block 0 (the instruction) that "
                                f"every prompt starts with, found {min(sizes)}; give larger sizes")


def run(args) -> int:
    """Run ``blockrag bench``; returns the exit code."""
    from blockrag.models import resolve, resolve_device

    sizes = _check(args)
    device = resolve_device(args.device)  # a missing GPU is refused before anything is read
    if args.cuda_graphs is not None:
        if device.type != "cuda":
            raise InvalidInputError(f"expected --cuda-graphs on a CUDA device, found {device}; drop it or give "
                                    "--device cuda")
        if args.dtype == "float32":
            raise InvalidInputError("expected --cuda-graphs with a 16-bit --dtype (bfloat16 or float16, the CUDA "
                                    "default), found float32")
    resolve(args.model)  # an unknown name, a missing file: refused before any weights load
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    from blockrag.bench.ttft import DEFAULT_QUESTION, environment, format_table, measure
    from blockrag.cli_common import load_engine

    question = args.question if args.question is not None else DEFAULT_QUESTION
    engine = load_engine(args.model, device=str(device), dtype=args.dtype, progress=getattr(args, "verbose", False),
                         cuda_graphs=args.cuda_graphs)
    _check_fits(engine, sizes, question)
    if args.cuda_graphs is not None and max(sizes) > args.cuda_graphs:
        raise InvalidInputError(f"expected --sizes up to --cuda-graphs ({args.cuda_graphs} context tokens), found "
                                f"{max(sizes)}; give a larger --cuda-graphs")
    out = _out_dir(args.out)  # NOTE: only now, so that a refused run leaves nothing behind
    print(f"blockrag bench: results go to {out}", file=sys.stderr)

    def progress(row) -> None:
        print(f"  {row.context_tokens} context tokens: block {row.block.median_ms:.2f} ms, full "
              f"{row.full.median_ms:.2f} ms (full / block {row.full_over_block:.1f}x), load "
              f"{row.load_avg_after[0] if row.load_avg_after else 'n/a'}", file=sys.stderr)

    print(f"timing {len(sizes)} sizes x block and full mode, {args.warmup} warm-up + {args.repeats} calls each, "
          f"{args.model} on {engine.device} ...", file=sys.stderr)
    rows = measure(engine, sizes, passage_tokens=args.passage_tokens, question=question, repeats=args.repeats,
                   warmup=args.warmup, progress=progress)
    result = {"benchmark": "blockrag bench", "model": args.model, **environment(engine), "question": question,
              "passage_tokens": args.passage_tokens, "repeats": args.repeats, "warmup": args.warmup,
              "out": str(out), "rows": [row.to_dict() for row in rows]}
    table = format_table(result)
    try:
        (out / RESULTS_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (out / TABLE_FILE).write_text(table, encoding="utf-8")
    except OSError as e:
        print(json.dumps(result))  # NOTE: minutes of measurements are not lost with the files
        raise InvalidInputError(f"expected to write {RESULTS_FILE} and {TABLE_FILE} into {out}, found it cannot be "
                                f"written ({e.strerror or e}); the results are the JSON line above") from None
    if not args.json:
        print(table)
        print(f"written: {out / RESULTS_FILE}, {out / TABLE_FILE}")
    print(json.dumps(result))
    return 0
