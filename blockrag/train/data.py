"""Training records -> samples of token ids, rendered exactly as the engine renders prompts at inference.

Two kinds of JSONL record:

* RAG: ``{"instruction"?: str, "passages": [{"title"?: str, "text": str} | str, ...], "question": str,
  "answer": str}``
* chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``, ending with the
  assistant message to learn.

Every record becomes a :class:`Sample`: the context blocks (block 0, then one per passage or chunk), the final
block, and the response (the answer followed by EOS). Each block is tokenized on its own through the same
:class:`~blockrag.template.BlockTemplate` as :class:`~blockrag.engine.BlockEngine` (BOS only on block 0,
empty passages skipped, no block 0 when the prefix renders empty), so the ids a model is trained on are the
ids it is served with.

Chat records are split into blocks with the paper's rules (arXiv 2409.15355, released preprocessing): a
message is split on the first delimiter it contains among ``\\n\\n``, ``---``, ``===``, ``\\n\\t``, ``\\n``
(the delimiter stays with the chunk before it); the smallest adjacent chunks are merged until the prompt has
at most ``max_blocks`` blocks. A leading system message becomes the instruction of block 0. With earlier
turns, the last user message is the final block and the earlier turns are the context; in a single-turn
record the user message itself is split and its last chunk is the final block.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from blockrag.errors import InvalidInputError
from blockrag.template import BlockTemplate, Passage

MAX_BLOCKS = 15  # the paper's limit, block 0 and the final block included

# The paper's delimiters, in priority order: a message is split on the first one it contains.
_DELIMITERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("\n\n", re.compile(r"\s*\n\n\s*")),
    ("---", re.compile(r"\s*-{3,}\s*")),
    ("===", re.compile(r"\s*={3,}\s*")),
    ("\n\t", re.compile(r"\n\t")),
    ("\n", re.compile(r"\s*\n\s*")),
)
_ROLE_LABELS = {"user": "User", "assistant": "Assistant", "system": "System"}


class DataError(InvalidInputError):
    """A training record (or JSONL line) that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class RAGRecord:
    """Passages, a question and the answer to learn."""

    passages: tuple[Passage, ...]
    question: str
    answer: str
    instruction: str | None = None


@dataclass(frozen=True)
class ChatRecord:
    """A conversation; the last message (assistant) is the response to learn."""

    messages: tuple[tuple[str, str], ...]  # (role, content)


Record = RAGRecord | ChatRecord


@dataclass(frozen=True)
class Sample:
    """One training example as token ids.

    Attributes:
        blocks: ids of each context block, in order (block 0 first, with BOS if the template uses one).
        final: ids of the final block (question + assistant header).
        response: ids to learn (answer, then EOS); the loss covers these only.
        loss_mask: optional, one flag per response id: which of them get loss (None: all).
    """

    blocks: tuple[tuple[int, ...], ...]
    final: tuple[int, ...]
    response: tuple[int, ...]
    loss_mask: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        assert self.loss_mask is None or len(self.loss_mask) == len(self.response), "one loss flag per response id"

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        """Context blocks then the final block: the ids the engine prefills."""
        return tuple(t for block in self.blocks for t in block) + self.final

    @property
    def num_tokens(self) -> int:
        return sum(len(b) for b in self.blocks) + len(self.final) + len(self.response)


# --- parsing ---------------------------------------------------------------------------------------


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line is not None else source


