"""Generation: sampling, stop strings, EOS, streaming deltas (multi-byte safe)."""

import pytest
import torch

from blockrag import InvalidInputError
from blockrag.decode import SamplingParams, TextAccumulator, eos_ids, select_token

PASSAGES = ["Paris is the capital of France.", "The fox jumps over the dog."]


def test_greedy_is_deterministic_and_modes_share_the_api(make_engine):
    engine = make_engine("llama")
    a = engine.generate(PASSAGES, "Capital?", max_new_tokens=8)
    b = engine.generate(PASSAGES, "Capital?", max_new_tokens=8)
    assert a.token_ids == b.token_ids and a.text == b.text
    full = engine.generate(PASSAGES, "Capital?", max_new_tokens=8, mode="full")
    assert full.prefill.mode == "full" and full.usage.cached_tokens == 0
    assert full.prefill.input_ids == a.prefill.input_ids
    for g in (a, full):
        assert g.usage.ttft_s > 0 and g.usage.generated_tokens == len(g.token_ids)
        assert g.finish_reason in ("stop", "length")


def test_sampling_with_seed_is_reproducible_and_differs_from_greedy(make_engine):
    engine = make_engine("qwen2")
    kwargs = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95)
    a = engine.generate(PASSAGES, "Capital?", seed=7, **kwargs)
    b = engine.generate(PASSAGES, "Capital?", seed=7, **kwargs)
    c = engine.generate(PASSAGES, "Capital?", seed=8, **kwargs)
    greedy = engine.generate(PASSAGES, "Capital?", max_new_tokens=12)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids  # another seed, another sample
    assert a.token_ids != greedy.token_ids  # sampling at temperature 1.5 is not greedy decoding


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    picks = {select_token(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert picks <= {0, 1} and len(picks) == 2
    picks = {select_token(logits, SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(100)}
    assert picks == {0}  # the first token alone already holds > 50% of the mass
    with pytest.raises(InvalidInputError):
        SamplingParams(top_p=0)


def test_stop_strings_cut_the_text(make_engine):
    engine = make_engine("llama")
    free = engine.generate(PASSAGES, "Capital?", max_new_tokens=24)
    assert len(free.text) > 4, "the tiny model must produce some text for this test to mean anything"
    stop = free.text[2:4]
    stopped = engine.generate(PASSAGES, "Capital?", max_new_tokens=24, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert stop not in stopped.text


def test_eos_stops_generation(make_engine, tokenizer):
    engine = make_engine("llama")
    free = engine.generate(PASSAGES, "Capital?", max_new_tokens=6)
    first = free.token_ids[0]
    engine.eos_ids = frozenset({first})
    try:
        g = engine.generate(PASSAGES, "Capital?", max_new_tokens=6)
    finally:
        engine.eos_ids = eos_ids(engine.model, engine.tokenizer)
    assert g.token_ids == () and g.finish_reason == "stop" and g.text == ""


@pytest.mark.parametrize("mode", ["block", "full"])
def test_stream_deltas_concatenate_to_the_text(make_engine, mode):
    engine = make_engine("qwen3")
    stream = engine.stream(PASSAGES, "Capital?", max_new_tokens=20, mode=mode)
    deltas = list(stream)
    result = stream.result
    assert "".join(deltas) == result.text
    assert result.text == engine.generate(PASSAGES, "Capital?", max_new_tokens=20, mode=mode).text
    assert len(result.text) > 0 and len(deltas) > 1, "the stream must deliver text in pieces"


def test_text_accumulator_holds_back_partial_characters_and_stop_prefixes(tokenizer):
    text = "né 🚀 END tail"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    acc = TextAccumulator(tokenizer, stop=["END"])
    deltas = [acc.add(t) for t in ids]
    deltas.append(acc.finish())
    assert acc.stopped and acc.text == "né 🚀 "
    assert "".join(deltas) == acc.text
    assert all("\ufffd" not in d for d in deltas)
    assert all("E" not in d for d in deltas)
    # Negative control: decoding token by token without the accumulator does split the emoji.
    pieces = [tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in p for p in pieces)


def test_a_stream_can_be_resumed_from_other_threads(make_engine):
    """Async frameworks pull a stream one item at a time from a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    engine = make_engine("llama")
    expected = engine.generate(PASSAGES, "Capital?", max_new_tokens=12).text
    stream = iter(engine.stream(PASSAGES, "Capital?", max_new_tokens=12))
    deltas = []
    with ThreadPoolExecutor(max_workers=3) as pool:
        while True:
            item = pool.submit(next, stream, None).result()
            if item is None:
                break
            deltas.append(item)
    assert "".join(deltas) == expected
