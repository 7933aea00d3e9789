"""CI-size run of the block fine-tuning experiment, from a checkpoint trained once on a GPU with this code.

tests/data/synthetic_lookup: a 2-layer Llama (d=128, 0.56M parameters) trained from scratch with full attention
on the synthetic task ("lookup" style, 8 passages, seed 0) by ``benchmarks/finetune_synthetic.py --preset gpu
--style lookup --hidden 128 --layers 2 --heads 4 --pretrain-lr 3e-3`` on an H100 (2553 steps of 256 examples).
Measured on held-out data: 100.0 full mode, 71.3 block mode before block fine-tuning (see README).
"""

import dataclasses
from pathlib import Path

import pytest

from blockrag import BlockEngine
from blockrag.train import TrainConfig, Trainer
from blockrag.train.collator import CopyRatio
from blockrag.train.synthetic import SyntheticDataset, SyntheticTask, TaskConfig, evaluate, template

CHECKPOINT = Path(__file__).parent / "data" / "synthetic_lookup"
EVAL_EXAMPLES = 200  # x 16 questions
FT_STEPS, FT_BATCH, FT_LR, SEED = 40, 16, 5e-4, 0


# NOTE: minutes on 2 CPU cores (trains for 40 steps): run by `make test-all` / `make test-slow` (CI runs it).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    task = SyntheticTask(TaskConfig.load(CHECKPOINT))
    items = task.eval_items(EVAL_EXAMPLES, tokenizer, template())
    return tokenizer, task, items


def _load(attn="eager"):
    from transformers import AutoModelForCausalLM

    # NOTE: eager attention trains faster than sdpa with a 4D mask on CPU; both take the collator's mask.
    return AutoModelForCausalLM.from_pretrained(CHECKPOINT, attn_implementation=attn)


def _finetune(model, tokenizer, task, ratio, out):
    config = TrainConfig(output_dir=str(out), lr=FT_LR, max_steps=FT_STEPS, batch_size=FT_BATCH, ratio=ratio,
                         warmup_ratio=0.05, min_lr_ratio=0.1, shuffle=False, seed=SEED, progress=False)
    data = SyntheticDataset(task, tokenizer, template(), FT_STEPS * FT_BATCH, offset=10_000_000)
    Trainer(model, tokenizer, config).fit(data, save_final=False)


def _accuracy(model, items, tokenizer, modes=("full", "block")):
    return {m: evaluate(model, items, m, pad_token_id=tokenizer.pad_token_id)["accuracy"] for m in modes}


def test_block_finetuning_recovers_block_mode_and_keeps_full_mode(setup, tmp_path):
    tokenizer, task, items = setup
    model = _load()
    before = _accuracy(model, items, tokenizer)
    # The pretrained model solves the task with full attention, and block mode drops (measured: 100.0 / 72.0).
    assert before["full"] >= 99.0, before
    assert before["block"] <= before["full"] - 15, before

    _finetune(model, tokenizer, task, CopyRatio(1, 1), tmp_path / "block")
    after = _accuracy(model, items, tokenizer, ("full", "block", "block_no_pos"))
    # Measured: block 99.84, full 99.91, block w/o position re-encoding 98.5.
    assert after["block"] >= before["full"] - 2.0, (before, after)
    assert after["full"] >= before["full"] - 0.5, (before, after)

    # Negative control: the same steps with full-attention copies only do not recover block mode.
    control = _load()
    _finetune(control, tokenizer, task, CopyRatio(0, 1), tmp_path / "full")
    controlled = _accuracy(control, items, tokenizer)
    assert controlled["full"] >= 99.0 and controlled["block"] <= before["full"] - 15, controlled  # 99.75 / 73.3


def test_teacher_forced_scoring_equals_engine_generation(setup):
    """Per example, the batched masked-forward score of the first question == BlockEngine.generate's answer."""
    tokenizer, task, items = setup
    model = _load(attn="sdpa").eval()
    engine = BlockEngine(model, tokenizer, template=template())
    outcomes = {"block": [], "full": []}
    for index in range(30):
        example = task.example("heldout", index)
        question = example.questions[0]
        item = dataclasses.replace(items[index], spans=items[index].spans[:1])
        for mode in outcomes:
            scored = evaluate(model, [item], mode, pad_token_id=tokenizer.pad_token_id)["accuracy"] == 100.0
            generated = engine.generate(list(example.passages), question.text, mode=mode, max_new_tokens=4,
                                        stop=[";"]).text.strip() == question.answer
            assert scored == generated, (index, mode)
            outcomes[mode].append(generated)
    # Both outcomes occur in block mode (the pretrained model is wrong there about 28% of the time).
    assert any(outcomes["block"]) and not all(outcomes["block"]) and all(outcomes["full"])
