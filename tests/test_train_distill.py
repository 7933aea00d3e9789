"""The label-free objective: block copies distilled towards the frozen model's full-attention distributions."""

import pytest
import torch

from blockrag.errors import InvalidInputError
from blockrag.template import Passage, get_template
from blockrag.testing import tiny_model
from blockrag.train import LoraSettings, TrainConfig, Trainer
from blockrag.train.collator import BlockCollator, CopyRatio, make_copy
from blockrag.train.data import RAGRecord, render
from blockrag.train.trainer import distill_loss

PASSAGES = [Passage("Paris is the capital of France.", title="Paris"), Passage("The quick brown fox jumps."),
            Passage("Rotary embeddings rotate keys by position."), Passage("Les élèves étudient à l'école.")]
QUESTIONS = ["What is the capital of France?", "Who jumps?", "What rotates keys?", "Where do pupils study?"]


def _samples(tokenizer):
    template = get_template("chat", tokenizer)
    return [render(RAGRecord(passages=tuple(PASSAGES[i:] + PASSAGES[:i]), question=q, answer="An answer."),
                   template, tokenizer) for i, q in enumerate(QUESTIONS)]


def test_distill_loss_equals_an_explicit_kl_and_is_zero_only_for_equal_logits():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 7, 11), torch.randn(2, 7, 11)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[0, 3:], mask[1, 5:], mask[2, 2:6], mask[3, 6] = True, True, True, True
    rows = torch.tensor([0, 0, 1, 1])
    sums, counts = distill_loss(student, teacher, mask, rows)
    for r in range(4):
        expected = 0.0
        for c in range(7):
            if mask[r, c]:
                p = torch.softmax(teacher[rows[r], c].double(), -1)
                q = torch.softmax(student[r, c].double(), -1)
                expected += float((p * (p / q).log()).sum())
        assert float(sums[r]) == pytest.approx(expected, rel=1e-5)
        assert int(counts[r]) == int(mask[r].sum())
    # negative control: a student equal to its teacher scores 0; a different one does not
    same, _ = distill_loss(teacher[rows], teacher, mask, rows)
    assert same.abs().max() < 1e-5
    assert sums.min() > 1e-3


def test_collator_tail_mask_covers_the_final_block_and_response(tokenizer):
    sample = _samples(tokenizer)[0]
    batch = BlockCollator(0, teacher=True)([sample])
    tail = len(sample.final) + len(sample.response)
    n = make_copy(sample).input_ids.numel()
    assert batch["tail_mask"][0].nonzero().flatten().tolist() == list(range(n - tail, n))
    assert batch["teacher_row"].tolist() == [0, 0]
    assert torch.equal(batch["teacher"]["input_ids"][0], batch["input_ids"][0])
    assert torch.equal(batch["teacher"]["attention_mask"][0], batch["attention_mask"][1])  # the full copy


@pytest.mark.slow  # 5-6 minutes each on the shared 2-core machine: run by make test-slow / test-all (and CI)
@pytest.mark.parametrize("lora", [LoraSettings(r=4, alpha=8), None])
def test_distillation_starts_at_zero_for_full_copies_and_shrinks_the_block_gap(tokenizer, tmp_path, lora):
    samples = _samples(tokenizer)
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=1).train()
    config = TrainConfig(output_dir=str(tmp_path / "out"), lr=3e-3, max_steps=30, batch_size=4, warmup_ratio=0.0,
                         schedule="constant", progress=False, log_every=1, objective="distill", lora=lora)
    trainer = Trainer(model, tokenizer, config)
    batch = BlockCollator.for_model(trainer.model, tokenizer, CopyRatio(1, 1), teacher=True)(samples)
    trainer.model.eval()
    with torch.no_grad():
        _, before = trainer.loss(batch)
    assert before["full"] < 1e-5  # the student is the teacher before the first step
    assert before["block"] > 1e-3  # ... but block attention changes its predictions
    result = trainer.fit(samples, save_final=False)
    trainer.model.eval()
    with torch.no_grad():
        _, after = trainer.loss(batch)
    assert after["block"] < 0.5 * before["block"], (before, after)
    assert result.logs[-1].block_loss < result.logs[0].block_loss


def test_unknown_objective_is_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="objective"):
        TrainConfig(output_dir=str(tmp_path), objective="reinforce")
