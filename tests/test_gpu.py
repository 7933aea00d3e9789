"""GPU fast paths against the eager reference. Run only where CUDA is present (marked ``gpu``)."""

import copy
import dataclasses

import pytest
import torch
from reference import reference_logits

from blockrag.assemble import assemble_cache
from blockrag.attention import final_block_attention
from blockrag.kv import KVBlock
from blockrag.rope import RopeSpec

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _blocks(lengths, layers, heads, dim, dtype, device):
    out = []
    for i, n in enumerate(lengths):
        k = torch.randn(layers, heads, n, dim, dtype=dtype, device=device)
        v = torch.randn(layers, heads, n, dim, dtype=dtype, device=device)
        out.append(KVBlock(keys=k, values=v, token_ids=tuple(range(n)), fingerprint="fp", key=f"b{i}"))
    return out


def _spec(rotary_dim, head_dim):
    inv_freq = 1.0 / (500000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    return RopeSpec(inv_freq=inv_freq, rotary_dim=rotary_dim, head_dim=head_dim, rope_type="default",
                    attention_scaling=1.0)


def _filled(cache):
    return (torch.stack([layer.keys[0] for layer in cache.layers]),
            torch.stack([layer.values[0] for layer in cache.layers]))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rotary_dim,head_dim", [(128, 128), (32, 80), (64, 64)])
@pytest.mark.parametrize("reencode", [True, False])
def test_gather_rotate_and_host_path_equal_eager(dtype, atol, rotary_dim, head_dim, reencode):
    torch.manual_seed(0)
    spec = _spec(rotary_dim, head_dim)
    blocks = _blocks([37, 512, 1, 200, 513], 3, 4, head_dim, dtype, CUDA)
    eager_k, eager_v = _filled(assemble_cache(blocks, spec, None, CUDA, reencode=reencode, path="eager")[0])
    gpu_k, gpu_v = _filled(assemble_cache(blocks, spec, None, CUDA, reencode=reencode, path="gpu")[0])
    torch.testing.assert_close(gpu_k, eager_k, atol=atol, rtol=0)
    assert torch.equal(gpu_v, eager_v)
    host_blocks = [dataclasses.replace(b, keys=b.keys.cpu().pin_memory(), values=b.values.cpu().pin_memory())
                   for b in blocks]
    cache, _ = assemble_cache(host_blocks, spec, None, CUDA, reencode=reencode, path="host")
    for layer in cache.layers:  # the model would trigger each layer's hook with its first update
        layer._before_use()
        layer._before_use = None
    host_k, host_v = _filled(cache)
    torch.testing.assert_close(host_k, eager_k, atol=atol, rtol=0)
    assert torch.equal(host_v, eager_v)
    # fp8 blocks (mixed with plain ones): the kernel dequantises on the way, on both GPU paths.
    mixed = [b.quantize() if i % 2 else b for i, b in enumerate(blocks)]
    ref_k, ref_v = _filled(assemble_cache(mixed, spec, None, CUDA, reencode=reencode, path="eager", dtype=dtype)[0])
    fp8_k, fp8_v = _filled(assemble_cache(mixed, spec, None, CUDA, reencode=reencode, path="gpu", dtype=dtype)[0])
    # NOTE: the eager reference rounds to bf16 after dequantising and again after rotating: 1 ulp apart.
    rtol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fp8_k, ref_k, atol=atol, rtol=rtol)
    torch.testing.assert_close(fp8_v, ref_v, atol=atol, rtol=rtol)
    mixed_host = [b.to("cpu") for b in mixed]
    cache, _ = assemble_cache(mixed_host, spec, None, CUDA, reencode=reencode, path="host", dtype=dtype)
    for layer in cache.layers:
        layer._before_use()
        layer._before_use = None
    fp8_host_k, fp8_host_v = _filled(cache)
    torch.testing.assert_close(fp8_host_k, ref_k, atol=atol, rtol=rtol)
    torch.testing.assert_close(fp8_host_v, ref_v, atol=atol, rtol=rtol)
    assert (ref_v.float() - eager_v.float()).abs().max() > 0  # negative control: fp8 did change the values
    if reencode:  # negative control: the rotation really happened
        unrotated = torch.cat([b.keys for b in blocks], dim=2)
        assert (gpu_k.float() - unrotated.float()).abs().max() > 0.1


