"""Token selection and text assembly for decoding: sampling, stop strings, streaming deltas.

Pure functions and one small class; the engine owns the model loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from blockrag.errors import InvalidInputError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature == 0 means greedy.

    Attributes:
        max_new_tokens: upper bound on generated tokens.
        temperature: softmax temperature; 0 selects the argmax.
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep the k most likely tokens; 0 keeps all.
        seed: seed for a private generator (reproducible sampling); None draws from torch's global RNG.
        stop: strings that end generation; the text is cut before the first one.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidInputError(f"expected max_new_tokens >= 1, found {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidInputError(f"expected temperature >= 0, found {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"expected 0 < top_p <= 1, found {self.top_p}")
        if self.top_k < 0:
            raise InvalidInputError(f"expected top_k >= 0, found {self.top_k}")
        if any(not s for s in self.stop):
            raise InvalidInputError("expected non-empty stop strings, found an empty one")


def select_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token from (V,) logits."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= params.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextAccumulator:
    """Turns a growing list of token ids into text deltas that are safe to show.

    A delta never ends inside a multi-byte character (decoders emit U+FFFD until the character is
    complete) and never shows text that could still turn out to be the start of a stop string.
    Concatenated deltas equal ``text`` once ``finish`` has been called.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._emitted = 0

    def add(self, token_id: int) -> str:
        """Append one token; returns the new visible text (may be empty). Sets ``stopped`` on a stop string."""
        self.ids.append(token_id)
        # NOTE: no clean-up of tokenization spaces: it rewrites text already shown when later tokens arrive.
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = find_stop(full, self.stop)
        if cut >= 0:
            self.text, self.stopped = full[:cut], True
            return self._emit(len(self.text))
        self.text = full
        if full.endswith("\ufffd"):
            return ""
        return self._emit(len(full) - _held_back(full, self.stop))

    def finish(self) -> str:
        """Whatever is left to show once generation ends."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (timings must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eos_ids(model, tokenizer) -> frozenset[int]:
    """Every end-of-sequence id the generation config, the model config or the tokenizer names."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def decode_loop(model, tokenizer, attention, *, eos: frozenset[int], max_positions: int | None, prefill, cache,
                logits: Tensor, position: int, start: float, params: SamplingParams, holder: list):
    """Pick a token, feed it, repeat; yields text deltas and appends the Generation to ``holder`` at the end.

    Args:
        model, tokenizer: the engine's.
        attention: the engine's attention switch, entered around each forward pass.
        eos: ids that end the generation.
        max_positions: the model's most positions (None: unbounded).
        prefill: the PrefillResult the generation starts from; cache, logits, position: its state.
        start: when the request started (for TTFT).
        params: sampling and stop settings.
        holder: receives the Generation.
    """
    import time

    from blockrag.hf import forward
    from blockrag.results import Generation, Usage

    device = next(model.parameters()).device
    generator = make_generator(params.seed, device)
    text = TextAccumulator(tokenizer, params.stop)
    token_ids: list[int] = []
    finish = "length"
    first_token_at = decode_start = time.perf_counter()
    # NOTE: inference mode only around each model call, never across a yield: it is per-thread state,
    # and a stream may be resumed from another thread (async frameworks pull it from a thread pool).
    while True:
        token = select_token(logits, params, generator)
        if not token_ids:
            first_token_at = time.perf_counter()
        if token in eos:
            finish = "stop"
            break
        token_ids.append(token)
        delta = text.add(token)
        if delta:
            yield delta
        if text.stopped:
            finish = "stop"
            break
        if len(token_ids) >= params.max_new_tokens or (max_positions is not None and position >= max_positions):
            break
        with torch.inference_mode(), attention:
            logits, cache = forward(model, torch.tensor([[token]], device=device),
                                    position_ids=torch.tensor([[position]], device=device), cache=cache)
        logits, position = logits[0, -1].float(), position + 1
    sync(device)
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
    holder.append(Generation(text=text.text, token_ids=tuple(token_ids), finish_reason=finish, prefill=prefill,
                             usage=usage))
