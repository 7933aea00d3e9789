"""``blockrag eval``: RAG accuracy and time to first token, block mode vs full mode (vs closed-book), in one command.

``blockrag.cli`` (the one ``main``) registers it: it imports this module only for ``blockrag eval`` and calls
``add_parser(subparsers)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blockrag.errors import InvalidInputError

SYNTHETIC = "synthetic"
SYNTHETIC_DEFAULT_COUNT = 200
DEFAULT_K = 5
MAX_LISTED_PROBLEMS = 20

DESCRIPTION = """\
Answer every question of a dataset in each mode and score it:
  block        passages' KV encoded once and cached; only the question (final block) is prefilled
  full         one ordinary prefill of the same prompt
  closed-book  the same prompt without passages
  block-noreencode  block mode without position re-encoding (each block at positions 0..T-1; ablation)
  recompute    block mode plus training-free recovery: the context tokens chosen by --recompute are
               re-encoded with full attention at question time (first:K, deviation:R[@L], query:R[@L], all)
Writes OUT/results.jsonl (one line per question and mode, appended as it goes: re-running the same command
resumes an interrupted run), OUT/summary.json, OUT/table.md and OUT/chart.png, and prints the table.

Metrics: accuracy = a normalised gold answer occurs in the normalised output (the paper's metric); EM and
token F1 with SQuAD normalisation; the best over all gold answers. TTFT per mode: mean, p50, p95.

Data formats (--format auto decides from the first record):
  hotpot  2WikiMultiHopQA / HotpotQA: {"_id", "question", "answer", "context": [[title, [sentences]], ...]}
  dpr     NQ / TriviaQA, DPR/FiD retrieval: {"question", "answers": [...], "ctxs": [{"title", "text", "score"}]}
  jsonl   generic: {"id"?, "question", "answers": [...], "passages"?: [str | {"title"?, "text", "score"?}]}
Files are JSON arrays or JSON Lines (.gz too). --data synthetic evaluates the synthetic RAG task of
blockrag.train.synthetic (use a checkpoint trained on it: its directory holds synthetic_task.json).

Paper protocol (arXiv 2409.15355, Table 1): --model ldsjmdy/Tulu3-Block-FT --template tulu3-block --k 10
--modes block,full on each of the four datasets.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("eval", help="RAG accuracy and TTFT: block vs full mode (vs closed-book)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="FILE",
                      help="evaluation file (.json array or .jsonl, optionally .gz), or 'synthetic' for the "
                           "synthetic RAG task")
    data.add_argument("--format", default="auto", metavar="FORMAT",
                      help="auto (default), hotpot (2WikiMultiHopQA/HotpotQA), dpr (NQ/TriviaQA in DPR/FiD "
                           "format) or jsonl (generic); aliases: 2wiki, hotpotqa, nq, triviaqa")
    data.add_argument("--limit", type=int, default=None, metavar="N",
                      help=f"evaluate only the first N usable examples (synthetic: default {SYNTHETIC_DEFAULT_COUNT})")
    data.add_argument("--strict", action="store_true",
                      help="stop with an error at the first malformed record instead of reporting and skipping it")
    data.add_argument("--kb", default=None, metavar="DIR",
                      help="retrieve the top --k passages of each question from this knowledge base (built with "
                           "`blockrag ingest`) instead of using the passages in the data file")
    data.add_argument("--synthetic-task", default=None, metavar="PATH",
                      help="synthetic_task.json (or a directory holding it) for --data synthetic; default: the "
                           "one in the --model directory, else the task's defaults")
    data.add_argument("--synthetic-split", choices=("heldout", "train"), default="heldout",
                      help="split of the synthetic task to evaluate (default: heldout)")

    model = p.add_argument_group("model")
    model.add_argument("--model", default=None, metavar="M",
                       help="a short offline name (e.g. 'smollm2-135m'), a .gguf file, a local model directory or a "
                            "Hugging Face Hub name; 'tiny-random' (or 'tiny-random:ARCH') builds a tiny random Llama "
                            "for offline pipeline checks: its answers are noise. Default: the model the --kb "
                            "knowledge base was built with, else smollm2-135m-block (the embedded model, block "
                            "fine-tuned)")
    model.add_argument("--template", default=None, metavar="T",
                       help="block prompt format: 'chat' (the model's chat template), 'tulu3-block' (the paper's "
                            "checkpoint) or a block_template.json file. Default: block_template.json in the model "
                            "directory, else the knowledge base's, else 'chat'")
    model.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="weight and KV dtype (default: bfloat16 on CUDA, float32 on CPU)")
    model.add_argument("--token-budget", type=int, default=8192, metavar="N",
                       help="most tokens (batch x longest block) per KV-encoding forward pass (default 8192)")

    run_group = p.add_argument_group("evaluation")
    run_group.add_argument("--modes", default="block,full", metavar="LIST",
                           help="comma-separated modes from block, full, closed-book, block-noreencode, recompute "
                                "(default: block,full)")
    run_group.add_argument("--recompute", default=None, metavar="SEL",
                           help="context tokens the recompute mode re-encodes at question time: 'first:K' (first K "
                                "tokens of each passage), 'deviation:R[@L]' (fraction R with the largest KV "
                                "deviation at layer L, CacheBlend), 'query:R[@L]' (fraction R the question attends "
                                "to most), 'all', or a union joined by '+'")
    run_group.add_argument("--kv", choices=("native", "fp8"), default="native",
                           help="KV of the block modes' context blocks: native (the model dtype, default) or fp8 "
                                "(e4m3 with per-layer-head scales, as an fp8 store keeps them)")
    run_group.add_argument("--k", type=int, default=None, metavar="K",
                           help=f"passages per question, best first (default {DEFAULT_K}; every passage of the "
                                "example for --data synthetic; the paper's Table 1 uses 10)")
    run_group.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                           help="most tokens generated per answer (default 64)")
    run_group.add_argument("--stop", action="append", default=None, metavar="STR",
                           help="stop generating at this string (repeatable; default: none, ';' for --data "
                                "synthetic)")
    run_group.add_argument("--instruction", default=None, metavar="TEXT",
                           help="text of block 0 (default: the template's instruction)")
    run_group.add_argument("--ttft", choices=("warm", "cold"), default="warm",
                           help="warm (default): passage KV is encoded before the timed block-mode request, as at "
                                "ingest; cold: encoding of blocks not yet cached is timed too")

    output = p.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: results.jsonl, run.json, summary.json, table.md, chart.png")
    output.add_argument("--overwrite", action="store_true",
                        help="discard earlier results in --out instead of resuming them")
    output.add_argument("--no-chart", action="store_true", help="do not draw chart.png (no matplotlib needed)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of the table")
    p.set_defaults(func=run)
    return p


