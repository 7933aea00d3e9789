"""Keys encoded at offset 0 and rotated by delta == keys encoded at offset delta, for every supported RoPE."""

import pytest
import torch
from conftest import REFUSED_ARCHS, SUPPORTED_ARCHS
from reference import keys_at, reference_logits, rotate_complex

from blockrag import BlockEngine, UnsupportedModelError
from blockrag.rope import rope_spec, rotate_keys


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_rotated_keys_equal_keys_encoded_at_offset(arch, make_model, tokenizer):
    model = make_model(arch)
    spec = rope_spec(model)
    ids = tokenizer("Rotary position embeddings rotate queries and keys.", add_special_tokens=False)["input_ids"]
    at_zero = keys_at(model, ids, 0)
    for delta in (1, 37, 300):
        expected = keys_at(model, ids, delta)
        moved = rotate_keys(at_zero, delta, spec.inv_freq)
        torch.testing.assert_close(moved, expected, atol=1e-5, rtol=0)
        # Negative control: without the rotation the keys are clearly different.
        assert (at_zero - expected).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["stablelm", "gpt_neox", "phi"])
def test_partial_rotary_leaves_pass_through_dims(arch, make_model):
    spec = rope_spec(make_model(arch))
    assert spec.rotary_dim < spec.head_dim
    keys = torch.randn(2, 2, 5, spec.head_dim)
    moved = rotate_keys(keys, 11, spec.inv_freq)
    assert torch.equal(moved[..., spec.rotary_dim:], keys[..., spec.rotary_dim:])
    assert not torch.allclose(moved[..., : spec.rotary_dim], keys[..., : spec.rotary_dim])


@pytest.mark.parametrize("rotary_dim,head_dim", [(16, 16), (8, 16), (64, 128)])
def test_rotate_keys_matches_complex_reference(rotary_dim, head_dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    keys = torch.randn(3, 2, 7, head_dim)
    for delta in (0, 5, 4096):
        torch.testing.assert_close(rotate_keys(keys, delta, inv_freq), rotate_complex(keys, delta, inv_freq),
                                   atol=2e-5, rtol=1e-5)


def test_rotate_keys_per_token_offsets_and_bf16():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    keys = torch.randn(2, 4, 6, 16)
    deltas = torch.tensor([0, 1, 2, 100, 1000, 5])
    per_token = rotate_keys(keys, deltas, inv_freq)
    for t, d in enumerate(deltas.tolist()):
        torch.testing.assert_close(per_token[..., t, :], rotate_keys(keys[..., t : t + 1, :], d, inv_freq)[..., 0, :])
    bf16 = rotate_keys(keys.bfloat16(), 77, inv_freq)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), rotate_keys(keys, 77, inv_freq), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("in_place", [True, False], ids=["blocks-read-in-place", "assembled"])
def test_yarn_attention_scaling_is_applied_once(in_place, make_model, make_engine, tokenizer, monkeypatch):
    """YaRN multiplies cos/sin by ``attention_scaling`` when keys are encoded, so cached keys carry it already;
    re-encoding must only rotate. Checked on the keys and on the engine's block-mode logits against the
    block-masked reference, for both ways the engine re-encodes (queries rotated per block over blocks read in
    place; keys rotated into an assembled buffer); negative control: that path's rotation with the scaling
    applied a second time is clearly off."""
    model = make_model("yarn")
    spec = rope_spec(model)
    assert spec.rope_type == "yarn" and abs(spec.attention_scaling - 1.0) > 0.05  # a second scaling would show
    ids = tokenizer("Rotary position embeddings rotate queries and keys.", add_special_tokens=False)["input_ids"]
    at_zero, expected = keys_at(model, ids, 0), keys_at(model, ids, 57)
    moved = rotate_keys(at_zero, 57, spec.inv_freq)
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=0)
    assert (moved * spec.attention_scaling - expected).abs().max() > 1e-2

    engine = make_engine("yarn", fast_attention=in_place)
    passages = ["Paris is the capital of France.", "Rotary embeddings rotate keys.", "The fox jumps."]
    result = engine.prefill(passages, "Which city?")
    reference = reference_logits(engine.model, [list(b.token_ids) for b in result.blocks], result.final_ids)[-1]
    torch.testing.assert_close(result.logits, reference, atol=1e-4, rtol=0)

    import blockrag.assemble as assemble_module
    import blockrag.attention as attention_module

    if in_place:
        rotate_queries = attention_module.rotate_queries

        def scaled_again(query, cos, sin):
            return rotate_queries(query, cos, sin) * spec.attention_scaling

        monkeypatch.setattr(attention_module, "rotate_queries", scaled_again)
    else:
        def scaled_again(out, keys, delta, inv_freq):
            out.copy_(rotate_keys(keys, delta, inv_freq) * spec.attention_scaling)

        monkeypatch.setattr(assemble_module, "rotate_keys_into", scaled_again)
    doubled = engine.prefill(passages, "Which city?")
    assert (doubled.logits - reference).abs().max() > 1e-3


@pytest.mark.parametrize("arch,reason", sorted(REFUSED_ARCHS.items()))
def test_unsupported_models_are_refused(arch, reason, make_model, tokenizer):
    with pytest.raises(UnsupportedModelError, match=reason):
        BlockEngine(make_model(arch), tokenizer)


def test_probe_refuses_a_rope_layout_it_cannot_reencode(make_model, tokenizer, monkeypatch):
    """If the model's rotation is not the rotate-half layout, the construction-time probe says so."""
    import blockrag.rope as rope_module

    def interleaved(keys, delta, inv_freq):  # a deliberately wrong pairing of dims
        r = 2 * inv_freq.numel()
        perm = torch.arange(r).view(2, -1).t().reshape(-1)
        return rotate_keys(keys[..., perm], delta, inv_freq)[..., perm.argsort()]

    monkeypatch.setattr(rope_module, "rotate_keys", interleaved)
    with pytest.raises(UnsupportedModelError, match="cannot be re-encoded"):
        BlockEngine(make_model("llama"), tokenizer)
