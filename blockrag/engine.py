"""BlockEngine: answer a question over passages whose KV is computed once, block by block.

The engine orchestrates; it has no tensor math of its own. Templates decide text and ids
(``template``), the encoder computes isolated block KV (``encoder``), the store keeps it (``store``),
``assemble`` rotates and concatenates it into a cache, and ``decode`` picks tokens and builds text.

mode="block": context blocks come from the store (encoded on a miss), only the final block is prefilled.
mode="full": one ordinary causal prefill over exactly the same token ids.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from blockrag.assemble import assemble_cache, fast_path
from blockrag.decode import SamplingParams, TextAccumulator, make_generator, select_token
from blockrag.encoder import BlockEncoder
from blockrag.errors import InvalidInputError, PromptTooLongError, UnsupportedModelError
from blockrag.hf import AttentionSwitch, forward, stacked_kv
from blockrag.kv import KVBlock, block_key, check_block, model_fingerprint
from blockrag.rope import RopeSpec, rope_spec, rotate_keys
from blockrag.store import KVStore, MemoryKVStore
from blockrag.template import BlockTemplate, Passage, get_template

Mode = Literal["block", "full"]
PassageLike = str | Passage | KVBlock

_SHARED: dict[tuple, BlockEngine] = {}
_SHARED_LOCK = threading.Lock()


@dataclass(frozen=True)
class Usage:
    """Token accounting and timing of one request.

    Attributes:
        cached_tokens: context tokens whose KV was served from cached blocks.
        encoded_tokens: context tokens encoded during this request (block store misses).
        prefilled_tokens: tokens run through the request's prefill (the final block; all in full mode).
        generated_tokens: tokens produced by decoding.
        ttft_s: seconds from the call to the first token's logits.
        decode_tokens_per_s: decoding speed after the first token (0 when fewer than two tokens).
        recomputed_tokens: context tokens re-encoded with full attention (``recompute``); they are also
            counted in ``cached_tokens`` (their cached KV was read, then overwritten) and in ``prefilled_tokens``.
    """

    cached_tokens: int
    encoded_tokens: int
    prefilled_tokens: int
    ttft_s: float
    generated_tokens: int = 0
    decode_tokens_per_s: float = 0.0
    recomputed_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.cached_tokens + self.encoded_tokens + self.prefilled_tokens


@dataclass(frozen=True)
class BlockInfo:
    """One context block of a request: its key, token ids and whether its KV was already cached."""

    key: str
    token_ids: tuple[int, ...]
    cached: bool


@dataclass(frozen=True)
class PrefillResult:
    """Outcome of a prefill.

    Attributes:
        mode: "block" or "full".
        logits: (V,) float32 logits of the last prompt token, on the CPU.
        input_ids: all prompt ids (context blocks then the final block).
        final_ids: ids of the final block.
        position_ids: the position of every prompt id.
        blocks: the context blocks, in order.
        usage: token accounting and TTFT.
        warnings: things skipped or adjusted (e.g. empty passages).
    """

    mode: str
    logits: torch.Tensor
    input_ids: tuple[int, ...]
    final_ids: tuple[int, ...]
    position_ids: tuple[int, ...]
    blocks: tuple[BlockInfo, ...]
    usage: Usage
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    """Generated text with the prefill it started from."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prefill: PrefillResult
    usage: Usage

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.prefill.warnings


@dataclass
class _Prompt:
    context: list[tuple[list[int], str | None, KVBlock | None]]  # ids, text, given block
    final_ids: list[int]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids, _, _ in self.context) + len(self.final_ids)


class GenerationStream:
    """Iterator of text deltas; ``result`` holds the Generation once the iterator is exhausted."""

    def __init__(self, deltas: Iterator[str], holder: list[Generation]) -> None:
        self._deltas = deltas
        self._holder = holder

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def __next__(self) -> str:
        return next(self._deltas)

    @property
    def result(self) -> Generation:
        if not self._holder:
            raise RuntimeError("the stream has not finished; iterate it to the end first")
        return self._holder[0]


