"""Run a BlockEngine over evaluation examples in several modes; one JSON line per (example, mode), resumable.

Modes:
* ``block``: passages' KV from the engine's store (encoded once, on first sight), only the final block prefilled.
* ``full``: one ordinary causal prefill over the same token ids.
* ``closed-book``: the same prompt without passages (full prefill): what the model knows on its own.
* ``block-noreencode``: block mode without position re-encoding (every block at positions 0..T-1; the paper's
  ablation).
* ``recompute``: block mode with training-free recovery: the context tokens chosen by ``settings.recompute``
  (e.g. "first:8", "deviation:0.15", "query:0.1"; see ``blockrag.recompute``) re-encoded at question time.

``settings.kv = "fp8"`` keeps the context blocks of the block modes in the store as fp8 (e4m3, per layer and head
scales), dequantised when assembled: the accuracy cost of an fp8 knowledge base.

TTFT in block mode is measured with the passages' KV already cached (``ttft="warm"``, the paper's Table 3
setting and what a knowledge base gives at question time): blocks not yet in the store are encoded first by an
untimed prefill, as ingest would, and counted as the example's ``encoded_tokens``. Blocks shared across
questions are therefore encoded once for the whole run. ``ttft="cold"`` times the encoding too.

The results file is appended and flushed after every (example, mode); a run over the same output directory
skips what is already there, after checking that data, model, template and settings are the same.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from blockrag.errors import BlockRAGError, PromptTooLongError
from blockrag.eval.datasets import Dataset, EvalExample
from blockrag.eval.metrics import accuracy, score
from blockrag.template import Passage

MODES = ("block", "full", "closed-book", "block-noreencode", "recompute")
KV_FORMATS = ("native", "fp8")
BLOCK_MODES = ("block", "block-noreencode", "recompute")
RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
_ENGINE_MODE = {"block": "block", "full": "full", "closed-book": "full", "block-noreencode": "block",
                "recompute": "block"}
# Run facts that must match for a resumed run to extend earlier results (modes and limit may change). Data and
# model are compared by content (digest, fingerprint), not by how their paths or names were spelled.
_RESUME_FACTS = {"data": ("format", "digest"), "model": ("fingerprint", "template_version", "dtype"),
                 "settings": None, "kb": None}


class ResumeMismatchError(BlockRAGError):
    """The output directory holds results of a different run (other data, model, template or settings)."""


@dataclass(frozen=True)
class EvalSettings:
    """What every (example, mode) is run with.

    Attributes:
        modes: any of "block", "full", "closed-book", in the order to run them.
        k: passages per question: the example's first k (best first), or the knowledge base's top k.
        max_new_tokens: most tokens generated per answer.
        stop: stop strings (not part of the answer).
        instruction: text of block 0 (None: the template's default).
        ttft: "warm" (block-mode KV encoded before the timed request) or "cold" (encoding inside it).
        recompute: the selection of the ``recompute`` mode (required when it runs).
        kv: "native" (blocks in the model's dtype) or "fp8" (blocks stored as fp8; warm TTFT only).
    """

    modes: tuple[str, ...] = ("block", "full")
    k: int = 5
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()
    instruction: str | None = None
    ttft: str = "warm"
    recompute: str | None = None
    kv: str = "native"

    def __post_init__(self) -> None:
        from blockrag.errors import InvalidInputError

        unknown = [m for m in self.modes if m not in MODES]
        if not self.modes or unknown or len(set(self.modes)) != len(self.modes):
            raise InvalidInputError(f"expected distinct modes from {MODES}, found {list(self.modes)}")
        if not isinstance(self.k, int) or self.k < 1:
            raise InvalidInputError(f"expected k >= 1 passages, found {self.k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidInputError(f"expected max_new_tokens >= 1, found {self.max_new_tokens!r}")
        if self.ttft not in ("warm", "cold"):
            raise InvalidInputError(f"expected ttft 'warm' or 'cold', found {self.ttft!r}")
        if "recompute" in self.modes and self.recompute is None:
            raise InvalidInputError("expected a recompute selection (e.g. 'first:8', 'deviation:0.15') for the "
                                    "recompute mode, found none")
        if self.recompute is not None:
            from blockrag.recompute import Recompute

            object.__setattr__(self, "recompute", str(Recompute.parse(self.recompute)))
        if self.kv not in KV_FORMATS:
            raise InvalidInputError(f"expected kv in {KV_FORMATS}, found {self.kv!r}")
        if self.kv == "fp8" and self.ttft != "warm":
            raise InvalidInputError("expected ttft 'warm' with kv 'fp8' (blocks are quantized as a store would hold "
                                    "them, before the timed request), found 'cold'")

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share (modes excluded: they may be added later)."""
        facts = {"k": self.k, "max_new_tokens": self.max_new_tokens, "stop": list(self.stop),
                 "instruction": self.instruction, "ttft": self.ttft}
        if self.recompute is not None:
            facts["recompute"] = self.recompute
        if self.kv != "native":
            facts["kv"] = self.kv
        return facts


class ResultsLog:
    """Append-only JSON Lines of per-(example, mode) results, durable line by line.

    Opening it reads what an earlier run wrote. A last line cut off by an interruption is dropped (and the
    file truncated back to the last complete line); other unreadable lines are reported and ignored.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.ignored_lines: list[int] = []
        if path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            # NOTE: an interrupted write leaves a partial last line; cut it so the next append starts clean.
            with self.path.open("r+b") as f:
                f.truncate(complete)
        for number, line in enumerate(data[:complete].decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (str(record["id"]), str(record["mode"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                self.ignored_lines.append(number)
                continue
            self.records[key] = record

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.records

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[(record["id"], record["mode"])] = record


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_info(engine, dataset: Dataset, settings: EvalSettings, *, model_name: str | None = None,
             kb_path: str | None = None) -> dict[str, Any]:
    """What identifies a run, as written to ``run.json``."""
    return {
        "data": {"source": dataset.source, "format": dataset.format, "digest": dataset.digest},
        "model": {"name": model_name or engine.model_name, "fingerprint": engine.fingerprint,
                  "template": engine.template.name, "template_version": engine.template.version,
                  "dtype": str(engine.dtype).removeprefix("torch.")},
        "settings": settings.fingerprint(),
        "kb": kb_path,
    }


def _resume_view(info: dict[str, Any], key: str) -> Any:
    value, fields = info.get(key), _RESUME_FACTS[key]
    if fields is None or not isinstance(value, dict):
        return value
    return {f: value.get(f) for f in fields}


def _check_resume(saved: dict[str, Any], current: dict[str, Any], out_dir: Path) -> None:
    for key in _RESUME_FACTS:
        if _resume_view(saved, key) != _resume_view(current, key):
            before, now = (json.dumps(_resume_view(x, key), sort_keys=True) for x in (saved, current))
            raise ResumeMismatchError(
                f"expected the results in {out_dir} to come from the same {key} to resume them, found {before} "
                f"there and {now} now; pass another --out directory, or --overwrite to discard the earlier results")


def _context_keys(engine, passages: Sequence[Passage], instruction: str | None) -> list[str]:
    keys = [engine.key_of(engine.block_ids(p)) for p in passages if p.text.strip()]
    if engine.template.render_prefix(instruction):
        keys.append(engine.key_of(engine.prefix_ids(instruction)))
    return keys


def _context_cached(engine, passages: Sequence[Passage], instruction: str | None, fp8: bool = False) -> bool:
    """Whether the store already holds every context block of this prompt (so no encoding would happen)."""
    keys = _context_keys(engine, passages, instruction)
    if not fp8:
        return all(key in engine.store for key in keys)
    return all(block is not None and block.quantized for block in engine.store.get_many(keys))


def _quantize_stored(engine, passages: Sequence[Passage], instruction: str | None) -> None:
    """Replace this prompt's context blocks in the store by their fp8 versions (as an fp8 store holds them)."""
    keys = _context_keys(engine, passages, instruction)
    for block in engine.store.get_many(keys):
        if block is not None and not block.quantized:
            engine.store.put(block.quantize())


def evaluate_example(engine, example: EvalExample, mode: str, settings: EvalSettings, *, kb=None) -> dict[str, Any]:
    """Answer one example in one mode and score it; returns the JSON-safe result record."""
    sources = None
    if mode == "closed-book":
        passages: list[Passage] = []
    elif kb is not None:
        hits = kb.search(example.question, settings.k)
        passages = [Passage(h.text, h.title) for h in hits]
        sources = [{"passage_id": h.passage_id, "score": round(h.score, 6)} for h in hits]
    else:
        passages = list(example.passages[: settings.k])
    record: dict[str, Any] = {"id": example.id, "mode": mode, "question": example.question,
                              "answers": list(example.answers), "passages": len(passages)}
    if sources is not None:
        record["sources"] = sources
    record["answer_in_passages"] = (
        bool(accuracy(" \n".join(p.text for p in passages), example.answers)) if mode != "closed-book" else None)
    options = dict(instruction=settings.instruction, mode=_ENGINE_MODE[mode], max_new_tokens=settings.max_new_tokens,
                   stop=settings.stop)
    if mode == "block-noreencode":
        options["reencode"] = False
    elif mode == "recompute":
        options["recompute"] = settings.recompute
    fp8 = settings.kv == "fp8" and mode in BLOCK_MODES
    encoded = 0
    try:
        if mode in BLOCK_MODES and settings.ttft == "warm" and not _context_cached(engine, passages,
                                                                                   settings.instruction, fp8):
            # NOTE: the ingest step: encode and store the missing blocks, untimed; the request below then finds
            # all context KV cached, as it would with a knowledge base.
            warm = engine.prefill(passages, example.question, instruction=settings.instruction, mode="block")
            encoded = warm.usage.encoded_tokens
            if fp8:
                _quantize_stored(engine, passages, settings.instruction)
        generation = engine.generate(passages, example.question, **options)
    except PromptTooLongError as e:
        record.update(error=str(e), prediction=None)
        return record
    usage = generation.usage
    scores = score(generation.text, example.answers)
    record.update(
        prediction=generation.text, finish_reason=generation.finish_reason,
        accuracy=scores.accuracy, em=scores.exact_match, f1=round(scores.f1, 6),
        ttft_s=round(usage.ttft_s, 6),
        context_tokens=len(generation.prefill.input_ids) - len(generation.prefill.final_ids),
        cached_tokens=usage.cached_tokens,
        prefilled_tokens=usage.prefilled_tokens,
        encoded_tokens=encoded + usage.encoded_tokens,
        generated_tokens=usage.generated_tokens,
        recomputed_tokens=getattr(usage, "recomputed_tokens", 0),
    )
    return record


@dataclass
class RunOutcome:
    """What a call of ``run_eval`` did: results written now, results found from earlier runs, and where."""

    out_dir: Path
    records: list[dict[str, Any]]
    new: int
    resumed: int
    ignored_lines: list[int]
    info: dict[str, Any]
    warmup_s: float = 0.0


def _warm_up(engine, settings: EvalSettings) -> float:
    """One untimed request per engine mode, so one-off start-up costs do not land in the first TTFT.

    It has no passages: nothing but block 0 reaches the store (a knowledge base's store included).
    """
    start = time.perf_counter()
    for mode in sorted({_ENGINE_MODE[m] for m in settings.modes}):
        engine.generate([], "Warm-up question?", instruction=settings.instruction, mode=mode, max_new_tokens=2)
    return time.perf_counter() - start


def run_eval(engine, dataset: Dataset, out_dir: str | Path, settings: EvalSettings = EvalSettings(), *, kb=None,
             kb_path: str | None = None, model_name: str | None = None, overwrite: bool = False,
             progress: bool = False, on_result: Callable[[dict[str, Any]], None] | None = None) -> RunOutcome:
    """Evaluate every example of ``dataset`` in every mode of ``settings``; append results to ``out_dir``.

    Args:
        engine: a BlockEngine (its store keeps blocks between questions).
        dataset: the examples.
        out_dir: directory for ``results.jsonl`` and ``run.json`` (created if missing).
        settings: modes, k, generation settings.
        kb: an open KnowledgeBase to retrieve passages from (the examples' own passages are then ignored).
        kb_path: the knowledge base's path, recorded in ``run.json``.
        model_name: how the model was named (recorded); default: the engine's model name.
        overwrite: discard earlier results in ``out_dir`` instead of resuming them.
        progress: show a progress bar on stderr.
        on_result: called with each new result record (after it is saved).

    Raises:
        ResumeMismatchError: ``out_dir`` holds results of a different run and ``overwrite`` is False.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path, run_path = out / RESULTS_FILE, out / RUN_FILE
    info = run_info(engine, dataset, settings, model_name=model_name, kb_path=kb_path)
    if overwrite:
        for path in (results_path, run_path):
            path.unlink(missing_ok=True)
    if run_path.exists():
        _check_resume(json.loads(run_path.read_text(encoding="utf-8")), info, out)
    elif results_path.exists() and results_path.stat().st_size:
        raise ResumeMismatchError(f"expected {run_path} beside the earlier results in {results_path}, found none; "
                                  "pass --overwrite to discard them, or another --out directory")
    info["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not run_path.exists():
        _write_json(run_path, info)
    log = ResultsLog(results_path)
    keys = [(ex.id, mode) for ex in dataset.examples for mode in settings.modes]
    todo = [(ex, mode) for ex in dataset.examples for mode in settings.modes if (ex.id, mode) not in log]
    resumed = len(keys) - len(todo)
    warmup_s = _warm_up(engine, settings) if todo else 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(keys), initial=resumed, desc="eval", unit="answer", file=sys.stderr, dynamic_ncols=True)
    right = {m: [0, 0] for m in settings.modes}
    try:
        for example, mode in todo:
            record = evaluate_example(engine, example, mode, settings, kb=kb)
            log.append(record)
            if on_result is not None:
                on_result(record)
            if bar is not None:
                if record.get("accuracy") is not None:
                    right[mode][0] += int(record["accuracy"])
                    right[mode][1] += 1
                bar.set_postfix_str(" ".join(f"{m} {100 * r / n:.0f}%" for m, (r, n) in right.items() if n))
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    records = [log.records[key] for key in keys]
    return RunOutcome(out, records, len(todo), resumed, log.ignored_lines, info, warmup_s)
