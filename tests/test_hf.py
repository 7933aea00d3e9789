"""The transformers adapter: the engine's calls use the current cache names, and caches over our buffers work.

transformers >= 5.24 deprecates the older cache argument and output field (FutureWarning for the argument,
a logged notice for the attribute). The suite runs with FutureWarning as an error and fails on logged
deprecations (conftest), and these tests check it directly, with negative controls showing that the
old spelling is still detected on a transformers that deprecates it.
"""

import logging
import warnings

import pytest
import torch
from transformers.utils import logging as hf_logging

from blockrag import hf

OLD = "past_" + "key_values"  # spelled apart: the adapter is the only package module that names it


@pytest.fixture
def deprecations(no_transformers_deprecations):
    """(FutureWarnings, logged notices) recorded around a block, with transformers' log-once cache cleared."""
    hf_logging.get_logger("transformers").warning_once.cache_clear()
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    handler = no_transformers_deprecations
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught, handler.messages
    hf_logging.set_verbosity(previous)
    hf_logging.get_logger("transformers").warning_once.cache_clear()


def _deprecates_old_name() -> bool:
    from transformers import LlamaForCausalLM

    return hf.cache_argument(LlamaForCausalLM) == "cache"


def test_engine_calls_use_no_deprecated_names(make_engine, deprecations):
    caught, logged = deprecations
    engine = make_engine("llama", verify_rope=True)  # the RoPE probe runs at construction
    engine.generate(["Paris is the capital of France.", "The fox."], "Where?", max_new_tokens=3)
    engine.generate([], "Where?", mode="full", max_new_tokens=3)
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert future == [] and logged == []


@pytest.mark.skipif(not _deprecates_old_name(), reason="installed transformers has only the older cache name")
def test_old_names_are_still_detected(make_model, tokenizer, deprecations):
    """Negative control: the same forward with the old argument and attribute is reported."""
    caught, logged = deprecations
    model = make_model("llama")
    ids = torch.tensor([[5, 6, 7]])
    out = model(input_ids=ids, use_cache=True)
    old = model(input_ids=torch.tensor([[8]]), use_cache=True, **{OLD: out.cache})
    getattr(old, OLD)
    assert any(issubclass(w.category, FutureWarning) and OLD in str(w.message) for w in caught)
    assert logged, "expected transformers to log the deprecated attribute"
    logged.clear()  # expected here; the conftest guard would fail the test otherwise


def test_cache_argument_follows_the_forward_signature():
    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):
            pass

    namespace: dict = {}
    exec(f"def forward(self, input_ids=None, {OLD}=None, **kwargs): pass", namespace)
    Old = type("Old", (torch.nn.Module,), {"forward": namespace["forward"]})
    assert hf.cache_argument(New) == "cache"
    assert hf.cache_argument(Old) == OLD


def test_forward_continues_a_cache_like_one_full_pass(make_model):
    """Prefix then suffix through the adapter's cache gives the one-pass logits; a fresh cache does not."""
    model = make_model("qwen3")
    ids = torch.tensor([[5, 9, 11, 13, 17, 19, 23]])
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
        _, cache = hf.forward(model, ids[:, :4])
        logits, cache = hf.forward(model, ids[:, 4:], position_ids=torch.arange(4, 7)[None], cache=cache)
        torch.testing.assert_close(logits[0, -1], full, atol=1e-5, rtol=0)
        keys, values = hf.stacked_kv(cache)
        assert len(keys) == model.config.num_hidden_layers and keys[0].shape[-2] == 7
        alone, _ = hf.forward(model, ids[:, 4:], position_ids=torch.arange(4, 7)[None])
        assert (alone[0, -1] - full).abs().max() > 1e-2


