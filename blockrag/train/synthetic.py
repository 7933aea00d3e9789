"""A synthetic RAG task, deterministic from a seed, to measure what block fine-tuning recovers.

Each example draws its facts afresh, so answers exist only in the passages (a model cannot memorise them).
Default style, "lookup": every entity of an example has one fact, three entities per passage::

    e5 rome . e17 e42 . e9 red .

Values come from closed vocabularies (cities, colours, jobs); about a third of the entities link to an entity
of another passage instead. Questions are single-hop (``one e5`` -> ``rome``) or 2-hop (``two e17`` ->
``e42 rome``: the bridge entity, then its fact, which sits in another passage). Every other passage is a
distractor. Style "triples" (the first design; small models did not learn it, see the README) lists all facts
of one entity per passage, ``e17 city paris . e17 friend e42 .``, asked as ``e17 city =`` / ``e17 friend city =``.

The signal is dense: the final block asks one question and the response answers it, then asks and answers
``questions - 1`` more (``rome ; two e17 e42 rome ; one e9 red ;``), all in the final segment, which attends to
every passage in both modes; training puts the loss on the answers only (``SyntheticDataset(answers_only=True)``).
The first answer is exactly what ``BlockEngine.generate`` (with ``stop=[";"]``) answers; accuracy counts a
question right when every answer token and the closing ``;`` are the argmax given the gold prefix, which is the
same as greedy generation reproducing the answer.

Examples are RAG records rendered with a word-level tokenizer (built with ``tokenizers``) and a
:class:`~blockrag.template.BlockTemplate`, exactly as the engine renders prompts.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from blockrag.hf import attention_implementation
from blockrag.template import BlockTemplate, Passage
from blockrag.train.collator import BlockCollator, CopyMode
from blockrag.train.data import RAGRecord, Sample, render, render_many

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "city": ("paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "dakar", "hanoi", "perth",
             "minsk", "sofia", "riga", "bern", "accra"),
    "color": ("red", "blue", "green", "black", "white", "amber", "violet", "teal", "ochre", "grey", "pink",
              "olive"),
    "job": ("baker", "pilot", "nurse", "miner", "judge", "tailor", "farmer", "poet", "chef", "guard", "clerk",
            "diver"),
}
RELATION = "friend"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
MARKERS = ("context", ":", "query", "=", ";", ".", "one", "two")
STYLES = ("lookup", "triples")
TASK_FILE = "synthetic_task.json"


@dataclass(frozen=True)
class TaskConfig:
    """Shape of the task.

    Attributes:
        entities: size of the entity name pool (e0, e1, ...).
        passages: passages per example (one entity each).
        questions: questions per example (the first in the final block, the rest in the response).
        two_hop: probability that a question is 2-hop (needs two passages).
        seed: the task's seed; splits and example indices derive their own streams from it.
        style: "lookup" (default): every entity has one fact, ``e5 rome .`` or a link ``e17 e42 .``, three
            entities per passage; questions ``one e5`` -> ``rome`` and ``two e17`` -> ``e42 rome``.
            "triples": every passage lists all facts of one entity as ``e17 city paris .``; questions
            ``e17 city`` -> ``paris`` and ``e17 friend city`` -> ``e42 rome``.
        facts_per_passage: entities (facts) per passage, "lookup" style.
    """

    entities: int = 64
    passages: int = 8
    questions: int = 8
    two_hop: float = 0.5
    seed: int = 0
    style: str = "lookup"
    facts_per_passage: int = 3

    def save(self, directory: str | Path) -> None:
        (Path(directory) / TASK_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> TaskConfig:
        return cls(**json.loads((Path(directory) / TASK_FILE).read_text(encoding="utf-8")))


@dataclass(frozen=True)
class Question:
    text: str  # e.g. "e17 friend city"
    answer: str  # e.g. "e42 rome"
    hops: int


@dataclass(frozen=True)
class Example:
    passages: tuple[str, ...]
    questions: tuple[Question, ...]

    def record(self) -> RAGRecord:
        """As a RAG record: the first question in the final block, the answer plus the further QA pairs."""
        first, *rest = self.questions
        answer = " ; ".join([first.answer] + [f"{q.text} {q.answer}" for q in rest]) + " ;"
        return RAGRecord(passages=tuple(Passage(p) for p in self.passages), question=first.text, answer=answer)


@dataclass(frozen=True)
class EvalItem:
    """A rendered example and, per question, the response span to check: (start, end, hops)."""

    sample: Sample
    spans: tuple[tuple[int, int, int], ...]


def entity_names(count: int) -> list[str]:
    return [f"e{i}" for i in range(count)]


def vocabulary(config: TaskConfig) -> list[str]:
    words = list(SPECIALS) + list(MARKERS) + [RELATION] + list(ATTRIBUTES)
    words += [v for values in ATTRIBUTES.values() for v in values] + entity_names(config.entities)
    assert len(set(words)) == len(words), "vocabulary words must be distinct"
    return words


def build_tokenizer(config: TaskConfig):
    """Word-level tokenizer (whitespace split) with <s> added at the start, like Llama tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(config))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def template() -> BlockTemplate:
    """Block 0 'context :', passages as they are, final block 'query {question}'; BOS on block 0."""
    return BlockTemplate(prefix="{instruction}", passage="{text}", final="query {question}",
                         instruction="context :", bos=True, name="synthetic")