def _expected_attention(q, k, v, context, q_real=None, causal=True):
    """float64 bottom-right causal GQA attention, by repeat_kv and an explicit mask; padding rows zeroed."""
    heads, q_len = q.shape[1], q.shape[2]
    groups = heads // k.shape[1]
    kk = k[:, :, : context + q_len].double().repeat_interleave(groups, 1)
    vv = v[:, :, : context + q_len].double().repeat_interleave(groups, 1)
    scores = q.double() @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5
    keep = torch.ones(q_len, context + q_len, dtype=torch.bool, device=q.device)
    keep = keep.tril(context) if causal else keep
    out = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vv
    if q_real is not None:
        out[:, :, q_real:] = 0
    return out


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("context", [100, 9000, 32768])
def test_split_context_attention_bf16_matches_float64(context, kernel):
    torch.manual_seed(1)
    q = torch.randn(1, 32, 64, 128, device=CUDA, dtype=torch.bfloat16)
    k = torch.randn(1, 8, context + 64, 128, device=CUDA, dtype=torch.bfloat16)
    v = torch.randn(1, 8, context + 64, 128, device=CUDA, dtype=torch.bfloat16)
    out = final_block_attention(q, k, v, 128 ** -0.5, kernel=kernel)
    kk, vv = k.double().repeat_interleave(4, 1), v.double().repeat_interleave(4, 1)
    scores = q.double() @ kk.transpose(-1, -2) * 128 ** -0.5
    keep = torch.ones(64, context + 64, dtype=torch.bool, device=CUDA).tril(context)
    expected = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vv
    rel = (out.double() - expected).norm() / expected.norm()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("context,q_real,qb", [(0, 40, 48), (300, 71, 96), (4000, 71, 96), (32335, 71, 96),
                                               (32768, 128, 128)])
