"""Trainer: full and LoRA steps reduce the loss, save -> load keeps the logits, resume continues exactly;
the ``finetune`` CLI trains from JSONL a model that BlockEngine serves in block mode."""

import json

import pytest
import torch

from blockrag import BlockEngine, Passage
from blockrag.testing import tiny_model
from blockrag.train import LoraSettings, TrainConfig, Trainer, load_template
from blockrag.train.collator import BlockCollator, CopyRatio
from blockrag.train.data import RAGRecord, render, write_jsonl
from blockrag.train.trainer import distill_loss, learning_rate, predicting_columns, response_loss

QUESTIONS = ["What is the capital of France?", "Who jumps?", "What rotates keys?", "Where do pupils study?"]
PASSAGES = [Passage("Paris is the capital of France.", title="Paris"), Passage("The quick brown fox jumps."),
            Passage("Rotary embeddings rotate keys by position."), Passage("Les élèves étudient à l'école.")]
ANSWERS = ["Paris.", "The fox.", "Rotary embeddings.", "At school."]


def _records():
    return [RAGRecord(passages=tuple(PASSAGES[i:] + PASSAGES[:i]), question=q, answer=a)
            for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]


def _model(tokenizer, seed=0):
    return tiny_model("llama", vocab_size=len(tokenizer), seed=seed).train()


def _samples(tokenizer, template="chat"):
    from blockrag.template import get_template

    t = get_template(template, tokenizer)
    return [render(r, t, tokenizer) for r in _records()], t


def _config(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path / "out"), lr=1e-3, max_steps=4, batch_size=2, warmup_ratio=0.0,
                schedule="constant", progress=False, log_every=1)
    base.update(kwargs)
    return TrainConfig(**base)


def _batch_loss(trainer, batch):
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.loss(batch)[0])


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8)])
def test_one_step_reduces_the_loss_on_a_fixed_batch(tokenizer, tmp_path, lora):
    samples, _ = _samples(tokenizer)
    trainer = Trainer(_model(tokenizer), tokenizer, _config(tmp_path, lora=lora, lr=3e-3))
    batch = BlockCollator.for_model(trainer.model, tokenizer, CopyRatio(1, 1))(samples)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    before = _batch_loss(trainer, batch)
    trainer.train_step([batch], lr=3e-3)
    after = _batch_loss(trainer, batch)
    assert after < before - 1e-3, (before, after)
    if lora is not None:
        assert frozen and all("lora_" not in n for n in frozen)  # the base weights were frozen ...
        for name, p in trainer.model.named_parameters():
            if name in frozen:
                assert torch.equal(p, frozen[name]), name  # ... and did not move


def test_block_and_full_copies_have_different_losses(tokenizer, tmp_path):
    """The block mask reaches the model: the same ids give another loss under the block mask."""
    samples, _ = _samples(tokenizer)
    trainer = Trainer(_model(tokenizer), tokenizer, _config(tmp_path))
    batch = BlockCollator.for_model(trainer.model, tokenizer, CopyRatio(1, 1))(samples)
    _, parts = trainer.loss(batch)
    assert abs(parts["block"] - parts["full"]) > 1e-3


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8)])
def test_save_then_load_gives_the_same_logits(tokenizer, tmp_path, lora):
    from transformers import AutoModelForCausalLM

    samples, template = _samples(tokenizer)
    trainer = Trainer(_model(tokenizer), tokenizer, _config(tmp_path, lora=lora, max_steps=2), template=template)
    trainer.fit(samples, save_final=False)
    batch = BlockCollator.for_model(trainer.model, tokenizer)(samples)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**inputs).logits
    out = trainer.save_final()
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "block_template.json" in files and "tokenizer.json" in files
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    if lora is not None:
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    with torch.no_grad():
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert load_template(out) == template
    # Negative control: the model before training gives other logits.
    with torch.no_grad():
        untrained = _model(tokenizer).eval()(**inputs).logits
    assert (untrained - expected).abs().max() > 1e-3


def test_resume_continues_exactly_where_the_checkpoint_left_off(tokenizer, tmp_path):
    samples, _ = _samples(tokenizer)
    straight = Trainer(_model(tokenizer), tokenizer, _config(tmp_path / "a", max_steps=4, schedule="cosine"))
    straight.fit(samples, save_final=False)

    first = Trainer(_model(tokenizer), tokenizer, _config(tmp_path / "b", max_steps=4, save_every=2,
                                                         schedule="cosine"))
    first.fit(samples, save_final=False)  # writes checkpoints/step-00000002
    resumed = Trainer(_model(tokenizer), tokenizer, _config(tmp_path / "b", max_steps=4, schedule="cosine"))
    resumed.fit(samples, resume_from=tmp_path / "b" / "out" / "checkpoints" / "step-00000002", save_final=False)
    assert resumed.step == 4
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)

    # Negative control: the same two steps from the checkpoint's weights with a fresh optimizer differ.
    fresh = Trainer(_model(tokenizer), tokenizer, _config(tmp_path / "c", max_steps=4, schedule="cosine"))
    fresh.load_checkpoint(tmp_path / "b" / "out")  # latest = step 4; take step 2's weights instead
    fresh.load_checkpoint(tmp_path / "b" / "out" / "checkpoints" / "step-00000002")
    fresh.optimizer = torch.optim.AdamW([p for p in fresh.model.parameters() if p.requires_grad], lr=1e-3)
    fresh.fit(samples, save_final=False)
    diff = max((p - q).abs().max().item() for p, q in zip(straight.model.parameters(), fresh.model.parameters()))
    assert diff > 1e-5