class SyntheticTask:
    """Deterministic examples: ``example(split, index)`` depends only on the config, split and index."""

    SPLITS = ("train", "heldout")

    def __init__(self, config: TaskConfig = TaskConfig()) -> None:
        per_passage = config.facts_per_passage if config.style == "lookup" else 1
        if (config.passages < 2 or config.entities < config.passages * per_passage or config.questions < 1
                or config.style not in STYLES):
            raise ValueError(f"expected passages >= 2, entities >= passages x facts per passage, questions >= 1 "
                             f"and a style in {STYLES}, found {config}")
        self.config = config
        self.names = entity_names(config.entities)

    def example(self, split: str, index: int, passages: int | None = None) -> Example:
        if split not in self.SPLITS:
            raise ValueError(f"expected a split in {self.SPLITS}, found {split!r}")
        rng = random.Random(f"{self.config.seed}:{split}:{index}")
        count = passages if passages is not None else self.config.passages
        if self.config.style == "lookup":
            return self._lookup(rng, count)
        people = rng.sample(self.names, count)
        facts = {p: {a: rng.choice(values) for a, values in ATTRIBUTES.items()} for p in people}
        for p in people:
            facts[p][RELATION] = rng.choice([q for q in people if q != p]) if count > 1 else p
        texts = []
        for p in people:
            keys = list(facts[p]) if count > 1 else list(ATTRIBUTES)
            rng.shuffle(keys)
            texts.append(" ".join(f"{p} {k} {facts[p][k]} ." for k in keys))
        questions = []
        for _ in range(self.config.questions):
            p = rng.choice(people)
            if count > 1 and rng.random() < self.config.two_hop:
                attribute = rng.choice(list(ATTRIBUTES))
                bridge = facts[p][RELATION]
                text = f"{p} {RELATION} {attribute} ="
                questions.append(Question(text, f"{bridge} {facts[bridge][attribute]}", 2))
            else:
                attribute = rng.choice(list(facts[p]) if count > 1 else list(ATTRIBUTES))
                questions.append(Question(f"{p} {attribute} =", facts[p][attribute], 1))
        return Example(passages=tuple(texts), questions=tuple(questions))

    def _lookup(self, rng: random.Random, count: int) -> Example:
        """One fact per entity; about a third of the entities link to an entity of another passage."""
        per = self.config.facts_per_passage
        names = rng.sample(self.names, count * per)
        passage_of = {name: i // per for i, name in enumerate(names)}
        links = {n for n in names if count > 1 and rng.random() < 1 / 3}
        values = [n for n in names if n not in links]
        if not values:  # NOTE: a link needs an entity with a value to point at.
            links.discard(names[0])
            values = [names[0]]
        fact = {}
        for n in values:
            fact[n] = rng.choice(ATTRIBUTES[rng.choice(list(ATTRIBUTES))])
        for n in sorted(links, key=names.index):
            targets = [v for v in values if passage_of[v] != passage_of[n]]
            if targets:
                fact[n] = rng.choice(targets)
            else:
                links.discard(n)
                fact[n] = rng.choice(ATTRIBUTES[rng.choice(list(ATTRIBUTES))])
        texts = []
        for i in range(count):
            group = names[i * per : (i + 1) * per]
            rng.shuffle(group)
            texts.append(" ".join(f"{n} {fact[n]} ." for n in group))
        questions = []
        linked = sorted(links, key=names.index)
        for _ in range(self.config.questions):
            if linked and rng.random() < self.config.two_hop:
                n = rng.choice(linked)
                questions.append(Question(f"two {n}", f"{fact[n]} {fact[fact[n]]}", 2))
            else:
                n = rng.choice(names)
                questions.append(Question(f"one {n}", fact[n], 1))
        return Example(passages=tuple(texts), questions=tuple(questions))

    def eval_item(self, example: Example, tokenizer, block_template: BlockTemplate) -> EvalItem:
        sample = render(example.record(), block_template, tokenizer)
        assert len(sample.response) == len(example.record().answer.split()) + 1, "one token per word, then EOS"
        return EvalItem(sample, answer_spans(example))

    def eval_items(self, count: int, tokenizer, block_template: BlockTemplate, split: str = "heldout",
                   passages: int | None = None) -> list[EvalItem]:
        return [self.eval_item(self.example(split, i, passages), tokenizer, block_template) for i in range(count)]


def answer_spans(example: Example) -> tuple[tuple[int, int, int], ...]:
    """(start, end, hops) of each answer and its ';' in the response, counted in words (= tokens)."""
    spans, position = [], 0
    for i, q in enumerate(example.questions):
        if i > 0:
            position += len(q.text.split())
        length = len(q.answer.split()) + 1
        spans.append((position, position + length, q.hops))
        position += length
    return tuple(spans)


def answer_mask(example: Example, length: int) -> tuple[bool, ...]:
    """Loss flags of a response of ``length`` ids: the answers, their ';' and the final EOS."""
    mask = [False] * length
    for start, end, _ in answer_spans(example):
        mask[start:end] = [True] * (end - start)
    mask[-1] = True
    return tuple(mask)


@dataclass(frozen=True)
class Curriculum:
    """Passages per training example by training progress: stages of (start fraction, max passages).

    An example at fraction f of training uses between ceil(m/2) and m passages, m being the stage's maximum.
    """

    stages: tuple[tuple[float, int], ...] = ((0.0, 1), (0.05, 2), (0.15, 4), (0.3, 8))

    def passages(self, fraction: float, rng: random.Random, limit: int) -> int:
        most = 1
        for start, m in self.stages:
            if fraction >= start:
                most = m
        most = min(most, limit)
        return rng.randint((most + 1) // 2, most)


class SyntheticDataset(torch.utils.data.Dataset):
    """``size`` training samples of the task, index order = training order (for the curriculum).

    With ``answers_only`` the loss covers the answers and their ';' only, not the further questions in the
    response (those are random draws: unpredictable, pure gradient noise).
    """

    def __init__(self, task: SyntheticTask, tokenizer, block_template: BlockTemplate, size: int, *,
                 split: str = "train", curriculum: Curriculum | None = None, offset: int = 0,
                 answers_only: bool = True) -> None:
        self.task, self.tokenizer, self.template = task, tokenizer, block_template
        self.size, self.split, self.curriculum, self.offset = size, split, curriculum, offset
        self.answers_only = answers_only

    def __len__(self) -> int:
        return self.size

    def example(self, index: int) -> Example:
        passages = None
        if self.curriculum is not None:
            rng = random.Random(f"curriculum:{self.task.config.seed}:{index}")
            passages = self.curriculum.passages(index / self.size, rng, self.task.config.passages)
        return self.task.example(self.split, self.offset + index, passages)

    def __getitem__(self, index: int) -> Sample:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """A whole batch at once (the DataLoader uses this): one batched tokenizer call."""
        examples = [self.example(i) for i in indices]
        samples = render_many([e.record() for e in examples], self.template, self.tokenizer)
        if not self.answers_only:
            return samples
        return [dataclasses.replace(s, loss_mask=answer_mask(e, len(s.response))) for e, s in zip(examples, samples)]


def llama_config(vocab_size: int, hidden: int = 256, layers: int = 4, heads: int = 4, max_positions: int = 512,
                 bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0):
    """A small Llama config for training from scratch on the task."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=False, bos_token_id=bos_token_id,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def new_model(tokenizer, hidden: int = 256, layers: int = 4, heads: int = 4, seed: int = 0,
              attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = llama_config(len(tokenizer), hidden, layers, heads, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


@torch.no_grad()
def evaluate(model: nn.Module, items: Sequence[EvalItem], mode: CopyMode, *, pad_token_id: int,
             batch_size: int = 64, bf16: bool = False) -> dict[str, float]:
    """Exact-match accuracy of every question, by one masked forward per batch (teacher forcing).

    A question counts as right when the argmax at each of its answer tokens and its closing ';' is the gold
    token; that is exactly when greedy decoding would reproduce the answer. ``mode`` selects the attention
    (block / full / block without position re-encoding), as in training.

    Returns:
        accuracy over all questions, by hops ("1hop", "2hop"), on the first (final-block) question ("first"),
        and the counts ("n", "n_1hop", "n_2hop").
    """
    was_training = model.training
    model.eval()
    backend = attention_implementation(model) or "sdpa"
    collator = BlockCollator(pad_token_id, backend, dtype=next(model.parameters()).dtype)
    device = next(model.parameters()).device
    right = {1: 0, 2: 0}
    total = {1: 0, 2: 0}
    first_right = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = collator.copies([it.sample for it in chunk], mode)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**inputs, use_cache=False).logits
        predicted = logits.argmax(-1).cpu()
        for row, item in enumerate(chunk):
            offset = len(item.sample.prompt_ids)
            gold = torch.tensor(item.sample.response)
            # NOTE: the token at sequence position p is predicted by the logits at p - 1.
            guess = predicted[row, offset - 1 : offset - 1 + len(gold)]
            for q, (a, b, hops) in enumerate(item.spans):
                ok = bool(torch.equal(guess[a:b], gold[a:b]))
                right[hops] += ok
                total[hops] += 1
                if q == 0:
                    first_right += ok
    model.train(was_training)
    n = total[1] + total[2]
    return {
        "accuracy": 100.0 * (right[1] + right[2]) / max(1, n),
        "1hop": 100.0 * right[1] / max(1, total[1]),
        "2hop": 100.0 * right[2] / max(1, total[2]),
        "first": 100.0 * first_right / max(1, len(items)),
        "n": n,
        "n_1hop": total[1],
        "n_2hop": total[2],
    }
