"""The block source: KV blocks by content, from the store or encoded once.

A block's key is a hash of the model fingerprint, the template version and its token ids, so the same
text is served from the store whoever asks for it. ``fetch`` looks blocks up (using only blocks of this
model and dtype: a store may hold another model's blocks under a colliding path), encodes all misses in
one batched pass under the engine's attention, and puts them into the store. The engine's prompts and a
knowledge base's ingest both go through it.

Other stores can be attached behind the engine's own (``attach``): reads try the own store first, then
the attached ones; writes go through to all of them, and each attached store decides what it keeps (a
knowledge base keeps only the blocks its docstore needs: ``blockrag.index.attached``). The block source never
asks which store a block belongs to: keys are content hashes, so any store's copy is the right one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from blockrag.encoder import BlockEncoder
from blockrag.errors import InvalidInputError
from blockrag.kv import KVBlock
from blockrag.prompt import Prompt
from blockrag.store.base import KVStore


class BlockSource:
    """Blocks of one model, by content.

    Args:
        encoder: encodes token-id blocks of the model.
        store: the engine's own store.
        key_of: content key of a token-id block.
        dtype: the model's KV dtype (blocks of another dtype are used only if fp8-quantized).
        attention: the engine's attention switch, entered around encoding.
        check_length: raises PromptTooLongError for a block longer than the model's positions.
    """

    def __init__(self, encoder: BlockEncoder, store: KVStore, *, key_of: Callable[[Sequence[int]], str],
                 dtype, attention: AbstractContextManager, check_length: Callable[[int, str], None]) -> None:
        self.encoder, self.key_of, self.dtype = encoder, key_of, dtype
        self._attention, self._check_length = attention, check_length
        self.store = store
        self._own, self._attached, self._layered = store, [], store
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    def usable(self, block: KVBlock | None) -> bool:
        return block is not None and block.fingerprint == self.fingerprint and (
            block.dtype == self.dtype or block.quantized)

    def fetch(self, token_ids: Sequence[Sequence[int]], texts: Sequence[str | None] | None = None, *,
              store: KVStore | None = None) -> tuple[list[KVBlock], list[bool]]:
        """Blocks of token-id lists: hits from ``store`` (default: the engine's), one batched encode of the
        misses, which are then put into that store.

        Returns:
            (blocks, found): found[i] is True where block i came from the store.
        """
        ids = [list(i) for i in token_ids]
        texts = list(texts) if texts is not None else [None] * len(ids)
        store = self.store if store is None else store
        self._check_length(max((len(i) for i in ids), default=0), "a single block")
        keys = [self.key_of(i) for i in ids]
        blocks = [b if self.usable(b) else None for b in store.get_many(keys)]
        found = [b is not None for b in blocks]
        missing = [i for i, b in enumerate(blocks) if b is None]
        if missing:
            with self._attention:
                fresh = self.encoder.encode([ids[i] for i in missing], [keys[i] for i in missing],
                                            [texts[i] for i in missing])
            store.put_many(fresh)
            for i, block in zip(missing, fresh):
                blocks[i] = block
        return blocks, found  # type: ignore[return-value]

    def for_prompt(self, prompt: Prompt, store: KVStore | None = None) -> tuple[list[KVBlock], list[bool]]:
        """The prompt's context blocks: given KVBlocks as they are, the others through ``fetch``."""
        todo = [i for i, block in enumerate(prompt.context) if block.given is None]
        fetched, hits = self.fetch([prompt.context[i].ids for i in todo], [prompt.context[i].text for i in todo],
                                   store=store)
        blocks = [block.given for block in prompt.context]
        found = [True] * len(blocks)
        for i, block, hit in zip(todo, fetched, hits):
            blocks[i], found[i] = block, hit
        return blocks, found  # type: ignore[return-value]

    def stored(self, keys: Sequence[str]) -> list[KVBlock]:
        """Blocks of this model from the store, by content key.

        Raises:
            InvalidInputError: a key the store does not hold (or holds only for another model).
        """
        blocks = []
        for key, block in zip(keys, self.store.get_many(list(keys))):
            if block is None or block.fingerprint != self.fingerprint:
                raise InvalidInputError(
                    f"expected block key {key[:16]}... in the engine's store, found none for this model; pass the "
                    "passage text instead (it is encoded and cached on first use)")
            blocks.append(block)
        return blocks

    def lookup(self, key: str) -> KVBlock | None:
        """The stored block of this model under ``key``, or None."""
        block = self.store.get(key)
        return block if block is not None and block.fingerprint == self.fingerprint else None

    # --- attached stores ---------------------------------------------------------------------------

    def attach(self, store: KVStore) -> None:
        """Serve blocks also from ``store`` until ``detach`` (reads: own store first; writes: through)."""
        with self._lock:
            if self.store is not self._layered:
                self._own, self._attached = self.store, []  # the user replaced the store
            self._relayer([*self._attached, store])

    def detach(self, store: KVStore) -> None:
        """Stop serving blocks from an attached store (no-op if it is not attached)."""
        with self._lock:
            if self.store is self._layered:  # else the user replaced the store: leave theirs alone
                self._relayer([s for s in self._attached if s is not store])

    def _relayer(self, attached: list[KVStore]) -> None:
        from blockrag.store.tiered import TieredKVStore

        layered = self._own
        for back in attached:
            layered = TieredKVStore(layered, back, tolerate_write_errors=True)
        self._attached, self.store, self._layered = attached, layered, layered