def test_split_kv_kernel_bf16_matches_float64(context, q_real, qb):
    """The Triton kernel over a static buffer (graph layout): HF query strides, padding rows, slack slots."""
    from blockrag.kernels import final_block_attention as split_kv
    from blockrag.kernels import split_meta

    torch.manual_seed(context)
    q = torch.randn(1, qb, 32, 128, device=CUDA, dtype=torch.bfloat16).transpose(1, 2)  # (1, Hq, qb, D) view
    cap = context + qb + 100
    k = torch.randn(1, 8, cap, 128, device=CUDA, dtype=torch.bfloat16)
    v = torch.randn(1, 8, cap, 128, device=CUDA, dtype=torch.bfloat16)
    k[:, :, context + qb:] = float("nan")  # slots past the final block must never be read
    v[:, :, context + qb:] = float("nan")
    for splits in (1, 16):
        meta = torch.tensor(split_meta(context, q_real, splits), dtype=torch.int32, device=CUDA)
        out = split_kv(q, k, v, 128 ** -0.5, meta, splits)  # (1, qb, Hq, D)
        expected = _expected_attention(q, k, v, context, q_real).transpose(1, 2)
        assert torch.isfinite(out).all()
        rel = (out.double() - expected).norm() / expected.norm()
        assert rel < 1e-2, (splits, rel)
        # negative control: attention without the final block's causal mask is measurably different
        open_tail = _expected_attention(q, k, v, context, q_real, causal=False)
        wrong = (out.double() - open_tail.transpose(1, 2)).norm() / expected.norm()
        assert wrong > 5 * rel, (wrong, rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_fast_path_matches_reference_on_gpu(dtype, tokenizer):
    from blockrag import BlockEngine
    from blockrag.testing import tiny_model

    model = tiny_model("llama3", vocab_size=len(tokenizer), dtype=dtype).to(CUDA)
    fast = BlockEngine(model, tokenizer, fast_attention=True)
    slow = BlockEngine(model, tokenizer, fast_attention=False, assemble_path="eager")
    passages = [f"Passage number {i} talks about rotary embeddings and caches." * (1 + i % 3) for i in range(12)]
    a = fast.prefill(passages, "Which passage?")
    b = slow.prefill(passages, "Which passage?")
    ref = reference_logits(model.float(), [list(x.token_ids) for x in a.blocks], a.final_ids)[-1].cpu()
    model.to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 5e-2 * ref.abs().max().item()
    torch.testing.assert_close(a.logits, ref, atol=tol, rtol=0)
    torch.testing.assert_close(b.logits, ref, atol=tol, rtol=0)
    host = [dataclasses.replace(x, keys=x.keys.cpu().pin_memory(), values=x.values.cpu().pin_memory())
            for x in fast.encode(passages)]
    from blockrag.assemble import fast_path

    assert fast_path([fast.encode(["device-resident prefix"])[0], *host], CUDA) == "host"
    c = fast.prefill(host, "Which passage?")  # the cached block 0 is on the GPU, passages on the host
    torch.testing.assert_close(c.logits, a.logits, atol=tol, rtol=0)
    if dtype == torch.float32:
        assert fast.generate(passages, "Which?", max_new_tokens=12).token_ids == \
            slow.generate(passages, "Which?", max_new_tokens=12).token_ids


@pytest.mark.parametrize("attention", ["triton", "flash"])
def test_cuda_graph_prefill_matches_the_eager_fast_path(tokenizer, attention):
    from blockrag import BlockEngine
    from blockrag.graphs import FinalBlockGraphs
    from blockrag.testing import tiny_model

    model = tiny_model("qwen3", vocab_size=len(tokenizer), dtype=torch.bfloat16).to(CUDA)
    eager = BlockEngine(model, tokenizer, fast_attention=True)
    graphed = BlockEngine(model, tokenizer, fast_attention=True)
    # small chunks / few keys per split: many of them in play
    graphed.graphs = FinalBlockGraphs(model, max_context=1024, chunk=64, attention=attention, max_splits=8)
    passages = [f"Passage {i} is about caches and rotary embeddings, number {i}." * (1 + i % 2) for i in range(12)]
    for count in (1, 5, 12):  # different context lengths replay the same captured graph
        for question in ("Which?", "Which passage talks about number seven, and why?"):
            a = graphed.prefill(passages[:count], question)
            b = eager.prefill(passages[:count], question)
            tol = 3e-2 * b.logits.abs().max().item()
            torch.testing.assert_close(a.logits, b.logits, atol=tol, rtol=0)
    assert len(graphed.graphs._graphs) <= 2  # one graph per final-length bucket, replayed for every context
    ga = graphed.generate(passages[:6], "Which?", max_new_tokens=10)
    gb = eager.generate(passages[:6], "Which?", max_new_tokens=10)
    assert ga.token_ids[:3] == gb.token_ids[:3]
    # Host-resident (pinned) and fp8 blocks replay the same graphs after one copy to the device.
    host = [b.to("cpu") for b in graphed.encode(passages[:5])]
    host = [dataclasses.replace(b, keys=b.keys.pin_memory(), values=b.values.pin_memory()) for b in host]
    from_host = graphed.prefill(host, "Which?")  # copies overlapped with the graph pieces
    assert len(next(iter(graphed.graphs._graphs.values())).graphs) == 2  # 2 layers: one piece per layer
    torch.testing.assert_close(from_host.logits, eager.prefill(passages[:5], "Which?").logits, atol=tol, rtol=0)
    graphed.graphs.pipeline_host = False  # copy everything, then replay: the same numbers
    serial = graphed.prefill(host, "Which?")
    graphed.graphs.pipeline_host = True
    torch.testing.assert_close(serial.logits, from_host.logits, atol=1e-6, rtol=0)
    mixed = [graphed.encode(passages[5:6])[0], *host[1:]]  # a device-resident block among host ones
    torch.testing.assert_close(graphed.prefill(mixed, "Which?").logits,
                               eager.prefill([passages[5], *passages[1:5]], "Which?").logits, atol=tol, rtol=0)
    fp8 = graphed.prefill([b.quantize() for b in host], "Which?")
    assert (fp8.logits - from_host.logits).abs().max() < 0.25 * from_host.logits.abs().max()
    # Busy buffer: a second request falls back to the eager path instead of waiting.
    assert graphed.graphs.lock.acquire(blocking=False)
    try:
        busy = graphed.prefill(passages[:5], "Which?")
    finally:
        graphed.graphs.lock.release()
    torch.testing.assert_close(busy.logits, eager.prefill(passages[:5], "Which?").logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attention", ["triton", "flash"])
def test_cuda_graph_prefill_matches_block_masked_reference(tokenizer, attention):
    """bf16 graph replay (split-KV kernel or flash) against ONE block-masked forward in float32."""
    from blockrag import BlockEngine
    from blockrag.graphs import FinalBlockGraphs
    from blockrag.testing import tiny_model

    model = tiny_model("llama3", vocab_size=len(tokenizer), dtype=torch.bfloat16).to(CUDA)
    graphed = BlockEngine(model, tokenizer, fast_attention=True)
    graphed.graphs = FinalBlockGraphs(model, max_context=1024, attention=attention, max_splits=16)
    passages = [f"Passage {i} keeps facts about rotary caches, item {i}." * (1 + i % 3) for i in range(12)]
    got = graphed.prefill(passages, "Which passage keeps item seven?")
    assert len(graphed.graphs._graphs) == 1  # the graph path ran (no eager fallback)
    assert got.usage.prefilled_tokens == len(got.final_ids)
    ref = reference_logits(model.float(), [list(x.token_ids) for x in got.blocks], got.final_ids)[-1].cpu()
    other = reference_logits(model, [list(x.token_ids) for x in got.blocks[:1]], got.final_ids)[-1].cpu()
    model.to(torch.bfloat16)
    tol = 5e-2 * ref.abs().max().item()
    torch.testing.assert_close(got.logits, ref, atol=tol, rtol=0)
    assert (other - ref).abs().max() > 2 * tol  # negative control: dropping the passages is detected


def _wide_model(arch: str, tokenizer):
    """A tiny bf16 model whose heads are wide enough for the segment-table kernel (head dim 64)."""
    from transformers import AutoModelForCausalLM

    from blockrag.testing import tiny_config

    config = tiny_config(arch, vocab_size=len(tokenizer))
    if arch == "phi":  # head dim from the hidden size; partial rotary: 32 of 64 dims rotate
        config.hidden_size, config.intermediate_size = 256, 256
    else:
        config.head_dim = 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval().to(CUDA)


@pytest.mark.parametrize("arch", ["llama3", "phi"])
def test_graph_reads_device_blocks_in_place(tokenizer, arch):
    """The graph path reads device-resident blocks where they are stored (query rotated back per block, nothing
    gathered before the first token): equal to the gathered graph path and to ONE block-masked float32 forward,
    decoding after it (buffer filled on the first step) equals the eager path, and a context with more blocks
    than the table holds falls back to gathering. Negative control: the reference without the passages."""
    from blockrag import BlockEngine
    from blockrag.graphs import FinalBlockGraphs

    model = _wide_model(arch, tokenizer)
    passages = [f"Passage {i} keeps facts about rotary caches, item {i}." * (1 + i % 3) for i in range(12)]
    question = "Which passage keeps item seven?"
    model.to(torch.bfloat16)
    eager = BlockEngine(model, tokenizer, fast_attention=True)
    in_place = BlockEngine(model, tokenizer, fast_attention=True)
    half = in_place.rope.inv_freq.numel()
    in_place.graphs = FinalBlockGraphs(model, max_context=1024, chunk=64, max_splits=8, rotary_half=half,
                                       read_in_place=True)
    assert in_place.graphs.rotary_half == half  # the segment table is in use
    gathered = BlockEngine(model, tokenizer, fast_attention=True)
    gathered.graphs = FinalBlockGraphs(model, max_context=1024, chunk=64, max_splits=8, rotary_half=half)
    assert gathered.graphs.rotary_half is None  # the default: gathered into the buffer, no table
    for count in (1, 5, 12):
        blocks = in_place.encode(passages[:count])
        a = in_place.prefill(blocks, question)
        b = gathered.prefill(blocks, question)
        c = eager.prefill(blocks, question)
        tol = 3e-2 * c.logits.abs().max().item()
        torch.testing.assert_close(a.logits, c.logits, atol=tol, rtol=0)
        torch.testing.assert_close(b.logits, c.logits, atol=tol, rtol=0)
    assert len(in_place.graphs._graphs) == 1  # the graph path ran (no eager fallback)
    decisions = in_place.graphs.fused.decisions  # fused kernels were checked on the warm-up and captured
    assert any(key.endswith("apply_rotary_pos_emb") and ok for key, ok in decisions.items()), decisions
    assert arch != "llama3" or (decisions.get("LlamaRMSNorm") and decisions.get("LlamaMLP")), decisions
    ids = [list(x.token_ids) for x in a.blocks]
    fp32 = copy.deepcopy(model).float()  # NOTE: not model.float(): the captured graph reads these weights
    ref = reference_logits(fp32, ids, a.final_ids)[-1].cpu()
    other = reference_logits(fp32, ids[:1], a.final_ids)[-1].cpu()
    tol = 5e-2 * ref.abs().max().item()
    torch.testing.assert_close(a.logits, ref, atol=tol, rtol=0)
    assert (other - ref).abs().max() > 2 * tol  # negative control: dropping the passages is detected
    # without position re-encoding every block keeps positions 0..T-1: the query is not rotated back
    torch.testing.assert_close(in_place.prefill(passages[:6], question, reencode=False).logits,
                               eager.prefill(passages[:6], question, reencode=False).logits, atol=tol, rtol=0)
    # decoding after an in-place prefill: the buffer is filled before the first step
    ga = in_place.generate(passages[:6], question, max_new_tokens=8)
    gb = eager.generate(passages[:6], question, max_new_tokens=8)
    assert ga.token_ids[:3] == gb.token_ids[:3]
    in_place.graphs.max_segments = 4  # more blocks than the table holds: gathered into the buffer instead
    torch.testing.assert_close(in_place.prefill(passages, question).logits, eager.prefill(passages, question).logits,
                               atol=tol, rtol=0)
