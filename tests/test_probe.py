"""The construction-time RoPE probe (``blockrag.rope.reencoding_error``) on tiny random models, in every dtype.

The probe tests each decoder layer on its own (the second pass feeds every layer the hidden states it received
in the first), so 16-bit rounding does not accumulate over layers. Each broken model below is refused by the
check that should see it: keys (the rotation ``rotate_keys`` applies), a layer's output (the layer must see
position only relatively) or the embedding (no absolute position before the first layer).
"""

from __future__ import annotations

import dataclasses
import re
import threading

import pytest
import torch
from conftest import SUPPORTED_ARCHS

from blockrag import BlockEngine, UnsupportedModelError
from blockrag.hf import decoder_layers, forward, layer_inputs
from blockrag.rope import PROBE_TOLERANCE, reencoding_error, rope_spec, rotate_keys

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_layer_inputs_records_and_feeds_every_layer(make_model, tokenizer):
    model = make_model("llama")
    first, second = (torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:6]])
                     for text in ("The quick brown fox jumps.", "Rotary embeddings rotate keys."))
    with torch.inference_mode():
        with layer_inputs(model) as recorded:
            expected, _ = forward(model, first)
        assert len(recorded) == model.config.num_hidden_layers and recorded[0].shape == (1, 6, 64)
        # Every layer fed the first prompt's inputs: the second prompt's ids no longer matter.
        with layer_inputs(model, feed=recorded) as arrived:
            fed, _ = forward(model, second)
        plain, _ = forward(model, second)  # the hooks are gone
    torch.testing.assert_close(fed, expected, atol=0, rtol=0)
    assert not torch.equal(arrived[0], recorded[0]) and (plain - expected).abs().max() > 1e-2


def test_decoder_layers_are_found_under_other_names(make_model):
    gpt2 = make_model("gpt2")  # GPT2Model keeps them as ``h``
    assert decoder_layers(gpt2) is gpt2.transformer.h and decoder_layers(make_model("qwen2")) is make_model(
        "qwen2").model.layers


def test_layer_inputs_leaves_other_threads_alone(make_model):
    """A model serving on another thread while an engine over it is being constructed is not fed the probe's states."""
    model = make_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        expected, _ = forward(model, ids)
        with layer_inputs(model, feed=[torch.zeros(1, 4, 64)] * 2) as recorded:
            outputs = []
            worker = threading.Thread(target=lambda: outputs.append(forward(model, ids)[0]))
            worker.start()
            worker.join()
    assert recorded == [] and torch.equal(outputs[0], expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_supported_models_pass_the_probe_in_every_dtype(arch, dtype, make_model):
    model = make_model(arch, dtype)
    error = reencoding_error(model, rope_spec(model))
    assert error.error <= PROBE_TOLERANCE[dtype] / 2, error  # measured worst: 3.2e-7, 8.2e-4 fp16, 6.1e-3 bf16


def _refusal(model, spec=None) -> str:
    """The probe's refusal message at engine construction (fails the test if the model is accepted)."""
    from blockrag.rope import verify_reencoding

    with pytest.raises(UnsupportedModelError, match="cannot be re-encoded") as refused:
        verify_reencoding(model, spec or rope_spec(model))
    return str(refused.value)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_probe_refuses_frequencies_other_than_the_models(dtype, make_model):
    """Keys re-encoded with inverse frequencies 5% off what the model rotates with (measured error 0.44-0.54)."""
    model = make_model("llama", dtype)
    spec = rope_spec(model)
    message = _refusal(model, dataclasses.replace(spec, inv_freq=spec.inv_freq * 1.05))
    assert "keys" in message and str(dtype).removeprefix("torch.") in message


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_probe_refuses_yarn_scaling_applied_a_second_time(dtype, make_model, monkeypatch):
    """Cached yarn keys carry attention_scaling already; scaling them again when moving them is off by 14%."""
    import blockrag.rope as rope_module

    model = make_model("yarn", dtype)
    spec = rope_spec(model)
    monkeypatch.setattr(rope_module, "rotate_keys",
                        lambda keys, delta, inv_freq: rotate_keys(keys, delta, inv_freq) * spec.attention_scaling)
    assert "keys" in _refusal(model)


def interleaved_rope(q, k, cos, sin, unsqueeze_dim=1):
    """GPT-J style rotary: pairs (x0, x1), (x2, x3), ... instead of rotate_half's (x_i, x_{i + D/2})."""
    half = cos.shape[-1] // 2
    cos = cos[..., :half].repeat_interleave(2, dim=-1).unsqueeze(unsqueeze_dim)
    sin = sin[..., :half].repeat_interleave(2, dim=-1).unsqueeze(unsqueeze_dim)

    def rotate_pairs(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    return q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin


def _queries_at_twice_the_angle(q, k, cos, sin, unsqueeze_dim=1):
    """Queries rotated by 2p, keys by p: attention then depends on absolute position, keys rotate correctly."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    cos2, sin2 = cos * cos - sin * sin, 2 * sin * cos

    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    return q * cos2 + rotate_half(q) * sin2, k * cos + rotate_half(k) * sin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope,where", [(interleaved_rope, "keys"), (_queries_at_twice_the_angle, "output")],
                         ids=["interleaved", "queries-at-2p"])
def test_the_probe_refuses_a_model_whose_rotary_is_not_rotate_half(rope, where, dtype, make_model, monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", rope)
    message = _refusal(make_model("llama", dtype))
    assert re.search(rf"at layer \d+ {where}", message), message


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_probe_refuses_absolute_positions_before_the_first_layer(dtype, make_model):
    model = make_model("llama", dtype)

    def add_absolute_positions(module, args, kwargs):  # what a learned position embedding would add
        hidden = args[0] + 0.1 * torch.sin(kwargs["position_ids"][..., None].to(args[0].dtype))
        return (hidden, *args[1:]), kwargs

    handle = model.base_model.layers[0].register_forward_pre_hook(add_absolute_positions, with_kwargs=True)
    try:
        assert "at the embedding" in _refusal(model)
    finally:
        handle.remove()


def _smollm3_with_a_nope_layer(tokenizer, dtype):
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    config = SmolLM3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           no_rope_layer_interval=4, use_sliding_window=False, sliding_window=None,
                           pad_token_id=None, bos_token_id=None, eos_token_id=None)
    assert config.no_rope_layers == [1, 1, 1, 0]  # layer 3 has no rotary embedding
    torch.manual_seed(0)
    return SmolLM3ForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_probe_refuses_a_layer_without_rope_behind_rope_layers(dtype, tokenizer):
    """SmolLM3 skips RoPE in every fourth layer: rotating that layer's keys is wrong, and only a probe that checks
    every layer (not the first alone) sees it (measured 0.84 at layer 3 keys)."""
    with pytest.raises(UnsupportedModelError, match="at layer 3 keys for smollm3"):
        BlockEngine(_smollm3_with_a_nope_layer(tokenizer, dtype), tokenizer)
