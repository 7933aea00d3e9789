"""Prompt building: instruction, passages (text, Passage or KVBlock) and a question -> per-block token ids.

Block 0 is the template's prefix (the instruction, with BOS where the template asks for it), then one block
per passage, then the final block (the question). Each block is tokenized on its own, exactly as it is
encoded and cached; nothing here runs the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple

from blockrag.errors import InvalidInputError, PromptTooLongError
from blockrag.kv import KVBlock
from blockrag.template import BlockTemplate, Passage

PassageLike = str | Passage | KVBlock


@dataclass(frozen=True)
class Segment:
    """A piece of a prompt, tokenized on its own, exactly as given (no template around it).

    cached=True: a block, keyed by content like a passage: encoded alone once, then served from the store
    (the earlier turns of a chat, a tool result, a world description). cached=False: live, prefilled with
    the final block (it sees every segment before it). Live segments come after every cached one.
    """

    text: str
    cached: bool = True


class ContextBlock(NamedTuple):
    """One context block: its token ids, its text (when known) and the KVBlock the caller gave (if any)."""

    ids: list[int]
    text: str | None
    given: KVBlock | None


@dataclass
class Prompt:
    """Context blocks (block 0 first) and the final block's ids, plus what was skipped."""

    context: list[ContextBlock]
    final_ids: list[int]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(block.ids) for block in self.context) + len(self.final_ids)

    @property
    def input_ids(self) -> list[int]:
        return list(chain.from_iterable(block.ids for block in self.context)) + self.final_ids


class PromptBuilder:
    """Renders and tokenizes prompts with one template and tokenizer.

    Args:
        template: the block template.
        tokenizer: the model's tokenizer.
        max_positions: the model's maximum positions (None: unbounded).
        check_block: raises if a given KVBlock cannot be used by this engine (model, dtype, device).
    """

    def __init__(self, template: BlockTemplate, tokenizer, max_positions: int | None,
                 check_block: Callable[[KVBlock], None]) -> None:
        self.template, self.tokenizer, self.max_positions = template, tokenizer, max_positions
        self._check_block = check_block

    def block_ids(self, passage: str | Passage) -> list[int]:
        """Token ids of one passage block."""
        return self.template.tokenize(self.tokenizer, self.template.render_passage(passage))

    def prefix_ids(self, instruction: str | None = None) -> list[int]:
        """Token ids of block 0 (with BOS if the template and tokenizer use one)."""
        return self.template.tokenize(self.tokenizer, self.template.render_prefix(instruction), first=True)

    def final_ids(self, question: str) -> list[int]:
        return self.template.tokenize(self.tokenizer, self.template.render_final(question))

    def check_length(self, num_tokens: int, what: str) -> None:
        if self.max_positions is not None and num_tokens > self.max_positions:
            raise PromptTooLongError(
                f"{what} has {num_tokens} tokens, the model accepts at most {self.max_positions} positions; "
                "pass fewer or shorter passages"
            )

    def segment_ids(self, text: str, first: bool = False) -> list[int]:
        """Token ids of one segment's text (BOS only on the prompt's first segment, where the template wants it)."""
        return self.template.tokenize(self.tokenizer, text, first=first)

    def from_segments(self, segments: Sequence[Segment | KVBlock]) -> Prompt:
        """A prompt of arbitrary segments: the cached ones (or KVBlocks) are its context blocks, the live ones,
        each tokenized on its own and concatenated, its final block. The first segment gets BOS where the
        template asks for one."""
        if isinstance(segments, (str, Segment, KVBlock)) or not segments:
            raise InvalidInputError("expected a non-empty sequence of segments (Segment or KVBlock)")
        prompt = Prompt(context=[], final_ids=[])
        for index, item in enumerate(segments):
            if isinstance(item, KVBlock):
                item, block = Segment(item.text or "", cached=True), item
                self._check_block(block)
            elif isinstance(item, Segment):
                block = None
                if not isinstance(item.text, str) or not item.text.strip():
                    raise InvalidInputError(f"expected non-empty segment text, found {item.text!r} at {index}")
            else:
                raise InvalidInputError(f"expected Segment or KVBlock, found {type(item).__name__} at {index}")
            if item.cached and prompt.final_ids:
                raise InvalidInputError(f"expected every live segment after the cached ones, found a cached "
                                        f"segment at {index} after a live one; make it live or move it earlier")
            ids = list(block.token_ids) if block is not None else self.segment_ids(item.text, first=index == 0)
            if item.cached:
                prompt.context.append(ContextBlock(ids, item.text if block is None else block.text, block))
            else:
                prompt.final_ids.extend(ids)
        if not prompt.final_ids:
            raise InvalidInputError("expected at least one live segment (cached=False) at the end, found none; "
                                    "the last segment is what the model answers")
        self.check_length(prompt.num_tokens, "the prompt")
        return prompt

    def build(self, passages: Sequence[PassageLike], question: str, instruction: str | None = None) -> Prompt:
        """The prompt's blocks. Empty passages are skipped (with a warning); bad input raises a typed error."""
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError(f"expected a non-empty question, found {question!r}")
        if isinstance(passages, (str, Passage, KVBlock)):
            raise InvalidInputError("expected a sequence of passages, found a single item; wrap it in a list")
        prompt = Prompt(context=[], final_ids=self.final_ids(question))
        prefix_text = self.template.render_prefix(instruction)
        if prefix_text:
            prompt.context.append(ContextBlock(self.prefix_ids(instruction), prefix_text, None))
        for index, item in enumerate(passages):
            if isinstance(item, KVBlock):
                self._check_block(item)
                prompt.context.append(ContextBlock(list(item.token_ids), item.text, item))
                continue
            if not isinstance(item, (str, Passage)):
                raise InvalidInputError(f"expected str, Passage or KVBlock, found {type(item).__name__} at {index}")
            text = item.text if isinstance(item, Passage) else item
            if not text.strip():
                prompt.warnings.append(f"skipped empty passage at index {index}")
                continue
            rendered = self.template.render_passage(item)
            prompt.context.append(ContextBlock(self.template.tokenize(self.tokenizer, rendered), rendered, None))
        self.check_length(prompt.num_tokens, "the prompt")
        return prompt