def _nothing() -> None:
    pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BlockEngine:
    """Block-Attention prefill and generation over a loaded HF causal LM.

    Args:
        model: a transformers causal LM with rotary position embeddings, in eval mode.
        tokenizer: its tokenizer.
        template: a preset name ("chat", "tulu3-block") or a BlockTemplate.
        store: where encoded blocks are kept between requests (default: an in-memory LRU).
        token_budget: most tokens (batch x longest block) per encoding forward pass.
        verify_rope: at construction, check on a short probe that rotating cached keys reproduces
            keys encoded at the shifted positions; refuse the model if not.
        fast_attention: run the engine's own forward passes with ``blockrag.attention`` (GQA-native,
            flash kernels, split context). None: on CUDA with 16-bit weights. The model's configured
            attention is restored after every call.
        assemble_path: force how cached blocks are assembled ("eager", "gpu", "host"); None picks the
            fastest that applies (see ``blockrag.assemble.fast_path``). For benchmarks and debugging.
        cuda_graphs: most context tokens for CUDA-graph replay of the final-block prefill (see
            ``blockrag.graphs``); reserves a static KV buffer of that size on the GPU. None: off.
    """

    def __init__(self, model: nn.Module, tokenizer, *, template: str | BlockTemplate = "chat",
                 store: KVStore | None = None, token_budget: int = 8192, verify_rope: bool = True,
                 fast_attention: bool | None = None, assemble_path: str | None = None,
                 cuda_graphs: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.rope: RopeSpec = rope_spec(model)
        self.template = get_template(template, tokenizer)
        self.store = store if store is not None else MemoryKVStore()
        self._own_store, self._attached_stores, self._layered_store = self.store, [], self.store
        self._stores_lock = threading.Lock()
        self.dtype = next(model.parameters()).dtype
        self.fingerprint = model_fingerprint(model, tokenizer, self.dtype)
        self.encoder = BlockEncoder(model, self.fingerprint, token_budget)
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.eos_ids = self._eos_ids()
        if fast_attention is None:
            fast_attention = self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
        self.fast_attention = fast_attention
        self.assemble_path = assemble_path
        attention_name = None
        if fast_attention:
            from blockrag.attention import register

            attention_name = register()
        # NOTE: the engine's own forward passes run inside ``with self._attention:``; the model keeps its
        # configured implementation for everyone else.
        self._attention = AttentionSwitch(model, attention_name)
        if verify_rope:
            self._verify_rope()
        self.graphs = None
        if cuda_graphs:
            if not (fast_attention and self.device.type == "cuda"):
                raise InvalidInputError(
                    f"expected a 16-bit model on CUDA with fast_attention for cuda_graphs, found {self.dtype} on "
                    f"{self.device} (fast_attention={fast_attention})")
            from blockrag.graphs import FinalBlockGraphs

            self.graphs = FinalBlockGraphs(model, cuda_graphs)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2-135m", *, gguf_file: str | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        attn_implementation: str = "sdpa", template: str | BlockTemplate | None = None,
                        trust_remote_code: bool = False, **engine_kwargs) -> BlockEngine:
        """Load a model and tokenizer through ``blockrag.models.load``: a short name (default: the embedded
        ``smollm2-135m``), a ``.gguf`` file (or a directory / Hub repo plus ``gguf_file``), a local directory,
        a Hub name, or ``tiny-random``.

        device defaults to CUDA when available, else CPU; dtype to bfloat16 on CUDA, float32 on CPU.
        template defaults to the named model's own, else "chat".
        """
        from blockrag.models import load

        loaded = load(name_or_path, gguf_file=gguf_file, device=device, dtype=dtype,
                      attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
        return cls(loaded.model, loaded.tokenizer, template=template or loaded.template or "chat", **engine_kwargs)

    @classmethod
    def shared(cls, name_or_path: str, *, device: str | None = None, dtype: str | None = None,
               template: str | None = None) -> BlockEngine:
        """The process-wide engine for a model name or local path, loaded on first use.

        Framework components are constructed often (per chain, per call, per test); they share one
        engine per (model, device, dtype, template) instead of loading weights each time.
        """
        key = (name_or_path, device, dtype, template)
        with _SHARED_LOCK:
            engine = _SHARED.get(key)
            if engine is None:
                engine = cls.from_pretrained(name_or_path, device=device, dtype=dtype, template=template)
                _SHARED[key] = engine
        return engine

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def model_name(self) -> str:
        return getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__

    # --- blocks ----------------------------------------------------------------------------------

    def block_ids(self, passage: str | Passage) -> list[int]:
        """Token ids of one passage block."""
        return self.template.tokenize(self.tokenizer, self.template.render_passage(passage))

    def prefix_ids(self, instruction: str | None = None) -> list[int]:
        """Token ids of block 0 (with BOS if the template and tokenizer use one)."""
        return self.template.tokenize(self.tokenizer, self.template.render_prefix(instruction), first=True)

    def final_ids(self, question: str) -> list[int]:
        return self.template.tokenize(self.tokenizer, self.template.render_final(question))

    def key_of(self, token_ids: Sequence[int]) -> str:
        return block_key(self.fingerprint, self.template.version, token_ids)

    def stored_blocks(self, keys: Sequence[str]) -> list[KVBlock]:
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

    def passage_or_block(self, text: str, title: str | None = None, key: str | None = None) -> Passage | KVBlock:
        """The stored block under ``key`` when the store holds one for this model, else the passage itself.

        Text is always a correct fallback: blocks are keyed by content, so the same rendering is served
        from the store (or encoded once) either way; the key also covers blocks rendered differently.
        """
        if key:
            block = self.store.get(key)
            if block is not None and block.fingerprint == self.fingerprint:
                return block
        return Passage(text=text, title=title or None)

    def encode(self, passages: Sequence[str | Passage]) -> list[KVBlock]:
        """KVBlocks of passages: from the store, or encoded (batched) and stored. Empty passages are refused."""
        texts = [self.template.render_passage(p) for p in passages]
        for i, p in enumerate(passages):
            if not (p.text if isinstance(p, Passage) else p).strip():
                raise InvalidInputError(f"expected non-empty passages, found an empty one at index {i}")
        blocks, _ = self._blocks_for([self.template.tokenize(self.tokenizer, t) for t in texts], texts)
        return blocks

    def source_blocks(self, token_ids: Sequence[Sequence[int]], texts: Sequence[str | None] | None = None, *,
                      store: KVStore | None = None) -> tuple[list[KVBlock], list[bool]]:
        """The block source: blocks of token-id lists looked up in ``store`` (default: the engine's), only
        blocks of this model used, the misses encoded in batches and put into that store.

        Returns:
            (blocks, found): found[i] is True where block i came from the store.
        """
        ids = [list(i) for i in token_ids]
        return self._blocks_for(ids, list(texts) if texts is not None else [None] * len(ids), store)

    def attach_store(self, store: KVStore) -> None:
        """Serve blocks also from ``store`` (e.g. a knowledge base's disk store) until ``detach_store``.

        Reads try the engine's own store first, then attached stores (hits are kept in the engine's own);
        new blocks are written through. A write an attached store refuses (disk full) keeps the block in
        memory only, with a warning.
        """
        with self._stores_lock:
            if self.store is not self._layered_store:
                self._own_store, self._attached_stores = self.store, []  # the user replaced the store
            self._relayer([*self._attached_stores, store])

    def detach_store(self, store: KVStore) -> None:
        """Stop serving blocks from a store given to ``attach_store`` (no-op if it is not attached)."""
        with self._stores_lock:
            if self.store is self._layered_store:  # else the user replaced the store: leave theirs alone
                self._relayer([s for s in self._attached_stores if s is not store])

    def _relayer(self, attached: list[KVStore]) -> None:
        from blockrag.store.tiered import TieredKVStore

        layered = self._own_store
        for back in attached:
            layered = TieredKVStore(layered, back, tolerate_write_errors=True)
        self._attached_stores, self.store = attached, layered
        self._layered_store = layered

    def _blocks_for(self, ids: Sequence[list[int]], texts: Sequence[str | None],
                    store: KVStore | None = None) -> tuple[list[KVBlock], list[bool]]:
        """Blocks for token-id lists: store hits, then one batched encode of the misses (stored after)."""
        store = self.store if store is None else store
        self._check_length(max((len(i) for i in ids), default=0), "a single block")
        keys = [self.key_of(i) for i in ids]
        found = store.get_many(keys)
        blocks: list[KVBlock | None] = []
        for block in found:
            # NOTE: a store may hold blocks of another model under a colliding path; never use them.
            usable = block is not None and block.fingerprint == self.fingerprint and (
                block.dtype == self.dtype or block.quantized)
            blocks.append(block if usable else None)
        cached = [b is not None for b in blocks]
        missing = [i for i, b in enumerate(blocks) if b is None]
        if missing:
            with self._attention:
                fresh = self.encoder.encode([ids[i] for i in missing], [keys[i] for i in missing],
                                            [texts[i] for i in missing])
            store.put_many(fresh)
            for i, block in zip(missing, fresh):
                blocks[i] = block
        return blocks, cached  # type: ignore[return-value]

    # --- prompt ----------------------------------------------------------------------------------

    def _prompt(self, passages: Sequence[PassageLike], question: str, instruction: str | None) -> _Prompt:
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError(f"expected a non-empty question, found {question!r}")
        if isinstance(passages, (str, Passage, KVBlock)):
            raise InvalidInputError("expected a sequence of passages, found a single item; wrap it in a list")
        prompt = _Prompt(context=[], final_ids=self.final_ids(question))
        prefix_text = self.template.render_prefix(instruction)
        if prefix_text:
            prompt.context.append((self.prefix_ids(instruction), prefix_text, None))
        for index, item in enumerate(passages):
            if isinstance(item, KVBlock):
                check_block(item, self.fingerprint, self.dtype, self.device)
                prompt.context.append((list(item.token_ids), item.text, item))
                continue
            if not isinstance(item, (str, Passage)):
                raise InvalidInputError(f"expected str, Passage or KVBlock, found {type(item).__name__} at {index}")
            text = item.text if isinstance(item, Passage) else item
            if not text.strip():
                prompt.warnings.append(f"skipped empty passage at index {index}")
                continue
            rendered = self.template.render_passage(item)
            prompt.context.append((self.template.tokenize(self.tokenizer, rendered), rendered, None))
        self._check_length(prompt.num_tokens, "the prompt")
        return prompt

    def _check_length(self, num_tokens: int, what: str) -> None:
        if self.max_positions is not None and num_tokens > self.max_positions:
            raise PromptTooLongError(
                f"{what} has {num_tokens} tokens, the model accepts at most {self.max_positions} positions; "
                "pass fewer or shorter passages"
            )

    # --- prefill ---------------------------------------------------------------------------------

    def prefill(self, passages: Sequence[PassageLike], question: str, *, instruction: str | None = None,
                mode: Mode = "block", reencode: bool = True, recompute=None) -> PrefillResult:
        """Prefill a prompt and return the last token's logits.

        Args:
            passages: passage texts, Passages or KVBlocks (already encoded by this engine's model).
            question: the user's question (non-empty).
            instruction: text for block 0 (the template's default if None).
            mode: "block" (cached context blocks, final block prefilled) or "full" (one causal prefill).
            reencode: block mode only; False keeps every block at its own positions 0..T-1 (ablation).
            recompute: block mode only; context tokens to re-encode with full attention at question time
                (training-free recovery, see ``blockrag.recompute``), e.g. "first:8", "deviation:0.15",
                "query:0.1", "all" (== full mode), or a ``Recompute``. None: plain block mode.
        """
        result, _, (_, _, _, release) = self._prefill(passages, question, instruction, mode, reencode, 0, recompute)
        release()
        return result

    @torch.inference_mode()
    def _prefill(self, passages, question, instruction, mode, reencode, new_tokens: int, recompute=None):
        """``passages`` may be an already built ``_Prompt`` (then question and instruction are unused)."""
        if mode not in ("block", "full"):
            raise InvalidInputError(f"expected mode 'block' or 'full', found {mode!r}")
        recompute = self._recompute_spec(recompute, mode, reencode)
        start = time.perf_counter()
        prompt = passages if isinstance(passages, _Prompt) else self._prompt(passages, question, instruction)
        context_ids = [ids for ids, _, _ in prompt.context]
        input_ids = [t for ids in context_ids for t in ids] + prompt.final_ids
        device = self.device
        infos: list[BlockInfo] = []
        if mode == "block":
            blocks, cached = self._context_blocks(prompt)
            infos = [BlockInfo(b.key, b.token_ids, c) for b, c in zip(blocks, cached)]
            feed = prompt.final_ids
            graphed = None if recompute is not None else self._graph_prefill(blocks, feed, reencode)
            if graphed is not None:
                logits, cache, release = graphed
                next_pos = sum(b.num_tokens for b in blocks)
            elif blocks:
                cache, next_pos = assemble_cache(blocks, self.rope, self.model.config, device, reencode=reencode,
                                                 capacity=len(prompt.final_ids) + new_tokens,
                                                 path=self.assemble_path, dtype=self.dtype)
            else:
                cache, next_pos = None, 0
            cached_tokens = sum(b.num_tokens for b, c in zip(blocks, cached) if c)
            encoded_tokens = sum(b.num_tokens for b, c in zip(blocks, cached) if not c)
        else:
            cache, next_pos, feed, graphed = None, 0, input_ids, None
            cached_tokens = encoded_tokens = 0
        positions = torch.arange(next_pos, next_pos + len(feed), device=device)
        recomputed = 0
        if recompute is not None and blocks:
            release = _nothing
            logits, cache, recomputed = self._recompute(recompute, blocks, cache, feed, new_tokens, prompt.warnings)
        elif graphed is None:
            release = _nothing
            with self._attention:
                logits, cache = forward(self.model, torch.tensor([feed], device=device), position_ids=positions[None],
                                        cache=cache, logits_to_keep=1)
            logits = logits[0, -1].float()
        try:
            _sync(device)
            usage = Usage(cached_tokens=cached_tokens, encoded_tokens=encoded_tokens,
                          prefilled_tokens=len(feed) + recomputed, ttft_s=time.perf_counter() - start,
                          recomputed_tokens=recomputed)
            if mode == "block" and not reencode:
                context_positions = [p for ids in context_ids for p in range(len(ids))]
            else:
                context_positions = list(range(next_pos))
            result = PrefillResult(
                mode=mode, logits=logits.cpu(), input_ids=tuple(input_ids), final_ids=tuple(prompt.final_ids),
                position_ids=tuple(context_positions + positions.tolist()), blocks=tuple(infos), usage=usage,
                warnings=tuple(prompt.warnings),
            )
        except BaseException:
            release()  # the graph buffer must not stay locked when the prefill fails after the replay
            raise
        return result, cache, (logits, next_pos + len(feed), start, release)

    def _recompute_spec(self, recompute, mode: str, reencode: bool):
        if recompute is None:
            return None
        from blockrag.recompute import Recompute

        spec = Recompute.parse(recompute)
        if mode != "block" or not reencode:
            raise InvalidInputError(f"expected recompute only in block mode with position re-encoding, found "
                                    f"mode={mode!r}, reencode={reencode}")
        return spec

    def _recompute(self, spec, blocks: list[KVBlock], cache, final_ids: list[int], new_tokens: int,
                   warnings: list[str]):
        """(logits, cache, recomputed tokens) of a block-mode prefill with selective recompute."""
        from blockrag.recompute import recompute_prefill, select_positions

        # NOTE: the fast paths assume a bottom-right causal final block; a recompute pass needs an explicit mask,
        # so it runs with the model's own attention (sdpa or eager) and without CUDA-graph replay.
        if self.graphs is not None or self.fast_attention:
            warnings.append("selective recompute ran with the model's own attention, not the fast attention or "
                            "CUDA graphs (they assume a bottom-right causal final block; recompute needs an explicit "
                            "mask)")
        context = [t for b in blocks for t in b.token_ids]
        positions = select_positions(self.model, spec, [b.num_tokens for b in blocks], context, cache, final_ids)
        logits, cache = recompute_prefill(self.model, cache, context, positions, final_ids, capacity=new_tokens)
        return logits, cache, len(positions)

    def _graph_prefill(self, blocks: list[KVBlock], final_ids: list[int], reencode: bool):
        """(logits, cache, release) from a CUDA-graph replay, or None where the eager path applies.

        The static buffer serves one request at a time: ``release`` frees it once decoding is done.
        """
        path = fast_path(blocks, self.device) if self.graphs is not None and blocks else "eager"
        if path == "eager":
            return None
        bucket = self.graphs.bucket(sum(b.num_tokens for b in blocks), len(final_ids))
        if bucket is None or not self.graphs.lock.acquire(blocking=False):
            return None
        try:  # host-resident blocks: the graphs copy them group of layers by group, overlapped with the replay
            with self._attention:
                logits, cache = self.graphs.prefill(blocks, final_ids, self.rope, reencode, bucket)
        except BaseException:
            self.graphs.lock.release()
            raise
        return logits, cache, self.graphs.lock.release

    def _context_blocks(self, prompt: _Prompt) -> tuple[list[KVBlock], list[bool]]:
        todo = [i for i, (_, _, given) in enumerate(prompt.context) if given is None]
        found, cached = self._blocks_for([prompt.context[i][0] for i in todo], [prompt.context[i][1] for i in todo])
        blocks = [given for _, _, given in prompt.context]
        flags = [True] * len(blocks)
        for i, block, hit in zip(todo, found, cached):
            blocks[i], flags[i] = block, hit
        return blocks, flags  # type: ignore[return-value]

    # --- generation ------------------------------------------------------------------------------

    def generate(self, passages: Sequence[PassageLike], question: str, *, instruction: str | None = None,
                 mode: Mode = "block", reencode: bool = True, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: Sequence[str] = (), recompute=None) -> Generation:
        """Generate an answer (greedy when temperature == 0). See ``prefill`` for the prompt arguments."""
        holder: list[Generation] = []
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop))
        for _ in self._run(passages, question, instruction, mode, reencode, params, holder, recompute):
            pass
        return holder[0]

    def stream(self, passages: Sequence[PassageLike], question: str, *, instruction: str | None = None,
               mode: Mode = "block", reencode: bool = True, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: Sequence[str] = (), recompute=None) -> GenerationStream:
        """Like ``generate`` but yields text deltas as they become safe to show.

        The prompt is validated (and errors raised) before this returns; the model runs as the stream
        is iterated. ``stream.result`` is the Generation once the stream is exhausted.
        """
        holder: list[Generation] = []
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop))
        prompt = self._prompt(passages, question, instruction)  # fail early, before the first next()
        self._recompute_spec(recompute, mode, reencode)
        return GenerationStream(self._run(prompt, None, None, mode, reencode, params, holder, recompute), holder)

    def _run(self, passages, question, instruction, mode, reencode, params: SamplingParams,
             holder: list[Generation], recompute=None) -> Iterator[str]:
        prefill, cache, (logits, position, start, release) = self._prefill(passages, question, instruction, mode,
                                                                           reencode, params.max_new_tokens, recompute)
        try:
            yield from self._decode(prefill, cache, logits, position, start, params, holder)
        finally:
            release()

    def _decode(self, prefill: PrefillResult, cache, logits, position: int, start: float, params: SamplingParams,
                holder: list[Generation]) -> Iterator[str]:
        device = self.device
        generator = make_generator(params.seed, device)
        text = TextAccumulator(self.tokenizer, params.stop)
        token_ids: list[int] = []
        finish = "length"
        first_token_at = decode_start = time.perf_counter()
        # NOTE: inference mode only around each model call, never across a yield: it is per-thread state,
        # and a stream may be resumed from another thread (async frameworks pull it from a thread pool).
        while True:
            token = select_token(logits, params, generator)
            if not token_ids:
                first_token_at = time.perf_counter()
            if token in self.eos_ids:
                finish = "stop"
                break
            token_ids.append(token)
            delta = text.add(token)
            if delta:
                yield delta
            if text.stopped:
                finish = "stop"
                break
            if len(token_ids) >= params.max_new_tokens or (
                    self.max_positions is not None and position >= self.max_positions):
                break
            with torch.inference_mode(), self._attention:
                logits, cache = forward(self.model, torch.tensor([[token]], device=device),
                                        position_ids=torch.tensor([[position]], device=device), cache=cache)
            logits, position = logits[0, -1].float(), position + 1
        _sync(device)
        tail = text.finish()
        if tail:
            yield tail
        decode_s = time.perf_counter() - decode_start
        usage = Usage(
            cached_tokens=prefill.usage.cached_tokens, encoded_tokens=prefill.usage.encoded_tokens,
            prefilled_tokens=prefill.usage.prefilled_tokens, recomputed_tokens=prefill.usage.recomputed_tokens,
            ttft_s=first_token_at - start,
            generated_tokens=len(token_ids),
            decode_tokens_per_s=(len(token_ids) - 1) / decode_s if len(token_ids) > 1 and decode_s > 0 else 0.0,
        )
        holder.append(Generation(text=text.text, token_ids=tuple(token_ids), finish_reason=finish,
                                 prefill=prefill, usage=usage))

    # --- checks ----------------------------------------------------------------------------------

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    @torch.inference_mode()
    def _verify_rope(self, length: int = 12, delta: int = 29) -> None:
        """Rotated keys of a probe block must equal keys encoded at the shifted positions."""
        vocab = self.model.config.get_text_config().vocab_size
        ids = torch.arange(3, 3 + length, device=self.device)[None] % vocab
        keys = []
        for offset in (0, delta):
            positions = torch.arange(offset, offset + length, device=self.device)[None]
            _, cache = forward(self.model, ids, position_ids=positions, logits_to_keep=1)
            keys.append(torch.stack([k[0] for k in stacked_kv(cache)[0]]).float())
        moved = rotate_keys(keys[0], delta, self.rope.inv_freq)
        error = float((moved - keys[1]).norm() / keys[1].norm().clamp_min(1e-12))
        tolerance = 1e-3 if self.dtype == torch.float32 else 5e-2
        if not error <= tolerance:
            raise UnsupportedModelError(
                f"expected rotated cached keys to match keys encoded {delta} positions later (relative error <= "
                f"{tolerance}), found {error:.3g} for {self.model.config.model_type}; this model's position "
                "encoding cannot be re-encoded block by block"
            )
