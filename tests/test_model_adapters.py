"""A short name registered as base + LoRA adapter (``blockrag.models.register(name, base=..., adapter=...)``)
loads with the merged weights equal to base + B @ A * alpha / r, computed here from the adapter file."""

from __future__ import annotations

import json

import pytest
import torch

from blockrag.models import ModelNotFoundError, load, names, register


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    base = load("tiny-random", device="cpu", dtype="float32").model
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():  # LoRA starts with B = 0 (no change): give B values, as training would
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(str(path))
    return path


def test_a_registered_adapter_loads_merged_into_its_base(adapter_dir):
    from safetensors.torch import load_file

    register("adapted-test", base="tiny-random", adapter=adapter_dir, description="test adapter", replace=True)
    assert "adapted-test" in names()
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    scale = config["lora_alpha"] / config["r"]
    base = dict(load("tiny-random", device="cpu", dtype="float32").model.named_parameters())
    tuned = dict(load("adapted-test", device="cpu", dtype="float32").model.named_parameters())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for key in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a = next(v for k, v in tensors.items() if k.endswith(f"{key}.lora_A.weight")).double()
        b = next(v for k, v in tensors.items() if k.endswith(f"{key}.lora_B.weight")).double()
        w0, w1 = base[f"{key}.weight"].detach().double(), tuned[f"{key}.weight"].detach().double()
        torch.testing.assert_close(w1, w0 + scale * (b @ a), rtol=1e-6, atol=1e-6)
        assert float((w1 - w0).norm() / w0.norm()) > 1e-3  # negative control: the adapter changed the weights
    assert torch.equal(base["model.layers.0.self_attn.k_proj.weight"], tuned["model.layers.0.self_attn.k_proj.weight"])


def test_an_adapter_folder_without_its_config_is_a_clear_error(tmp_path):
    register("adapted-broken-test", base="tiny-random", adapter=tmp_path, description="test adapter", replace=True)
    with pytest.raises(ModelNotFoundError, match="adapter_config.json"):
        load("adapted-broken-test", device="cpu")


def test_an_adapter_is_merged_in_float32_before_a_bfloat16_cast(adapter_dir):
    """In bfloat16 the merged weights are (float32 base + update) rounded once, not the update added to weights
    already rounded to bfloat16 (which loses part of a small update: the negative control)."""
    from safetensors.torch import load_file

    register("adapted-bf16-test", base="tiny-random", adapter=adapter_dir, description="test adapter", replace=True)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    scale = config["lora_alpha"] / config["r"]
    base = dict(load("tiny-random", device="cpu", dtype="float32").model.named_parameters())
    tuned = dict(load("adapted-bf16-test", device="cpu", dtype="bfloat16").model.named_parameters())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj"
    a = next(v for k, v in tensors.items() if k.endswith(f"{key}.lora_A.weight")).float()
    b = next(v for k, v in tensors.items() if k.endswith(f"{key}.lora_B.weight")).float()
    w0 = base[f"{key}.weight"].detach().float()
    got = tuned[f"{key}.weight"].detach()
    assert got.dtype == torch.bfloat16
    once = (w0 + scale * (b @ a)).to(torch.bfloat16)
    twice = (w0.to(torch.bfloat16) + (scale * (b @ a)).to(torch.bfloat16))
    assert torch.equal(got, once)
    assert not torch.equal(once, twice)


