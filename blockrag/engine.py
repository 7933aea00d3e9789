"""BlockEngine: answer a question over passages whose KV is computed once, block by block.

The engine orchestrates; it has no tensor math of its own. ``prompt`` turns instruction, passages and
question into per-block token ids; ``blocks`` serves each context block from the store (encoded once on a
miss); ``assemble`` rotates and concatenates them into a cache (or ``graphs`` replays a captured forward);
the final block is prefilled over it; ``decode`` picks tokens and builds text. ``rope`` checks at
construction that the model's keys can be re-encoded; ``hf`` is the only door to transformers.

mode="block": context blocks come from the store (encoded on a miss), only the final block is prefilled.
mode="full": one ordinary causal prefill over exactly the same token ids.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Literal

import torch
from torch import nn

from blockrag.assemble import assemble_cache, context_cache, reads_in_place
from blockrag.blocks import BlockSource
from blockrag.decode import SamplingParams, decode_loop, eos_ids, sync
from blockrag.encoder import BlockEncoder, fits
from blockrag.errors import InvalidInputError
from blockrag.hf import AttentionSwitch, attention_implementation, forward
from blockrag.kv import KVBlock, block_key, check_block, model_fingerprint
from blockrag.prompt import PassageLike, Prompt, PromptBuilder, Segment
from blockrag.results import BlockInfo, Generation, GenerationStream, PrefillResult, Usage
from blockrag.rope import RopeSpec, rope_spec, verify_reencoding
from blockrag.store import KVStore, MemoryKVStore
from blockrag.template import BlockTemplate, Passage, get_template

__all__ = ["BlockEngine", "BlockInfo", "Generation", "GenerationStream", "Mode", "PassageLike", "PrefillResult",
           "Segment", "Usage"]

Mode = Literal["block", "full"]

_SHARED: dict[tuple, BlockEngine] = {}
_SHARED_LOCK = threading.Lock()
# Passages tokenized per tokenizer call in ``encode``: enough for a fast tokenizer's threads, few enough that
# the first batch reaches the encoder early.
TOKENIZE_CHUNK = 8


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
            flash kernels, split context; on the CPU it reads cached blocks in place). None: on CUDA with
            16-bit weights, and on the CPU for a model configured with "sdpa". The model's configured
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
        self._anchor = next(model.parameters())
        self.dtype = self._anchor.dtype
        self.fingerprint = model_fingerprint(model, tokenizer, self.dtype)
        self.encoder = BlockEncoder(model, self.fingerprint, token_budget)
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.eos_ids = eos_ids(model, tokenizer)
        if fast_attention is None:
            fast_attention = (self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)) or (
                self.device.type == "cpu" and attention_implementation(model) == "sdpa")
        self.fast_attention = fast_attention
        self._in_place = fast_attention  # read CPU blocks in place (until a model shows it cannot, see _prefill)
        self.assemble_path = assemble_path
        attention_name = None
        if fast_attention:
            from blockrag.attention import register

            attention_name = register()
        # NOTE: the engine's own forward passes run inside ``with self._attention:``; the model keeps its
        # configured implementation for everyone else.
        self._attention = AttentionSwitch(model, attention_name)
        self.prompts = PromptBuilder(self.template, tokenizer, self.max_positions,
                                     lambda block: check_block(block, self.fingerprint, self.dtype, self.device))
        self.blocks = BlockSource(self.encoder, store if store is not None else MemoryKVStore(), key_of=self.key_of,
                                  dtype=self.dtype, attention=self._attention,
                                  check_length=self.prompts.check_length)
        if verify_rope:
            verify_reencoding(model, self.rope)
        self.graphs = None
        if cuda_graphs:
            if not (fast_attention and self.device.type == "cuda"):
                raise InvalidInputError(
                    f"expected a 16-bit model on CUDA with fast_attention for cuda_graphs, found {self.dtype} on "
                    f"{self.device} (fast_attention={fast_attention})")
            from blockrag.graphs import FinalBlockGraphs

            self.graphs = FinalBlockGraphs(model, cuda_graphs, rotary_half=self.rope.inv_freq.numel())

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, *, gguf_file: str | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        attn_implementation: str = "sdpa", template: str | BlockTemplate | None = None,
                        trust_remote_code: bool = False, **engine_kwargs) -> BlockEngine:
        """Load a model and tokenizer through ``blockrag.models.load``: a short name (default
        ``blockrag.models.DEFAULT_MODEL``, ``smollm2-135m-block``: the embedded SmolLM2-135M-Instruct block fine-tuned;
        ``smollm2-135m`` is the base model), a ``.gguf`` file (or a directory / Hub repo plus ``gguf_file``), a local
        directory, a Hub name, or ``tiny-random``.

        device defaults to CUDA when available, else CPU; dtype to bfloat16 on CUDA, float32 on CPU.
        template defaults to the named model's own, else "chat".
        """
        from blockrag.models import DEFAULT_MODEL, load

        loaded = load(DEFAULT_MODEL if name_or_path is None else name_or_path, gguf_file=gguf_file, device=device,
                      dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
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
        # NOTE: one parameter kept, not next(model.parameters()) per call (it walks the module tree: ~15 us, once
        # per block of a prompt); module.to() moves a parameter's data, not the parameter object.
        return self._anchor.device

    @property
    def model_name(self) -> str:
        return getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__

    @property
    def store(self) -> KVStore:
        """Where encoded blocks are kept between requests (assignable)."""
        return self.blocks.store

    @store.setter
    def store(self, store: KVStore) -> None:
        self.blocks.store = store

    # --- blocks ----------------------------------------------------------------------------------

    def block_ids(self, passage: str | Passage) -> list[int]:
        """Token ids of one passage block."""
        return self.prompts.block_ids(passage)

    def prefix_ids(self, instruction: str | None = None) -> list[int]:
        """Token ids of block 0 (with BOS if the template and tokenizer use one)."""
        return self.prompts.prefix_ids(instruction)

    def final_ids(self, question: str) -> list[int]:
        return self.prompts.final_ids(question)

    def key_of(self, token_ids: Sequence[int]) -> str:
        return block_key(self.fingerprint, self.template.version, token_ids)

    def source_blocks(self, token_ids: Sequence[Sequence[int]], texts: Sequence[str | None] | None = None, *,
                      store: KVStore | None = None) -> tuple[list[KVBlock], list[bool]]:
        """The block source (``blockrag.blocks.BlockSource.fetch``): blocks of token-id lists looked up in
        ``store`` (default: the engine's), only blocks of this model used, the misses encoded in batches and
        put into that store. Returns (blocks, found): found[i] is True where block i came from the store."""
        return self.blocks.fetch(token_ids, texts, store=store)

    def encode(self, passages: Sequence[str | Passage]) -> list[KVBlock]:
        """KVBlocks of passages: from the store, or encoded (batched) and stored. Empty passages are refused."""
        texts = [self.template.render_passage(p) for p in passages]
        for i, p in enumerate(passages):
            if not (p.text if isinstance(p, Passage) else p).strip():
                raise InvalidInputError(f"expected non-empty passages, found an empty one at index {i}")
        # NOTE: passages go to the block source a batch at a time, as soon as a batch's worth is tokenized: the
        # encoder does not wait for the GPU, so the next batch is tokenized while this one is encoded. Texts are
        # tokenized a few per call (a fast tokenizer spreads a call over its threads), so the first batch, whose
        # tokenizing nothing overlaps, reaches the GPU sooner than one text at a time would let it.
        blocks: list[KVBlock] = []
        ids: list[list[int]] = []
        longest = 0
        for first in range(0, len(texts), TOKENIZE_CHUNK):
            for block_ids in self.template.tokenize_many(self.tokenizer, texts[first:first + TOKENIZE_CHUNK]):
                if not fits(len(ids) + 1, max(longest, len(block_ids)), self.encoder.token_budget):
                    blocks += self.blocks.fetch(ids, texts[len(blocks):len(blocks) + len(ids)])[0]
                    ids, longest = [], 0
                ids.append(block_ids)
                longest = max(longest, len(block_ids))
        return blocks + self.blocks.fetch(ids, texts[len(blocks):])[0]

    def stored_blocks(self, keys: Sequence[str]) -> list[KVBlock]:
        """Blocks of this model from the store, by content key (InvalidInputError for a key it lacks)."""
        return self.blocks.stored(keys)

    def passage_or_block(self, text: str, title: str | None = None, key: str | None = None) -> Passage | KVBlock:
        """The stored block under ``key`` when the store holds one for this model, else the passage itself.

        Text is always a correct fallback: blocks are keyed by content, so the same rendering is served
        from the store (or encoded once) either way; the key also covers blocks rendered differently.
        """
        block = self.blocks.lookup(key) if key else None
        return block if block is not None else Passage(text=text, title=title or None)

    def attach_store(self, store: KVStore) -> None:
        """Serve blocks also from ``store`` (e.g. a knowledge base's disk store) until ``detach_store``.

        Reads try the engine's own store first, then attached stores (hits are kept in the engine's own);
        new blocks are written through. A write an attached store refuses (disk full) keeps the block in
        memory only, with a warning.
        """
        self.blocks.attach(store)

    def detach_store(self, store: KVStore) -> None:
        """Stop serving blocks from a store given to ``attach_store`` (no-op if it is not attached)."""
        self.blocks.detach(store)

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
        """``passages`` may be an already built ``Prompt`` (then question and instruction are unused)."""
        if mode not in ("block", "full"):
            raise InvalidInputError(f"expected mode 'block' or 'full', found {mode!r}")
        recompute = self._recompute_spec(recompute, mode, reencode)
        start = time.perf_counter()
        prompt = passages if isinstance(passages, Prompt) else self.prompts.build(passages, question, instruction)
        device = self.device
        blocks, found = self.blocks.for_prompt(prompt) if mode == "block" else ([], [])
        # 1. the context: cached blocks rotated into one cache (block mode), or nothing (full mode)
        feed, cache, next_pos, release = (prompt.final_ids if mode == "block" else prompt.input_ids), None, 0, _nothing
        attention_kwargs = {}
        graphed = self.graphs.try_prefill(blocks, feed, self.rope, reencode, device, self._attention) if (
            self.graphs is not None and recompute is None) else None
        # NOTE: the final block's ids go up before the context: queued after host blocks' bulk copies, this small
        # copy would wait for all of them (and the first layer with it).
        ids = torch.tensor([feed], device=device) if graphed is None else None
        if graphed is not None:
            logits, cache, release = graphed
            next_pos = sum(b.num_tokens for b in blocks)
        elif blocks and self._in_place and self.assemble_path is None and recompute is None and reads_in_place(
                blocks, device, self.dtype):  # no copy of the context before the first token (assemble.context_cache)
            cache, next_pos, context = context_cache(blocks, self.rope, self.model.config, reencode=reencode,
                                                     capacity=len(feed) + new_tokens)
            attention_kwargs = {"blockrag_blocks": context}
        elif blocks:
            cache, next_pos = self._assemble(blocks, reencode, len(feed) + new_tokens)
        # 2. the final block (everything in full mode), prefilled over it; with recompute, chosen context tokens too
        positions = torch.arange(next_pos, next_pos + len(feed), device=device)
        recomputed = 0
        if recompute is not None and blocks:
            logits, cache, recomputed = self._recompute(recompute, blocks, cache, feed, new_tokens, prompt.warnings)
        elif graphed is None:
            with self._attention:
                logits, cache = forward(self.model, ids, position_ids=positions[None], cache=cache, logits_to_keep=1,
                                        **attention_kwargs)
            if attention_kwargs and not attention_kwargs["blockrag_blocks"].read_by_every_layer():
                # NOTE: this model's decoder layers do not pass keyword arguments on to attention (e.g. StableLM),
                # so the blocks were never read: prefill again over assembled blocks, and assemble from now on.
                self._in_place = False
                cache, _ = self._assemble(blocks, reencode, len(feed) + new_tokens)
                with self._attention:
                    logits, cache = forward(self.model, ids, position_ids=positions[None], cache=cache,
                                            logits_to_keep=1)
            logits = logits[0, -1].float()
        try:
            # NOTE: the result's host-side parts are built while the GPU still works (tens of thousands of ids at
            # long contexts); only the logits wait for it.
            input_ids = tuple(prompt.input_ids)
            if mode == "block" and not reencode:
                position_ids = tuple(chain.from_iterable(range(len(block.ids)) for block in prompt.context))
                position_ids += tuple(range(next_pos, next_pos + len(feed)))
            else:
                position_ids = tuple(range(next_pos + len(feed)))
            infos = tuple(BlockInfo(b.key, b.token_ids, hit) for b, hit in zip(blocks, found))
            sync(device)
            usage = Usage(cached_tokens=sum(b.num_tokens for b, hit in zip(blocks, found) if hit),
                          encoded_tokens=sum(b.num_tokens for b, hit in zip(blocks, found) if not hit),
                          prefilled_tokens=len(feed) + recomputed, ttft_s=time.perf_counter() - start,
                          recomputed_tokens=recomputed)
            result = PrefillResult(
                mode=mode, logits=logits.cpu(), input_ids=input_ids, final_ids=tuple(prompt.final_ids),
                position_ids=position_ids, blocks=infos, usage=usage, warnings=tuple(prompt.warnings),
            )
        except BaseException:
            release()  # the graph buffer must not stay locked when the prefill fails after the replay
            raise
        return result, cache, (logits, next_pos + len(feed), start, release)

    def _assemble(self, blocks: list[KVBlock], reencode: bool, capacity: int):
        return assemble_cache(blocks, self.rope, self.model.config, self.device, reencode=reencode, capacity=capacity,
                              path=self.assemble_path, dtype=self.dtype)

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
        if self.graphs is not None or (self.fast_attention and self.device.type == "cuda"):
            warnings.append("selective recompute ran with the model's own attention, not the fast attention or "
                            "CUDA graphs (they assume a bottom-right causal final block; recompute needs an explicit "
                            "mask)")
        context = [t for b in blocks for t in b.token_ids]
        positions = select_positions(self.model, spec, [b.num_tokens for b in blocks], context, cache, final_ids)
        logits, cache = recompute_prefill(self.model, cache, context, positions, final_ids, capacity=new_tokens)
        return logits, cache, len(positions)

    # --- segments: a prompt of arbitrary cached / live pieces ----------------------------------------

    def prefill_segments(self, segments: Sequence[Segment | KVBlock], *, mode: Mode = "block",
                         reencode: bool = True) -> PrefillResult:
        """``prefill`` for a prompt of segments (see ``blockrag.prompt.Segment``): cached segments are blocks
        (served from the store, encoded once), live ones are prefilled as the final block."""
        result, _, (_, _, _, release) = self._prefill(self.prompts.from_segments(segments), None, None, mode,
                                                      reencode, 0)
        release()
        return result

    def cache_segments(self, segments: Sequence[Segment]) -> list[KVBlock]:
        """Blocks of the cached segments (from the store, or encoded now and stored), e.g. a chat turn that just
        finished, so the next request finds it. Segments are placed as in a prompt: the first gets BOS."""
        chosen = [(i, s) for i, s in enumerate(segments) if s.cached]
        return self.blocks.fetch([self.prompts.segment_ids(s.text, first=i == 0) for i, s in chosen],
                                 [s.text for _, s in chosen])[0]

    def generate_segments(self, segments: Sequence[Segment | KVBlock], *, mode: Mode = "block",
                          reencode: bool = True, **sampling) -> Generation:
        """``generate`` for a prompt of segments; ``sampling``: max_new_tokens, temperature, top_p, top_k,
        seed, stop (as in ``generate``)."""
        holder: list[Generation] = []
        for _ in self._run(self.prompts.from_segments(segments), None, None, mode, reencode,
                           _sampling(**sampling), holder):
            pass
        return holder[0]

    def stream_segments(self, segments: Sequence[Segment | KVBlock], *, mode: Mode = "block",
                        reencode: bool = True, **sampling) -> GenerationStream:
        """``stream`` for a prompt of segments (validated before this returns)."""
        holder: list[Generation] = []
        prompt = self.prompts.from_segments(segments)
        return GenerationStream(self._run(prompt, None, None, mode, reencode, _sampling(**sampling), holder), holder)

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
        prompt = self.prompts.build(passages, question, instruction)  # fail early, before the first next()
        self._recompute_spec(recompute, mode, reencode)
        return GenerationStream(self._run(prompt, None, None, mode, reencode, params, holder, recompute), holder)

    def _run(self, passages, question, instruction, mode, reencode, params: SamplingParams,
             holder: list[Generation], recompute=None) -> Iterator[str]:
        prefill, cache, (logits, position, start, release) = self._prefill(passages, question, instruction, mode,
                                                                           reencode, params.max_new_tokens, recompute)
        try:
            yield from decode_loop(self.model, self.tokenizer, self._attention, eos=self.eos_ids,
                                   max_positions=self.max_positions, prefill=prefill, cache=cache, logits=logits,
                                   position=position, start=start, params=params, holder=holder)
        finally:
            release()


def _nothing() -> None:
    pass


def _sampling(max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
              seed: int | None = None, stop: Sequence[str] = ()) -> SamplingParams:
    return SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop))