@pytest.mark.parametrize("objective", ["answer", "distill"])
def test_loss_on_kept_columns_equals_the_loss_on_every_position(tokenizer, tmp_path, objective):
    """The trainer computes logits only where the loss reads them; value and gradients equal the loss over a
    forward that keeps every position's logits (computed here independently)."""
    samples, _ = _samples(tokenizer)
    model = _model(tokenizer)
    trainer = Trainer(model, tokenizer, _config(tmp_path, objective=objective))
    batch = trainer.collator(samples)
    names = ("input_ids", "attention_mask", "position_ids")
    loss, _ = trainer.loss(batch)
    loss.backward()
    kept = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    logits = trainer.model(**{k: batch[k] for k in names}, use_cache=False).logits
    if objective == "answer":
        sums, counts = response_loss(logits, batch["labels"])
    else:
        teacher = trainer.teacher(**batch["teacher"], use_cache=False).logits
        sums, counts = distill_loss(logits, teacher, batch["tail_mask"], batch["teacher_row"])
    reference = sums.sum() / counts.sum()
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert kept and all(torch.allclose(kept[n], p.grad, rtol=1e-4, atol=1e-6)
                        for n, p in trainer.model.named_parameters() if n in kept)
    if objective == "answer":  # negative control: columns one position off read the wrong logits
        columns = predicting_columns(batch["labels"])
        off = logits.detach()[:, (columns + 1).clamp_max(logits.shape[1] - 1)]
        shifted, _ = response_loss(off, batch["labels"], columns)
        assert abs(float(shifted.sum() / counts.sum()) - reference.item()) > 1e-2


def test_learning_rate_schedule():
    config = TrainConfig(output_dir="x", lr=1.0, warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1)
    lrs = [learning_rate(s, 100, config) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


# --- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from blockrag.testing import build_tokenizer

    tokenizer = build_tokenizer()
    path = tmp_path_factory.mktemp("base")
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


def _write_data(path):
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Notes:\n\nThe fox jumps.\n\nWho jumps?"},
                         {"role": "assistant", "content": "The fox."}]}
    write_jsonl(path, _records())
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(chat) + "\n")


def _cli(argv):
    from blockrag.cli import main

    return main(argv)


@pytest.mark.parametrize("extra", [[], ["--lora", "--lora-r", "4", "--ratio", "2:1"]])
def test_finetune_cli_trains_a_model_the_engine_serves_in_block_mode(saved_model, tmp_path, extra, capsys):
    data = tmp_path / "train.jsonl"
    _write_data(data)
    out = tmp_path / "ft"
    code = _cli(["finetune", "--model", str(saved_model), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "3", "--batch-size", "2", "--lr", "1e-3", "--no-progress", "--device", "cpu",
                 "--save-every", "2", "--log-every", "1", *extra])
    assert code == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(e["loss"] > 0 for e in log)
    assert (out / "checkpoints" / "step-00000002" / "optimizer.safetensors").is_file()
    engine = BlockEngine.from_pretrained(str(out), device="cpu", template=load_template(out))
    generation = engine.generate(PASSAGES[:2], QUESTIONS[0], max_new_tokens=4)
    assert generation.prefill.mode == "block" and generation.usage.generated_tokens >= 0
    assert len(generation.prefill.blocks) == 3  # block 0 + two passages, served from the block cache

    # Resume from the latest checkpoint (step 2) up to step 4.
    code = _cli(["finetune", "--model", str(saved_model), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "4", "--batch-size", "2", "--lr", "1e-3", "--no-progress", "--device", "cpu",
                 "--resume", *extra])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "training.json").read_text())["steps"] == 4


def test_finetune_cli_distill_objective_logs_kl_near_zero_for_full_copies(saved_model, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, _records())
    out = tmp_path / "distill"
    code = _cli(["finetune", "--model", str(saved_model), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--lr", "1e-3", "--no-progress", "--device", "cpu",
                 "--log-every", "1", "--lora", "--lora-r", "4", "--objective", "distill"])
    assert code == 0, capsys.readouterr().err
    (entry,) = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # step 1 is computed before any update: the student's full copies are the teacher (KL 0), block copies are not
    assert entry["full_loss"] < 1e-5 < entry["block_loss"]
    assert json.loads((out / "training.json").read_text())["config"]["objective"] == "distill"


def test_finetune_cli_reports_a_bad_line_and_returns_2(saved_model, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"passages": ["p"], "question": "q", "answer": "a"}\n{"question": 1}\n', encoding="utf-8")
    code = _cli(["finetune", "--model", str(saved_model), "--data", str(data), "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert "bad.jsonl:2: expected 'question' to be a non-empty string, found 1" in capsys.readouterr().err


def test_finetune_cli_documents_every_option():
    import argparse

    from blockrag.train.cli import add_parser

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 20
    assert all(a.help and len(a.help) > 10 for a in options), [a.dest for a in options if not a.help]
