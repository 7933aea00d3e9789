"""BlockTemplate: exact preset strings, per-block tokenization, BOS only at the start of block 0."""

import pytest

from blockrag import BlockTemplate, InvalidInputError, Passage
from blockrag.template import TULU3_INSTRUCTION, get_template

TULU_BLOCK0 = (
    "<|user|>\nYou are an intelligent AI assistant. Please answer questions based on the user's instructions. "
    "Below are some reference documents that may help you in answering the user's question.\n\n"
)
TULU_FINAL = (
    "\n\nPlease write a high-quality answer for the given question using only the provided search documents "
    "(some of which might be irrelevant).\nQuestion: Who?\n<|assistant|>\n"
)


def test_tulu3_block_preset_reproduces_the_paper_format():
    t = get_template("tulu3-block")
    rendered = t.render([Passage("Body text.", title="A title")], "Who?")
    assert rendered.prefix == TULU_BLOCK0
    assert rendered.passages == ("- Title: A title\nBody text.\n",)
    assert rendered.final == TULU_FINAL
    assert t.instruction == TULU3_INSTRUCTION and t.bos is False


def test_tulu3_block_never_adds_bos(tokenizer):
    t = get_template("tulu3-block")
    ids = t.tokenize(tokenizer, t.render_prefix(), first=True)
    assert tokenizer.bos_token_id not in ids


def test_chat_preset_splits_the_chat_template_around_the_user_content(tokenizer):
    t = get_template("chat", tokenizer)
    rendered = t.render([Passage("P one."), Passage("P two.", title="T")], "Q?", instruction="Use the passages.")
    joined = rendered.prefix + "".join(rendered.passages) + rendered.final
    content = "Use the passages.\n\nP one.\n\nTitle: T\nP two.\n\nQuestion: Q?"
    expected = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    assert joined == expected
    assert rendered.prefix.startswith("<|im_start|>user\n")
    assert rendered.final.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_bos_only_at_the_start_of_block_zero(make_engine, tokenizer):
    engine = make_engine("llama")
    result = engine.prefill(["first passage", "second passage"], "question?")
    bos = tokenizer.bos_token_id
    assert result.blocks[0].token_ids[0] == bos
    assert result.input_ids.count(bos) == 1
    assert all(bos not in block.token_ids for block in result.blocks[1:])
    assert bos not in result.final_ids


def test_blocks_are_tokenized_separately_not_as_a_joined_string(make_engine, tokenizer):
    engine = make_engine("llama")
    passages = ["ab", "cd", "ef"]
    result = engine.prefill(passages, "gh?")
    for block, text in zip(result.blocks[1:], passages):
        assert list(block.token_ids) == tokenizer(engine.template.render_passage(text),
                                                  add_special_tokens=False)["input_ids"]


def test_tokenize_many_equals_tokenize_of_each(tokenizer):
    t = get_template("tulu3-block")
    texts = [t.render_passage(x) for x in ("Short.", "Les élèves à l'école. 東京 🚀", "  spaced  out  ", "x" * 300)]
    many = t.tokenize_many(tokenizer, texts)
    assert many == [t.tokenize(tokenizer, x) for x in texts]
    assert len(set(map(tuple, many))) == len(texts)  # control: different texts, different ids
    assert t.tokenize_many(tokenizer, []) == []


def test_custom_template_and_braces_in_text(tokenizer):
    t = BlockTemplate(prefix="SYS {instruction}|", passage="[{title}] {text}|", final="Q: {question} A:",
                      passage_untitled="{text}|", instruction="be brief")
    r = t.render([Passage("x {text} y"), Passage("z", title="{t}")], "why {question}?")
    assert r.prefix == "SYS be brief|"
    assert r.passages == ("x {text} y|", "[{t}] z|")
    assert r.final == "Q: why {question}? A:"
    assert t.version != get_template("tulu3-block").version


def test_placeholders_inside_passage_text_are_kept_as_written():
    """One pass over the pattern: a value that itself contains a placeholder is not substituted again."""
    t = BlockTemplate(prefix="{instruction}", passage="{title}: {text}", final="{question}", instruction="i")
    assert t.render_passage(Passage("Jinja uses {title} placeholders.", title="Paris")) == (
        "Paris: Jinja uses {title} placeholders.")
    assert t.render_passage(Passage("plain", title="about {text}")) == "about {text}: plain"
    assert t.render_final("what does {question} mean?") == "what does {question} mean?"


def test_template_errors_are_typed(tokenizer):
    with pytest.raises(InvalidInputError, match="question"):
        BlockTemplate(prefix="", passage="{text}", final="no placeholder")
    with pytest.raises(InvalidInputError, match="preset"):
        get_template("nope", tokenizer)
    from blockrag.testing import build_tokenizer
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(InvalidInputError, match="chat template"):
        get_template("chat", plain)
