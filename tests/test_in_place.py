"""Blocks read in place on the CPU (``blockrag.assemble.context_cache`` + ``attention.BlockContext``): the query is
rotated back by each block's offset instead of rotating every cached key into an assembled buffer."""

import pytest
import torch
from conftest import SUPPORTED_ARCHS
from reference import reference_greedy, reference_logits, rotate_complex

import blockrag.assemble as assemble_module
from blockrag.assemble import assemble_cache
from blockrag.attention import BlockContext, block_context_attention

PASSAGES = ["Paris is the capital of France.", "Rotary embeddings rotate keys by position, twice over.", "The fox."]
QUESTION = "What is the capital of France?"


def reference_attention(query, key, value, scale):
    """repeat_kv + explicit bottom-right causal mask + softmax, in float64."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).double()
    v = value.repeat_interleave(groups, dim=1).double()
    scores = query.double() @ k.transpose(-1, -2) * scale
    q_len, n = scores.shape[-2:]
    keep = torch.ones(q_len, n, dtype=torch.bool).tril(n - q_len)
    return (scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v).to(query.dtype)


def _context(lengths, layers, kv_heads, dim, inv_freq, rotate=True):
    """Random blocks at local positions, and the same keys rotated to their offsets (what assembly would hold)."""
    keys, values, moved, offset = [], [], [], 0
    for length in lengths:
        k, v = torch.randn(layers, kv_heads, length, dim), torch.randn(layers, kv_heads, length, dim)
        keys.append(k)
        values.append(v)
        moved.append(rotate_complex(k, offset, inv_freq))
        offset += length
    angles = -torch.tensor([sum(lengths[:i]) for i in range(len(lengths))], dtype=torch.float64)[:, None] * inv_freq
    cos, sin = (angles.cos().float(), angles.sin().float()) if rotate else (angles.cos() ** 0, angles.sin() * 0)
    return BlockContext(tuple(keys), tuple(values), cos.float(), sin.float()), moved


@pytest.mark.parametrize("q_heads,kv_heads,dim,rotary_dim", [(6, 2, 32, 32), (4, 4, 16, 8), (9, 3, 64, 64)])
def test_block_context_attention_equals_attention_over_assembled_keys(q_heads, kv_heads, dim, rotary_dim):
    torch.manual_seed(dim + q_heads)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    lengths, q_len, layer = [5, 17, 1, 40], 7, 1
    context, moved = _context(lengths, 2, kv_heads, dim, inv_freq)
    query = torch.randn(1, q_heads, q_len, dim)
    tail_k, tail_v = torch.randn(1, kv_heads, q_len, dim), torch.randn(1, kv_heads, q_len, dim)
    garbage = torch.full((1, kv_heads, sum(lengths), dim), float("nan"))  # context slots are never read
    out = block_context_attention(query, torch.cat([garbage, tail_k], 2), torch.cat([garbage, tail_v], 2),
                                  dim ** -0.5, context, layer)
    key = torch.cat([m[layer][None] for m in moved] + [tail_k], 2)
    value = torch.cat([v[layer][None] for v in context.values] + [tail_v], 2)
    expected = reference_attention(query, key, value, dim ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # negative control: the query not rotated back (each block attended as if it sat at position 0)
    unrotated, _ = _context(lengths, 2, kv_heads, dim, inv_freq, rotate=False)
    unrotated = BlockContext(context.keys, context.values, unrotated.cos, unrotated.sin)
    wrong = block_context_attention(query, torch.cat([garbage, tail_k], 2), torch.cat([garbage, tail_v], 2),
                                    dim ** -0.5, unrotated, layer)
    assert (wrong - expected).abs().max() > 1e-2


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_engine_reads_blocks_in_place_and_decodes_like_the_reference(arch, make_engine, monkeypatch):
    """Prefill logits and greedy decoding equal the block-masked reference; the prefill copied no block (the
    context slots are filled only before the first decoding step) and, once filled, they equal assembly's."""
    engine = make_engine(arch)
    calls, fill = [], assemble_module._fill_eager

    def spy(*args, **kwargs):
        calls.append(kwargs.get("layer"))  # None: all layers at once (assembly), else the layer filled
        return fill(*args, **kwargs)

    monkeypatch.setattr(assemble_module, "_fill_eager", spy)
    result = engine.prefill(PASSAGES, QUESTION)
    expected = reference_logits(engine.model, [list(b.token_ids) for b in result.blocks], result.final_ids)[-1]
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=0)
    drops_kwargs = arch == "stablelm"  # its decoder layers drop keyword arguments: falls back to assembly
    assert engine._in_place is not drops_kwargs
    assert calls == ([None] if drops_kwargs else [])  # nothing copied for the first token

    calls.clear()
    generation = engine.generate(PASSAGES, QUESTION, max_new_tokens=6)
    blocks = [list(b.token_ids) for b in generation.prefill.blocks]
    assert list(generation.token_ids) == reference_greedy(engine.model, blocks, generation.prefill.final_ids, 6,
                                                          engine.eos_ids)[:len(generation.token_ids)]
    layers = engine.model.config.num_hidden_layers
    if not drops_kwargs and len(generation.token_ids) > 1:
        assert sorted(calls) == list(range(layers))  # each layer filled once, before its first decoding step


