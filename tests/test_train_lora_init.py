"""LoRA from a saved adapter (``LoraSettings.init``): the run starts at the saved weights, float16 exports load
into a float32 model's adapter, training continues from them, resuming works, and folders that are not such an
adapter are refused."""

import json

import pytest
import torch

from blockrag import Passage
from blockrag.errors import InvalidInputError
from blockrag.template import get_template
from blockrag.testing import tiny_model
from blockrag.train import LoraSettings, TrainConfig, Trainer
from blockrag.train.data import RAGRecord, render

LORA = LoraSettings(r=4, alpha=8)
PASSAGES = [Passage("Paris is the capital of France."), Passage("The quick brown fox jumps."),
            Passage("Rotary embeddings rotate keys by position."), Passage("Pupils study at school.")]
QA = [("What is the capital of France?", "Paris."), ("Who jumps?", "The fox."),
      ("What rotates keys?", "Rotary embeddings."), ("Where do pupils study?", "At school.")]


@pytest.fixture(scope="module")
def samples(tokenizer):
    template = get_template("chat", tokenizer)
    return [render(RAGRecord(passages=tuple(PASSAGES[i:] + PASSAGES[:i]), question=q, answer=a), template, tokenizer)
            for i, (q, a) in enumerate(QA)]


def _trainer(tokenizer, out, lora=LORA, **kwargs):
    settings = dict(output_dir=str(out), lr=1e-3, max_steps=2, batch_size=2, warmup_ratio=0.0, schedule="constant",
                    progress=False, log_every=1, lora=lora)
    settings.update(kwargs)
    model = tiny_model("llama", vocab_size=len(tokenizer)).train()
    return Trainer(model, tokenizer, TrainConfig(**settings))


def _adapter_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def saved(tokenizer, samples, tmp_path_factory):
    """(adapter directory, its weights by parameter name) after two LoRA steps from a fresh adapter."""
    path = tmp_path_factory.mktemp("lora_init")
    trainer = _trainer(tokenizer, path / "run")
    trainer.fit(samples, save_final=False)
    trainer.model.save_pretrained(str(path / "adapter"))
    return path / "adapter", _adapter_weights(trainer)


def test_init_starts_at_the_saved_weights(tokenizer, saved, tmp_path):
    folder, weights = saved
    loaded = _adapter_weights(_trainer(tokenizer, tmp_path / "a", lora=LoraSettings(r=4, alpha=8, init=str(folder))))
    assert loaded.keys() == weights.keys() and any("lora_B" in n for n in loaded)
    for name, p in loaded.items():
        assert torch.equal(p, weights[name]), name
    # Negative control: a fresh adapter starts with lora_B = 0, not at the saved weights.
    fresh = _adapter_weights(_trainer(tokenizer, tmp_path / "b"))
    b_names = [n for n in fresh if "lora_B" in n]
    assert b_names and all(not fresh[n].any() for n in b_names)
    assert all(weights[n].abs().max() > 1e-6 for n in b_names)


def test_a_float16_adapter_loads_into_the_float32_model(tokenizer, saved, tmp_path):
    """finetune_real.py ships adapters in float16; they train as float32 adapter weights."""
    from safetensors.torch import load_file, save_file

    folder, weights = saved
    half = tmp_path / "fp16"
    half.mkdir()
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v.to(torch.float16) for k, v in tensors.items()}, str(half / "adapter_model.safetensors"))
    (half / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    loaded = _adapter_weights(_trainer(tokenizer, tmp_path / "a", lora=LoraSettings(r=4, alpha=8, init=str(half))))
    for name, p in loaded.items():
        assert p.dtype == torch.float32, name
        torch.testing.assert_close(p, weights[name].to(torch.float16).float(), rtol=0, atol=0, msg=name)


def test_training_from_init_continues_and_resumes(tokenizer, samples, saved, tmp_path):
    folder, weights = saved
    lora = LoraSettings(r=4, alpha=8, init=str(folder))
    straight = _trainer(tokenizer, tmp_path / "out", lora=lora, max_steps=4, save_every=2)
    straight.fit(samples, save_final=False)
    after = _adapter_weights(straight)
    assert max((after[n] - weights[n]).abs().max().item() for n in weights) > 1e-5

    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000002"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["config"]["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear",
                                       "init": str(folder)}
    assert LoraSettings(**state["config"]["lora"]) == lora  # what the run started from round-trips
    resumed = _trainer(tokenizer, tmp_path / "out", lora=lora, max_steps=4)
    resumed.fit(samples, resume_from=checkpoint, save_final=False)
    assert resumed.step == 4
    for name, p in _adapter_weights(resumed).items():
        torch.testing.assert_close(p, after[name], atol=1e-6, rtol=0, msg=name)


def test_a_folder_without_adapter_config_is_refused(tokenizer, saved, tmp_path):
    folder, _ = saved
    (tmp_path / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    with pytest.raises(InvalidInputError, match=r"expected a peft adapter directory .* found no adapter_config.json"):
        _trainer(tokenizer, tmp_path / "out", lora=LoraSettings(r=4, alpha=8, init=str(tmp_path)))


@pytest.mark.parametrize(("r", "alpha", "found"), [(8, 8, "r=4"), (4, 16, "alpha=8")])
def test_a_different_rank_or_alpha_is_refused(tokenizer, saved, tmp_path, r, alpha, found):
    folder, _ = saved
    with pytest.raises(InvalidInputError, match=rf"expected .* r={r}, alpha={alpha} .* found .*{found}"):
        _trainer(tokenizer, tmp_path / "out", lora=LoraSettings(r=r, alpha=alpha, init=str(folder)))
