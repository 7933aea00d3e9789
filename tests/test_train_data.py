"""Training data: JSONL records, the paper's block splitting, and training ids == the engine's inference ids."""

import json
import subprocess
import sys

import pytest

from blockrag import Passage
from blockrag.testing import build_tokenizer
from blockrag.train.data import (
    MAX_BLOCKS,
    ChatRecord,
    DataError,
    RAGRecord,
    chat_blocks,
    load_jsonl,
    merge_smallest,
    parse_record,
    render,
    split_by_delimiter,
    write_jsonl,
)

PASSAGES = (
    Passage("Paris is the capital of France.", title="Paris"),
    Passage("The fox jumps over the lazy dog."),
    Passage("   "),  # empty: the engine skips it
    Passage("Les élèves étudient à l'école. 東京は日本の首都です。", title="Mixed"),
)
RAG = RAGRecord(passages=PASSAGES, question="What is the capital of France?", answer="Paris.",
                instruction="Answer from the passages.")
CHAT_MULTI = ChatRecord(messages=(
    ("system", "You are terse."),
    ("user", "Here is a list:\n\n- one\n- two\n\nAnd more text."),
    ("assistant", "Noted.\nAnything else?"),
    ("user", "Which item comes first?"),
    ("assistant", "One."),
))
CHAT_SINGLE = ChatRecord(messages=(("user", "Read this.\n\nThe fox jumps.\n\nWhat jumps?"), ("assistant", "The fox.")))


def test_jsonl_round_trip_of_rag_and_chat_records(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [RAG, CHAT_MULTI])
    records = load_jsonl(path)
    assert records == [RAG, CHAT_MULTI]