def _text(obj: dict, key: str, where: str, *, optional: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: expected '{key}' to be a non-empty string, found {value!r:.80}")
    return value


def parse_record(obj, *, source: str = "<record>", line: int | None = None) -> Record:
    """A RAG record (has 'question') or a chat record (has 'messages') from a decoded JSON object."""
    where = _where(source, line)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if "messages" in obj:
        return _parse_chat(obj["messages"], where)
    if "question" in obj:
        return _parse_rag(obj, where)
    raise DataError(f"{where}: expected a RAG record ('passages', 'question', 'answer') or a chat record "
                    f"('messages'), found keys {sorted(obj)}")


def _parse_rag(obj: dict, where: str) -> RAGRecord:
    raw = obj.get("passages", [])
    if not isinstance(raw, list):
        raise DataError(f"{where}: expected 'passages' to be a list, found {type(raw).__name__}")
    passages = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            passages.append(Passage(item))
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            title = item.get("title")
            if title is not None and not isinstance(title, str):
                raise DataError(f"{where}: expected passages[{i}].title to be a string, found {title!r:.80}")
            passages.append(Passage(item["text"], title=title))
        else:
            raise DataError(f"{where}: expected passages[{i}] to be a string or {{'title'?, 'text'}}, "
                            f"found {item!r:.80}")
    return RAGRecord(passages=tuple(passages), question=_text(obj, "question", where),
                     answer=_text(obj, "answer", where), instruction=_text(obj, "instruction", where, optional=True))


def _parse_chat(messages, where: str) -> ChatRecord:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: expected 'messages' to be a list of at least 2 messages, found {messages!r:.80}")
    parsed = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in _ROLE_LABELS or not isinstance(content, str):
            raise DataError(f"{where}: expected messages[{i}] to be {{'role': system|user|assistant, "
                            f"'content': str}}, found {m!r:.80}")
        parsed.append((role, content))
    if parsed[-1][0] != "assistant" or parsed[-2][0] != "user":
        roles = [r for r, _ in parsed]
        raise DataError(f"{where}: expected the conversation to end with a user then an assistant message, "
                        f"found roles {roles}")
    if not parsed[-1][1].strip() or not parsed[-2][1].strip():
        raise DataError(f"{where}: expected non-empty last user and assistant messages")
    if any(role == "system" for role, _ in parsed[1:]):
        raise DataError(f"{where}: expected a system message only as the first message")
    return ChatRecord(messages=tuple(parsed))


def iter_jsonl(path: str | Path) -> Iterator[Record]:
    """Records of a JSONL file, one per non-blank line; a bad line raises DataError naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expected a JSONL file, found nothing at {path}")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: expected one JSON object per line, found invalid JSON "
                                f"({e.msg} at column {e.colno})") from None
            yield parse_record(obj, source=str(path), line=number)


def load_jsonl(path: str | Path) -> list[Record]:
    records = list(iter_jsonl(path))
    if not records:
        raise DataError(f"expected at least one record in {path}, found none")
    return records


def write_jsonl(path: str | Path, records: Iterable[Record]) -> None:
    """Write records in the JSONL format ``load_jsonl`` reads."""
    with Path(path).open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record_to_json(record), ensure_ascii=False) + "\n")


def record_to_json(record: Record) -> dict:
    if isinstance(record, ChatRecord):
        return {"messages": [{"role": r, "content": c} for r, c in record.messages]}
    obj: dict = {}
    if record.instruction is not None:
        obj["instruction"] = record.instruction
    obj["passages"] = [{"text": p.text} if p.title is None else {"title": p.title, "text": p.text}
                       for p in record.passages]
    obj.update(question=record.question, answer=record.answer)
    return obj


# --- splitting chat messages into blocks (the paper's rules) ---------------------------------------


def split_by_delimiter(text: str) -> list[str]:
    """Chunks of text, split on the first delimiter it contains; each chunk keeps its trailing delimiter."""
    for delimiter, pattern in _DELIMITERS:
        if delimiter not in text:
            continue
        chunks, start = [], 0
        for match in pattern.finditer(text):
            if text[start:match.start()].strip():
                chunks.append(text[start:match.end()])
                start = match.end()
        tail = text[start:]
        if tail.strip():
            chunks.append(tail)
        elif chunks:
            chunks[-1] += tail
        return chunks or [text]
    return [text]


def merge_smallest(chunks: Sequence[str], limit: int) -> list[str]:
    """Merge the adjacent pair with the fewest characters until at most ``limit`` chunks remain."""
    chunks = list(chunks)
    while len(chunks) > max(limit, 1):
        i = min(range(len(chunks) - 1), key=lambda j: len(chunks[j]) + len(chunks[j + 1]))
        chunks[i : i + 2] = [chunks[i] + chunks[i + 1]]
    return chunks


def chat_blocks(record: ChatRecord, max_blocks: int = MAX_BLOCKS) -> tuple[str | None, list[str], str, str]:
    """(instruction, context chunks, final text, response text) of a chat record."""
    messages = list(record.messages)
    instruction = None
    if messages[0][0] == "system":
        instruction = messages.pop(0)[1]
    *history, (_, last_user), (_, response) = messages
    if history:
        context = []
        for role, content in history:
            parts = [c for c in split_by_delimiter(content) if c.strip()] or [content]
            parts[0] = f"{_ROLE_LABELS[role]}: {parts[0]}"
            context.extend(parts)
        final = last_user
    else:
        *context, final = split_by_delimiter(last_user)
    context = merge_smallest(context, max_blocks - 2)  # block 0 and the final block count too
    return instruction, [c.strip() for c in context if c.strip()], final.strip(), response


# --- rendering to ids ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockTexts:
    """The text of every block of a record, rendered by the template, and the response text."""

    prefix: str  # block 0; empty when the template's prefix renders empty (then there is no block 0)
    passages: tuple[str, ...]
    final: str
    response: str


def block_texts(record: Record, template: BlockTemplate, *, max_blocks: int = MAX_BLOCKS) -> BlockTexts:
    if isinstance(record, RAGRecord):
        instruction, passages, final, response = record.instruction, record.passages, record.question, record.answer
    else:
        instruction, chunks, final, response = chat_blocks(record, max_blocks)
        passages = tuple(Passage(c) for c in chunks)
    # NOTE: the engine skips empty passages (with a warning) and drops an empty block 0; so do we.
    return BlockTexts(prefix=template.render_prefix(instruction),
                      passages=tuple(template.render_passage(p) for p in passages if p.text.strip()),
                      final=template.render_final(final), response=response)


def render_many(records: Sequence[Record], template: BlockTemplate, tokenizer, *,
                max_blocks: int = MAX_BLOCKS) -> list[Sample]:
    """Token ids of records, block by block, by the rules BlockEngine uses at inference.

    Block 0 goes through ``template.tokenize(..., first=True)`` (the BOS rule); every other block, like
    ``template.tokenize`` without ``first``, is the tokenizer's ids of that block's text alone, without special
    tokens. Those are computed in one batched tokenizer call, which gives the same ids as one call per block.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("expected a tokenizer with an EOS token (the response must end with it), found none")
    plans = [block_texts(r, template, max_blocks=max_blocks) for r in records]
    texts = [t for plan in plans for t in (*plan.passages, plan.final, plan.response)]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    prefixes: dict[str, tuple[int, ...]] = {}
    samples = []
    for plan in plans:
        blocks = []
        if plan.prefix:
            if plan.prefix not in prefixes:
                prefixes[plan.prefix] = tuple(template.tokenize(tokenizer, plan.prefix, first=True))
            blocks.append(prefixes[plan.prefix])
        blocks.extend(tuple(next(ids)) for _ in plan.passages)
        final, response = tuple(next(ids)), tuple(next(ids))
        samples.append(Sample(blocks=tuple(blocks), final=final, response=response + (eos,)))
    return samples


def render(record: Record, template: BlockTemplate, tokenizer, *, max_blocks: int = MAX_BLOCKS) -> Sample:
    """Token ids of one record (see ``render_many``)."""
    return render_many([record], template, tokenizer, max_blocks=max_blocks)[0]


def render_all(records: Iterable[Record], template: BlockTemplate, tokenizer, *, max_length: int | None = None,
               max_blocks: int = MAX_BLOCKS) -> tuple[list[Sample], int]:
    """Samples of records, dropping those longer than max_length tokens; returns (samples, dropped)."""
    samples = render_many(list(records), template, tokenizer, max_blocks=max_blocks)
    kept = [s for s in samples if max_length is None or s.num_tokens <= max_length]
    return kept, len(samples) - len(kept)


# --- templates as files (saved next to a trained model) --------------------------------------------

TEMPLATE_FILE = "block_template.json"
_TEMPLATE_FIELDS = ("prefix", "passage", "final", "passage_untitled", "instruction", "bos", "name")


def template_to_json(template: BlockTemplate) -> dict:
    return {name: getattr(template, name) for name in _TEMPLATE_FIELDS}


def template_from_json(obj: dict, source: str = "<template>") -> BlockTemplate:
    unknown = sorted(set(obj) - set(_TEMPLATE_FIELDS))
    if unknown or not {"prefix", "passage", "final"} <= set(obj):
        raise DataError(f"{source}: expected BlockTemplate fields {list(_TEMPLATE_FIELDS)} with prefix, passage "
                        f"and final, found {sorted(obj)}")
    return BlockTemplate(**obj)


def save_template(template: BlockTemplate, directory: str | Path) -> Path:
    path = Path(directory) / TEMPLATE_FILE
    path.write_text(json.dumps(template_to_json(template), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_template(path: str | Path) -> BlockTemplate:
    """A BlockTemplate from a JSON file, or from ``block_template.json`` inside a model directory."""
    path = Path(path)
    if path.is_dir():
        path = path / TEMPLATE_FILE
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"expected a BlockTemplate JSON file at {path}, found an unreadable one ({e})") from None
    return template_from_json(obj, str(path))