def test_buffer_cache_writes_in_place_and_runs_hooks_once(make_model):
    model = make_model("llama")
    ids = torch.tensor([[5, 9, 11, 13, 17]])
    with torch.no_grad():
        _, reference = hf.forward(model, ids)
        ref_keys, ref_values = hf.stacked_kv(reference)
        layers = len(ref_keys)
        keys = torch.zeros(layers, 1, *ref_keys[0].shape[1:2], 16, ref_keys[0].shape[-1])
        values = torch.zeros_like(keys)
        keys[:, :, :, :3] = torch.stack(ref_keys)[:, :, :, :3]
        values[:, :, :, :3] = torch.stack(ref_values)[:, :, :, :3]
        calls = []
        cache = hf.buffer_cache(model.config, keys, values, 3, [lambda i=i: calls.append(i) for i in range(layers)])
        logits, cache = hf.forward(model, ids[:, 3:], position_ids=torch.arange(3, 5)[None], cache=cache)
        assert calls == list(range(layers))
        torch.testing.assert_close(keys[:, 0, :, 3:5], torch.stack(ref_keys)[:, 0, :, 3:5], atol=1e-5, rtol=0)
        assert keys[:, :, :, 5:].abs().max() == 0  # nothing written past the new tokens


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma", "hybrid"])
def test_prefill_kv_caches_what_a_full_forward_does_and_stops_after_the_last_keys(make_model, arch):
    """Same keys and values as a full forward (padding included); the last layer's MLP and the LM head run only
    where the last layer's cache is not a plain one (``hybrid``: a sliding window there), and in the full forward."""
    model = make_model(arch)
    ids = torch.tensor([[5, 9, 11, 13, 17, 19, 23, 29], [31, 37, 41, 43, 47, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    last = hf.decoder_layers(model)[-1]
    mlp = getattr(last, "mlp", None)
    calls = []
    handles = [module.register_forward_hook(lambda *_, name=name: calls.append(name))
               for name, module in (("mlp", mlp), ("head", model.get_output_embeddings())) if module is not None]
    try:
        with torch.no_grad():
            _, reference = hf.forward(model, ids, attention_mask=mask, logits_to_keep=1)
            full_calls, calls[:] = list(calls), []
            cache = hf.prefill_kv(model, ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    assert "head" in full_calls  # negative control: the hooks see a full forward
    assert calls == ([] if arch != "hybrid" else full_calls)
    for got, want in zip(hf.stacked_kv(cache), hf.stacked_kv(reference)):
        assert len(got) == len(want) == model.config.num_hidden_layers
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_keep_layer_keeps_the_first_tensors_and_concatenates_later_ones():
    layer = hf.KeepLayer()
    keys, values = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 4, 3).transpose(2, 3)
    got_keys, got_values = layer.update(keys, values)
    assert got_keys is keys and got_values is values and layer.get_seq_length() == 3
    more_keys, more_values = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    got_keys, got_values = layer.update(more_keys, more_values)
    torch.testing.assert_close(got_keys, torch.cat([keys, more_keys], dim=2), atol=0, rtol=0)
    torch.testing.assert_close(got_values, torch.cat([values, more_values], dim=2), atol=0, rtol=0)


def test_attention_switch_restores_after_the_last_user(make_model):
    model = make_model("gemma")
    before = hf.attention_implementation(model)
    switch = hf.AttentionSwitch(model, "eager" if before != "eager" else "sdpa")
    with switch:
        with switch:
            assert hf.attention_implementation(model) == switch.name
        assert hf.attention_implementation(model) == switch.name
    assert hf.attention_implementation(model) == before
    with hf.AttentionSwitch(model, None):
        assert hf.attention_implementation(model) == before


def test_logged_deprecation_guard_fails_a_test(no_transformers_deprecations):
    """The conftest guard sees a transformers deprecation notice (negative control for the guard itself)."""
    logging.getLogger("transformers.modeling_utils").warning("`foo` is deprecated, use `bar`")
    assert no_transformers_deprecations.messages
    no_transformers_deprecations.messages.clear()