def test_filled_context_slots_equal_the_assembled_buffer(make_engine):
    engine = make_engine("qwen2")
    blocks = engine.encode(PASSAGES)
    total = sum(b.num_tokens for b in blocks)
    cache, length, context = assemble_module.context_cache(blocks, engine.rope, engine.model.config, capacity=4)
    assembled, _ = assemble_cache(blocks, engine.rope, engine.model.config, engine.device, capacity=4)
    assert length == total and len(context.keys) == len(blocks)
    heads, dim = blocks[0].keys.shape[1], blocks[0].keys.shape[3]
    for layer, reference in zip(cache.layers, assembled.layers):
        new = torch.randn(1, heads, 1, dim)
        layer.update(new, new)  # the prefill's update: context slots still empty
        keys, values = layer.update(new, new)  # the first decoding step fills them first
        torch.testing.assert_close(keys[:, :, :total], reference.keys, atol=1e-6, rtol=0)
        torch.testing.assert_close(values[:, :, :total], reference.values, atol=0, rtol=0)
    # negative control: without re-encoding the keys stay where they were encoded, unlike the assembled ones
    plain, _, _ = assemble_module.context_cache(blocks, engine.rope, engine.model.config, reencode=False, capacity=4)
    layer = plain.layers[0]
    layer.update(new, new)
    keys, _ = layer.update(new, new)
    assert (keys[:, :, :total] - assembled.layers[0].keys).abs().max() > 1e-2


@pytest.mark.parametrize("layers", [1, 2, 7, 16, 28, 32, 80])
def test_copy_groups_cover_every_layer_once_and_end_on_a_single_layer(layers):
    groups = assemble_module.copy_groups(layers)
    assert [layer for group in groups for layer in group] == list(range(layers))
    assert len(groups[-1]) == 1  # what follows the last copy is one layer's work
    assert max(len(group) for group in groups) == max(1, layers // 8)


def test_staging_views_are_aligned_disjoint_views_of_one_buffer():
    """Host blocks' staging: every tensor gets its own shape, dtype and aligned bytes of one buffer; a round trip
    through all of them gives each tensor back (overlapping views would clobber one another)."""
    torch.manual_seed(0)
    tensors = [torch.randn(2, 3, 5, 8, dtype=torch.bfloat16), torch.randn(2, 3, 5, 8).to(torch.float8_e4m3fn),
               torch.randn(3, 7, dtype=torch.float16), torch.randn(2, 3, 1, 8, dtype=torch.bfloat16)]
    buffer, views = assemble_module.staging_views(tensors, torch.device("cpu"))
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    for view, tensor in zip(views, tensors):
        assert view.shape == tensor.shape and view.dtype == tensor.dtype and view.is_contiguous()
        assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert (view.data_ptr() - buffer.data_ptr()) % assemble_module.STAGING_ALIGN == 0
    for view, tensor in zip(views, tensors):
        view.copy_(tensor)
    for view, tensor in zip(views, tensors):
        assert torch.equal(view.view(torch.uint8), tensor.view(torch.uint8))
    # negative control: views laid over each other (no padding between them) do clobber
    clash = buffer.narrow(0, 0, 2 * 8 * 2).view(torch.bfloat16)
    clash.fill_(1.0)
    assert not torch.equal(views[0].view(torch.uint8), tensors[0].view(torch.uint8))
    assert assemble_module.staging_views([], torch.device("cpu"))[1] == []