def _modes(text: str) -> tuple[str, ...]:
    from blockrag.eval.runner import MODES

    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise InvalidInputError(f"expected --modes as a comma-separated list from {', '.join(MODES)}, found {text!r}")
    return modes


def _template(spec: str | None, model: str, kb_template: str | None):
    """A preset name or a BlockTemplate, by the precedence documented for --template."""
    from blockrag.template import PRESETS

    if spec in PRESETS:
        return spec
    if spec is not None:
        if not Path(spec).is_file():
            raise InvalidInputError(f"expected --template to be one of {PRESETS} or a block_template.json file, "
                                    f"found {spec!r}")
        from blockrag.train.data import load_template

        return load_template(spec)
    local = Path(model)
    if local.is_dir() and (local / "block_template.json").is_file():
        from blockrag.train.data import load_template

        return load_template(local)
    return kb_template if kb_template in PRESETS else "chat"


def _load_data(args, modes: tuple[str, ...], model: str):
    from blockrag.eval.datasets import load_dataset, synthetic_examples

    if args.data == SYNTHETIC:
        task = args.synthetic_task
        if task is None and (Path(model) / "synthetic_task.json").is_file():
            task = model
        return synthetic_examples(task, count=args.limit or SYNTHETIC_DEFAULT_COUNT, split=args.synthetic_split)
    need_passages = args.kb is None and any(m != "closed-book" for m in modes)
    return load_dataset(args.data, args.format, strict=args.strict, require_passages=need_passages,
                        limit=args.limit)


