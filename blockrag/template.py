"""BlockTemplate: an instruction, passages and a question -> the text and token ids of each block.

A prompt has three kinds of blocks: block 0 (system / instruction header), one block per passage, and
the final block (question + end of the user turn + assistant header). Each block is tokenized on its own
and the ids are concatenated; the joined string is never re-tokenized, because BPE merges across the
joins would make the ids differ from the ids whose KV was cached.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from blockrag.errors import InvalidInputError

TULU3_INSTRUCTION = (
    "You are an intelligent AI assistant. Please answer questions based on the user's instructions. "
    "Below are some reference documents that may help you in answering the user's question."
)
CHAT_INSTRUCTION = (
    "Answer the question using the reference passages below. Some of them may be irrelevant; "
    "if they do not contain the answer, say so."
)

_SENTINEL = "\u2063BLOCKRAG_USER_CONTENT\u2063"


@dataclass(frozen=True)
class Passage:
    """A retrieved passage: its text and an optional title."""

    text: str
    title: str | None = None


@dataclass(frozen=True)
class RenderedPrompt:
    """The text of every block of one prompt, in order."""

    prefix: str
    passages: tuple[str, ...]
    final: str


def _fill(pattern: str, **values: str) -> str:
    # NOTE: one pass over the pattern, not str.format (passages and questions may contain braces) nor one
    # str.replace per name (a value containing "{title}" would be substituted again).
    names = "|".join(re.escape(name) for name in values)
    return re.sub(r"\{(" + names + r")\}", lambda match: values[match.group(1)], pattern) if values else pattern


@dataclass(frozen=True)
class BlockTemplate:
    """How a RAG prompt is split into blocks.

    Attributes:
        prefix: block 0; may contain ``{instruction}``.
        passage: one passage block; ``{text}`` and ``{title}``.
        final: the final block; must contain ``{question}``.
        passage_untitled: passage block for passages without a title (defaults to ``passage`` with
            an empty title).
        instruction: default text for ``{instruction}``.
        bos: prepend the tokenizer's BOS to block 0. None: only if the tokenizer adds one by itself and
            block 0 does not already start with it. Passages and the final block never get BOS.
        name: preset name, for messages and manifests.
    """

    prefix: str
    passage: str
    final: str
    passage_untitled: str | None = None
    instruction: str = CHAT_INSTRUCTION
    bos: bool | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if "{question}" not in self.final:
            raise InvalidInputError(f"expected '{{question}}' in the final block pattern, found {self.final!r}")
        if "{text}" not in self.passage:
            raise InvalidInputError(f"expected '{{text}}' in the passage pattern, found {self.passage!r}")

    @property
    def version(self) -> str:
        """Short hash of everything that decides block text; part of every block key."""
        fields = (self.prefix, self.passage, self.final, self.passage_untitled or "", str(self.bos))
        return hashlib.sha256("\x00".join(fields).encode()).hexdigest()[:16]

    def render_prefix(self, instruction: str | None = None) -> str:
        return _fill(self.prefix, instruction=self.instruction if instruction is None else instruction)

    def render_passage(self, passage: Passage | str) -> str:
        if isinstance(passage, str):
            passage = Passage(passage)
        if passage.title is None and self.passage_untitled is not None:
            return _fill(self.passage_untitled, text=passage.text)
        return _fill(self.passage, text=passage.text, title=passage.title or "")

    def render_final(self, question: str) -> str:
        return _fill(self.final, question=question)

    def render(
        self, passages: Sequence[Passage | str], question: str, instruction: str | None = None
    ) -> RenderedPrompt:
        return RenderedPrompt(
            prefix=self.render_prefix(instruction),
            passages=tuple(self.render_passage(p) for p in passages),
            final=self.render_final(question),
        )

    # --- token ids -------------------------------------------------------------------------------

    def tokenize(self, tokenizer, text: str, *, first: bool = False) -> list[int]:
        """Token ids of one block. BOS only when ``first`` (block 0) and the template asks for it."""
        ids = self.tokenize_many(tokenizer, [text])[0]
        if first and self._wants_bos(tokenizer, text):
            ids.insert(0, tokenizer.bos_token_id)
        return ids

    def tokenize_many(self, tokenizer, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several non-first blocks in one tokenizer call (a fast tokenizer encodes them in
        parallel); the same ids as ``tokenize`` of each."""
        if not texts:
            return []
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def _wants_bos(self, tokenizer, text: str) -> bool:
        bos_id, bos_text = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
        if self.bos is False or bos_id is None:
            return False
        if bos_text and text.startswith(bos_text):
            return False
        if self.bos is True:
            return True
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        return bool(probe) and probe[0] == bos_id

    # --- presets ---------------------------------------------------------------------------------

    @classmethod
    def tulu3_block(cls) -> BlockTemplate:
        """The format of the paper's released checkpoint (ldsjmdy/Tulu3-Block-FT); no BOS anywhere."""
        return cls(
            prefix="<|user|>\n{instruction}\n\n",
            passage="- Title: {title}\n{text}\n",
            final=(
                "\n\nPlease write a high-quality answer for the given question using only the provided "
                "search documents (some of which might be irrelevant).\nQuestion: {question}\n<|assistant|>\n"
            ),
            instruction=TULU3_INSTRUCTION,
            bos=False,
            name="tulu3-block",
        )

    @classmethod
    def chat(cls, tokenizer, system: str | None = None) -> BlockTemplate:
        """Derive blocks from the tokenizer's chat template.

        Block 0 holds everything up to the user's content (system turn, user header) plus the
        instruction; the final block holds the question, the end of the user turn and the assistant
        header, exactly as ``apply_chat_template(..., add_generation_prompt=True)`` renders them.
        """
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInputError(
                "expected a tokenizer with a chat template for template='chat', found none; "
                "use template='tulu3-block' or a custom BlockTemplate"
            )
        messages = [{"role": "user", "content": _SENTINEL}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered.count(_SENTINEL) != 1:
            raise InvalidInputError(
                "expected the chat template to render the user message verbatim once, found it "
                f"{rendered.count(_SENTINEL)} times; use a custom BlockTemplate"
            )
        head, tail = rendered.split(_SENTINEL)
        return cls(
            prefix=head + "{instruction}\n\n",
            passage="Title: {title}\n{text}\n\n",
            passage_untitled="{text}\n\n",
            final="Question: {question}" + tail,
            instruction=CHAT_INSTRUCTION,
            bos=None,
            name="chat",
        )


PRESETS = ("chat", "tulu3-block")


def get_template(spec: str | BlockTemplate, tokenizer=None) -> BlockTemplate:
    """A BlockTemplate from a preset name or an existing template."""
    if isinstance(spec, BlockTemplate):
        return spec
    if spec == "chat":
        return BlockTemplate.chat(tokenizer)
    if spec == "tulu3-block":
        return BlockTemplate.tulu3_block()
    raise InvalidInputError(f"expected a template preset in {PRESETS} or a BlockTemplate, found {spec!r}")