@pytest.mark.parametrize("line, message", [
    ("{not json", "expected one JSON object per line, found invalid JSON"),
    ('{"passages": [], "answer": "x"}', "expected a RAG record"),
    ('{"passages": [], "question": "q"}', "expected 'answer' to be a non-empty string, found None"),
    ('{"passages": [3], "question": "q", "answer": "a"}', "expected passages[0] to be a string or"),
    ('{"passages": "p", "question": "q", "answer": "a"}', "expected 'passages' to be a list, found str"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "at least 2 messages"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
     "end with a user then an assistant message"),
    ('{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "expected messages[0] to be"),
    ("[1, 2]", "expected a JSON object, found list"),
])
def test_malformed_lines_are_reported_with_their_line_number(tmp_path, line, message):
    good = json.dumps({"passages": ["p"], "question": "q", "answer": "a"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert "bad.jsonl:4: expected" in str(info.value) and message in str(info.value)


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="expected a JSONL file, found nothing at"):
        load_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="expected at least one record"):
        load_jsonl(tmp_path / "empty.jsonl")


# --- the paper's splitting rules -------------------------------------------------------------------


@pytest.mark.parametrize("text, chunks", [
    ("a\n\nb\n\nc", ["a\n\n", "b\n\n", "c"]),
    ("a\nb\n\nc", ["a\nb\n\n", "c"]),  # \n\n has priority over \n
    ("head\n---\nbody", ["head\n---\n", "body"]),
    ("head === body", ["head === ", "body"]),
    ("x\n\ty\n\tz", ["x\n\t", "y\n\t", "z"]),
    ("x\ny \n z", ["x\n", "y \n ", "z"]),
    ("no delimiter here", ["no delimiter here"]),
    ("\n\nleading and trailing\n\n", ["\n\nleading and trailing\n\n"]),
])
def test_split_by_delimiter_follows_the_priority_and_keeps_text(text, chunks):
    assert split_by_delimiter(text) == chunks
    assert "".join(split_by_delimiter(text)) == text  # nothing lost


def test_merge_smallest_merges_adjacent_smallest_pairs_until_the_limit():
    assert merge_smallest(["aaaa", "b", "c", "dddd"], 3) == ["aaaa", "bc", "dddd"]
    merged = merge_smallest([str(i) * (i + 1) for i in range(30)], 13)
    assert len(merged) == 13 and "".join(merged) == "".join(str(i) * (i + 1) for i in range(30))


def test_multi_turn_chat_keeps_the_last_user_message_whole_as_the_final_block():
    instruction, context, final, response = chat_blocks(CHAT_MULTI)
    assert instruction == "You are terse."
    assert final == "Which item comes first?" and response == "One."
    assert context == ["User: Here is a list:", "- one\n- two", "And more text.", "Assistant: Noted.",
                       "Anything else?"]


def test_single_turn_chat_splits_the_user_message_and_its_last_chunk_is_final():
    instruction, context, final, response = chat_blocks(CHAT_SINGLE)
    assert instruction is None
    assert context == ["Read this.", "The fox jumps."] and final == "What jumps?"


def test_long_conversations_are_merged_to_at_most_15_blocks(tokenizer):
    from blockrag.template import get_template

    user = "\n\n".join(f"paragraph {i} " + "x" * (i % 7) for i in range(40))
    record = ChatRecord(messages=(("user", user), ("assistant", "ok"), ("user", "q?"), ("assistant", "a")))
    sample = render(record, get_template("chat", tokenizer), tokenizer)
    assert len(sample.blocks) + 1 == MAX_BLOCKS  # block 0 + 13 chunks + the final block


# --- training ids == inference ids -----------------------------------------------------------------


def _engine_ids(engine, passages, question, instruction=None):
    result = engine.prefill(list(passages), question, instruction=instruction, mode="full")
    return [list(b.token_ids) for b in engine.prefill(list(passages), question, instruction=instruction).blocks], \
        list(result.final_ids), list(result.input_ids)


@pytest.mark.parametrize("template", ["chat", "tulu3-block"])
@pytest.mark.parametrize("bos", [True, False])
def test_rag_training_ids_equal_engine_ids(make_model, template, bos):
    from blockrag import BlockEngine

    tokenizer = build_tokenizer(bos=bos)
    engine = BlockEngine(make_model("llama"), tokenizer, template=template)
    sample = render(RAG, engine.template, tokenizer)
    blocks, final, input_ids = _engine_ids(engine, RAG.passages, RAG.question, RAG.instruction)
    assert [list(b) for b in sample.blocks] == blocks
    assert list(sample.final) == final and list(sample.prompt_ids) == input_ids
    assert len(sample.blocks) == 1 + 3  # block 0 + three non-empty passages
    # BOS only at the start of block 0, and only where the template and tokenizer use one.
    expects_bos = bos and template == "chat"
    assert (sample.blocks[0][0] == tokenizer.bos_token_id) == expects_bos
    assert all(tokenizer.bos_token_id not in block for block in sample.blocks[1:] + (sample.final,))
    assert sample.response == tuple(tokenizer("Paris.", add_special_tokens=False)["input_ids"]) + (
        tokenizer.eos_token_id,)


@pytest.mark.parametrize("record", [CHAT_MULTI, CHAT_SINGLE])
def test_chat_training_ids_equal_engine_ids(make_engine, record):
    engine = make_engine("llama")
    sample = render(record, engine.template, engine.tokenizer)
    instruction, context, final, _ = chat_blocks(record)
    blocks, final_ids, input_ids = _engine_ids(engine, [Passage(c) for c in context], final, instruction)
    assert [list(b) for b in sample.blocks] == blocks and list(sample.final) == final_ids
    assert list(sample.prompt_ids) == input_ids


def test_per_block_ids_differ_from_tokenizing_the_joined_prompt(tokenizer):
    """Negative control: re-tokenizing the joined string (what per-block rendering avoids) changes the ids."""
    from blockrag import BlockTemplate

    template = BlockTemplate(prefix="{instruction}", passage="{text}", final="{question}", instruction="The capit",
                             bos=False)
    record = RAGRecord(passages=(Passage("al of Fra"), Passage("nce embed")), question="dings?", answer="x")
    sample = render(record, template, tokenizer)
    joined = "The capital of France embeddings?"
    assert list(tokenizer(joined, add_special_tokens=False)["input_ids"]) != list(sample.prompt_ids)
    assert tokenizer.decode(sample.prompt_ids) == joined  # same text, different ids


def test_parse_record_names_the_source():
    with pytest.raises(DataError, match=r"^<record>: expected 'question'"):
        parse_record({"passages": [], "question": "", "answer": "a"})


def test_importing_blockrag_imports_neither_training_code_nor_peft():
    code = "import sys, blockrag; print(sorted(m for m in sys.modules if m.startswith(('peft', 'blockrag.train'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_batched_rendering_equals_rendering_one_record_at_a_time(make_engine):
    from blockrag.train.data import render_many

    engine = make_engine("llama")
    records = [RAG, CHAT_MULTI, CHAT_SINGLE, RAG]
    assert render_many(records, engine.template, engine.tokenizer) == [
        render(r, engine.template, engine.tokenizer) for r in records]