def _report_problems(dataset) -> None:
    for problem in dataset.problems[:MAX_LISTED_PROBLEMS]:
        print(f"warning: {dataset.source}:{problem.line}: skipped malformed record: {problem.message}",
              file=sys.stderr)
    if len(dataset.problems) > MAX_LISTED_PROBLEMS:
        print(f"warning: ... and {len(dataset.problems) - MAX_LISTED_PROBLEMS} more malformed records",
              file=sys.stderr)
    if dataset.problems:
        print(f"warning: skipped {len(dataset.problems)} malformed records of {dataset.source} "
              f"(--strict refuses them instead)", file=sys.stderr)


def run(args) -> int:
    """Run ``blockrag eval``; returns the exit code."""
    import json

    from blockrag.cli_common import load_engine
    from blockrag.eval.report import write_report
    from blockrag.eval.runner import RESULTS_FILE, EvalSettings, run_eval
    from blockrag.models import DEFAULT_MODEL, is_tiny

    modes = _modes(args.modes)
    kb_model: dict = {}
    if args.kb is not None:
        from blockrag.index import KnowledgeBase

        kb_model = KnowledgeBase.info(args.kb)["model"]  # a clear error before any model is loaded
    model = args.model or kb_model.get("name") or DEFAULT_MODEL
    dataset = _load_data(args, modes, model)  # data errors surface before the model loads
    synthetic = args.data == SYNTHETIC
    stop = tuple(args.stop) if args.stop is not None else ((";",) if synthetic else ())
    k = args.k if args.k is not None else (
        max(len(e.passages) for e in dataset.examples) if synthetic else DEFAULT_K)
    if args.recompute is not None and "recompute" not in modes:
        raise InvalidInputError(f"expected --modes to include recompute when --recompute is given, found "
                                f"{args.modes!r}")
    settings = EvalSettings(modes=modes, k=k, max_new_tokens=args.max_new_tokens, stop=stop,
                            instruction=args.instruction, ttft=args.ttft, recompute=args.recompute, kv=args.kv)
    _report_problems(dataset)
    template = _template(args.template, model, kb_model.get("template"))
    engine = load_engine(model, template=template, device=args.device, dtype=args.dtype,
                         token_budget=args.token_budget, progress=getattr(args, "verbose", False))
    tiny = is_tiny(model)
    kb = None
    if args.kb is not None:
        from blockrag.index import KnowledgeBase

        # NOTE: refuse a model mismatch rather than re-keying someone's knowledge base from an evaluation.
        kb = KnowledgeBase.open(args.kb, engine, on_mismatch="refuse")
    print(f"evaluating {len(dataset.examples)} questions ({dataset.format}) x modes {', '.join(modes)} with "
          f"{model}, k={settings.k}; results in {args.out}", file=sys.stderr)
    try:
        outcome = run_eval(engine, dataset, args.out, settings, kb=kb, kb_path=args.kb, model_name=model,
                           overwrite=args.overwrite, progress=not args.no_progress and sys.stderr.isatty())
    except KeyboardInterrupt:
        print(f"interrupted: finished answers are saved in {Path(args.out) / RESULTS_FILE}; run the same command "
              "again to resume", file=sys.stderr)
        raise
    finally:
        if kb is not None:
            kb.close()
    if outcome.resumed:
        print(f"resumed: {outcome.resumed} answers from an earlier run, {outcome.new} new", file=sys.stderr)
    if outcome.ignored_lines:
        print(f"warning: ignored {len(outcome.ignored_lines)} unreadable lines of {Path(args.out) / RESULTS_FILE} "
              f"(lines {outcome.ignored_lines[:10]}); those answers were recomputed", file=sys.stderr)
    extra = {"skipped_records": [str(p) for p in dataset.problems], "warmup_s": round(outcome.warmup_s, 3)}
    if tiny:
        extra["note"] = "tiny random model: answers are noise; these numbers check the pipeline, not accuracy"
    document = write_report(args.out, outcome.records, modes, outcome.info, extra=extra, chart=not args.no_chart)
    if args.json:
        print(json.dumps(document))
        return 0
    out = Path(args.out)
    print((out / "table.md").read_text(encoding="utf-8"), end="")
    written = ["results.jsonl", "summary.json", "table.md"] + ([] if args.no_chart else ["chart.png"])
    print(f"\nwritten: {', '.join(str(out / name) for name in written)}")
    if tiny:
        print("note: --model tiny-random has random weights: its answers are noise. These numbers check the "
              "pipeline (modes, caching, timing, files), not accuracy.")
    return 0
