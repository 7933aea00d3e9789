"""Chat turns as cached blocks: segments cut from the chat template's own rendering, exact to the block mask."""

import copy

import pytest
import torch
from reference import reference_greedy, reference_logits

from blockrag import InvalidInputError
from blockrag.chat import ChatSession, chat_segments

MESSAGES = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Where is Paris?"},
    {"role": "assistant", "content": "In France."},
    {"role": "user", "content": "And Rome?"},
    {"role": "assistant", "content": "Italy."},
    {"role": "user", "content": "Which is further north?"},
]


def test_segments_are_the_templates_rendering_cut_at_finished_turns(tokenizer):
    segments = chat_segments(tokenizer, MESSAGES)
    assert "".join(s.text for s in segments) == tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                                                              add_generation_prompt=True)
    assert [s.cached for s in segments] == [True, True, True, False]
    assert "Where is Paris?" in segments[1].text and "In France." in segments[1].text
    assert segments[-1].text.endswith("assistant\n") and "further north" in segments[-1].text
    tool = [*MESSAGES[:3], {"role": "tool", "content": "weather: 12C"}]
    assert [s.cached for s in chat_segments(tokenizer, tool)] == [True, True, False]


def test_chat_segments_errors_are_typed(tokenizer):
    with pytest.raises(InvalidInputError, match="ending with a user"):
        chat_segments(tokenizer, MESSAGES[:3])
    with pytest.raises(InvalidInputError, match="role"):
        chat_segments(tokenizer, [{"role": "narrator", "content": "x"}])
    rewriting = copy.copy(tokenizer)
    rewriting.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InvalidInputError, match="rewriting earlier text"):
        chat_segments(rewriting, MESSAGES)
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    with pytest.raises(InvalidInputError, match="chat template"):
        chat_segments(plain, MESSAGES)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_chat_prompt_matches_the_block_masked_reference(arch, make_engine):
    engine = make_engine(arch)
    result = engine.prefill_segments(chat_segments(engine.tokenizer, MESSAGES))
    blocks = [list(b.token_ids) for b in result.blocks]
    expected = reference_logits(engine.model, blocks, result.final_ids)[-1]
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=0)
    full = engine.prefill_segments(chat_segments(engine.tokenizer, MESSAGES), mode="full")
    assert (full.logits - expected).abs().max() > 1e-3  # negative control: one causal prompt differs


def test_a_session_prefills_only_the_new_message_and_caches_finished_turns(make_engine):
    engine = make_engine("llama")
    session = ChatSession(engine, "Be terse.")
    cached = []
    for turn in range(5):
        question = f"Question {turn}: what is the capital of the country number {turn}?"
        live = session.segments(question)[-1]
        generation = session.ask(question, max_new_tokens=4)
        usage = generation.usage
        assert usage.prefilled_tokens == len(engine.prompts.segment_ids(live.text))
        assert usage.encoded_tokens == (len(generation.prefill.blocks[0].token_ids) if turn == 0 else 0)
        cached.append(usage.cached_tokens)
        blocks = [list(b.token_ids) for b in generation.prefill.blocks]
        expected = reference_greedy(engine.model, blocks, generation.prefill.final_ids, 4, engine.eos_ids)
        assert list(generation.token_ids) == expected
    assert cached == sorted(cached) and cached[-1] > cached[1] > 0  # the context grows, served from the store
    assert len(session.messages) == 1 + 2 * 5
    streamed = session.stream("One more?", max_new_tokens=3)
    text = "".join(streamed)
    assert session.messages[-1] == {"role": "assistant", "content": text}
