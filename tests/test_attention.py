"""The fast attention (GQA-native, split context, LSE merge) and the preallocated cache, on the CPU."""

import pytest
import torch
from reference import reference_logits

import blockrag.attention as attention
from blockrag.assemble import assemble_cache
from blockrag.attention import final_block_attention


def reference_attention(query, key, value, scale):
    """repeat_kv + explicit bottom-right causal mask + softmax, in float64."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).double()
    v = value.repeat_interleave(groups, dim=1).double()
    scores = query.double() @ k.transpose(-1, -2) * scale
    q_len, n = scores.shape[-2:]
    keep = torch.ones(q_len, n, dtype=torch.bool).tril(n - q_len)
    return (scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v).to(query.dtype)


@pytest.mark.parametrize("q_len,n,q_heads,kv_heads", [(7, 50, 8, 2), (1, 30, 4, 4), (5, 5, 6, 3), (16, 300, 4, 1)])
@pytest.mark.parametrize("chunks", [1, 3])
def test_final_block_attention_matches_reference(q_len, n, q_heads, kv_heads, chunks, monkeypatch):
    monkeypatch.setattr(attention, "_context_chunks", lambda length, device, target=4096: min(chunks, length))
    torch.manual_seed(q_len * n)
    query = torch.randn(1, q_heads, q_len, 32)
    key, value = torch.randn(1, kv_heads, n, 32), torch.randn(1, kv_heads, n, 32)
    out = final_block_attention(query, key, value, 32 ** -0.5)
    expected = reference_attention(query, key, value, 32 ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if 1 < q_len < n:  # negative control: top-left aligned causal attention is a different function
        wrong = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(q_heads // kv_heads, 1), value.repeat_interleave(q_heads // kv_heads, 1),
            is_causal=True, scale=32 ** -0.5)
        assert (wrong - expected).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "phi"])
def test_engine_with_fast_attention_matches_reference(arch, make_engine, monkeypatch):
    monkeypatch.setattr(attention, "_context_chunks", lambda length, device, target=4096: 2 if length > 8 else 1)
    engine = make_engine(arch, fast_attention=True)
    before = engine.model.config._attn_implementation
    result = engine.prefill(["Paris is the capital of France.", "The fox.", "Rotary embeddings rotate keys."], "Q?")
    assert engine.model.config._attn_implementation == before  # restored after the call
    expected = reference_logits(engine.model, [list(b.token_ids) for b in result.blocks], result.final_ids)[-1]
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=0)
    slow = make_engine(arch).generate(["Paris is the capital of France."], "Q?", max_new_tokens=8)
    fast = engine.generate(["Paris is the capital of France."], "Q?", max_new_tokens=8)
    assert fast.token_ids == slow.token_ids


def test_buffer_cache_grows_past_its_capacity(make_engine):
    engine = make_engine("llama")
    blocks = engine.encode(["first passage here", "second one"])
    cache, length = assemble_cache(blocks, engine.rope, engine.model.config, engine.device, capacity=0)
    assert length == sum(b.num_tokens for b in blocks)
    layer = cache.layers[0]
    torch.testing.assert_close(layer.values[0], torch.cat([b.values[0] for b in blocks], dim=1))
    extra_k, extra_v = torch.randn(1, layer.keys.shape[1], 5, layer.keys.shape[3]), torch.randn(1, 2, 5, 16)
    keys, values = layer.update(extra_k, extra_v)
    assert keys.shape[2] == length + 5 and cache.get_seq_length() == length + 5
    torch.testing.assert_close(keys[:, :, length:], extra_k)
    torch.testing.assert_close(values[:, :, :length][0], torch.cat([b.values[0] for b in blocks], dim=1))


def test_concurrent_requests_keep_the_fast_attention_until_the_last_one_ends(make_engine):
    import threading

    engine = make_engine("llama", fast_attention=True)
    before = engine.model.config._attn_implementation
    expected = engine.prefill(["Paris is the capital of France.", "The fox."], "Q?").logits
    results, errors = [], []

    def ask():
        try:
            for _ in range(3):
                results.append(engine.prefill(["Paris is the capital of France.", "The fox."], "Q?").logits)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    for logits in results:
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert engine.model.config._attn_implementation == before


def test_fp8_blocks_are_dequantised_on_assembly(make_engine):
    import dataclasses

    engine = make_engine("qwen2", assemble_path="eager")  # both prefills assemble (fp8 blocks are not read in place)
    passages = ["Paris is the capital of France.", "The fox jumps over the lazy dog, twice."]
    blocks = engine.encode(passages)
    fp8 = [b.quantize() for b in blocks]
    assert all(b.quantized and b.keys.dtype == torch.float8_e4m3fn for b in fp8)
    assert fp8[0].nbytes < 0.3 * blocks[0].nbytes  # fp32 model: a quarter of the bytes plus scales
    by_hand = [dataclasses.replace(b.dequantize(torch.float32)) for b in fp8]
    a = engine.prefill(fp8, "Capital?")
    b = engine.prefill(by_hand, "Capital?")
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=0)
    exact = engine.prefill(blocks, "Capital?").logits
    error = (a.logits - exact).abs().max()
    assert 0 < error < 0.1 * exact.abs().max()  # fp8 changes the logits a little, not a lot