def test_an_adapter_folder_is_a_model_name_loaded_over_the_base_its_config_names(adapter_dir, tmp_path):
    """What transformers does for a PEFT folder: ``load(DIR)`` merges the adapter into the base named by
    ``base_model_name_or_path``, the same weights as a registered base + adapter name."""
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(adapter_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = "tiny-random"  # as finetune_real.py's export writes it
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    register("adapted-folder-test", base="tiny-random", adapter=adapter_dir, description="test adapter", replace=True)
    by_folder = load(str(folder), device="cpu", dtype="float32")
    assert by_folder.source.kind == "named" and "tiny-random" in by_folder.source.describe()
    by_name = dict(load("adapted-folder-test", device="cpu", dtype="float32").model.named_parameters())
    base = dict(load("tiny-random", device="cpu", dtype="float32").model.named_parameters())
    key = "model.layers.0.self_attn.q_proj.weight"
    folder_weights = dict(by_folder.model.named_parameters())
    assert torch.equal(folder_weights[key], by_name[key])
    assert not torch.equal(folder_weights[key], base[key])  # negative control: the adapter was merged


@pytest.mark.parametrize("config, match", [({"r": 4}, "base_model_name_or_path"),
                                           ({"base_model_name_or_path": "no-such-model-here"}, "unknown model"),
                                           (None, "unreadable")])
def test_an_adapter_folder_with_a_bad_base_is_a_clear_error_before_any_weights(tmp_path, config, match):
    text = "{not json" if config is None else json.dumps(config)
    (tmp_path / "adapter_config.json").write_text(text, encoding="utf-8")
    with pytest.raises(ModelNotFoundError, match=match):
        load(str(tmp_path), device="cpu")


def _peft_adapter(path, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = load("tiny-random", device="cpu", dtype="float32").model
    peft_model = get_peft_model(base, LoraConfig(**lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"],
         rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4})])
def test_the_merge_equals_peft_merge_and_unload(tmp_path, monkeypatch, lora):
    """blockrag merges without peft; peft's own merge_and_unload is the independent reference (rsLoRA scaling,
    per-module ranks and alphas included). peft is hidden while blockrag loads: it is not needed."""
    import sys

    from peft import PeftModel

    folder = _peft_adapter(tmp_path / "adapter", **lora)
    ids = torch.randint(0, 200, (1, 24))
    base = load("tiny-random", device="cpu", dtype="float32").model
    with torch.no_grad():
        before = base(input_ids=ids).logits
        expected = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()(input_ids=ids).logits
    register("adapted-peft-free-test", base="tiny-random", adapter=folder, description="test", replace=True)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with torch.no_grad():
        got = load("adapted-peft-free-test", device="cpu", dtype="float32").model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert float((got - before).abs().max()) > 1e-3  # negative control: the adapter changes the logits


def _rewrite(folder, config=None, tensors=None):
    from safetensors.torch import save_file

    if config is not None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **config}), encoding="utf-8")
    if tensors is not None:
        save_file(tensors, str(folder / "adapter_model.safetensors"))


def _bad_adapter(tmp_path, adapter_dir, case):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / case
    shutil.copytree(adapter_dir, folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    if case == "dora":
        _rewrite(folder, config={"use_dora": True})
    elif case == "bias":
        _rewrite(folder, config={"bias": "all"})
    elif case == "pickle":
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    elif case == "embedding":
        _rewrite(folder, tensors={**tensors, "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 9)})
    elif case == "missing_module":
        _rewrite(folder, tensors={**tensors, q.replace("layers.0", "layers.7") + ".lora_A.weight": torch.ones(4, 64),
                                  q.replace("layers.0", "layers.7") + ".lora_B.weight": torch.ones(64, 4)})
    elif case == "shape":
        _rewrite(folder, tensors={**tensors, q + ".lora_A.weight": torch.ones(4, 96)})
    return folder


@pytest.mark.parametrize("case, error, match", [
    ("dora", "UnsupportedModelError", "use_dora"), ("bias", "UnsupportedModelError", "bias"),
    ("pickle", "ModelNotFoundError", "pickle"), ("embedding", "UnsupportedModelError", "lora_embedding_A"),
    ("missing_module", "UnsupportedModelError", "does not have"), ("shape", "UnsupportedModelError", "shape")])
def test_an_adapter_a_plain_merge_cannot_load_is_a_clear_error(tmp_path, adapter_dir, case, error, match):
    import blockrag.models as models

    folder = _bad_adapter(tmp_path, adapter_dir, case)
    register(f"adapted-bad-{case}", base="tiny-random", adapter=folder, description="test", replace=True)
    with pytest.raises(getattr(models, error), match=match):
        load(f"adapted-bad-{case}", device="cpu")
