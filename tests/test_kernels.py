"""The Triton split-KV attention kernel on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

Runs in a subprocess: the interpreter is chosen when a kernel is defined, so it must be set before
``blockrag.kernels`` is imported, and it must not leak into other tests. bf16 matrix products are not
modelled by the interpreter, so float16 and float32 stand in here; tests/test_gpu.py checks bf16 on CUDA.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from interpreter import PRELUDE

pytest.importorskip("triton")



SCRIPT = PRELUDE + textwrap.dedent('''
    from blockrag.kernels import final_block_attention, split_meta

    def expected(q, k, v, n, q_real, causal=True):
        """float64 bottom-right causal GQA attention by repeat_kv and an explicit mask; padding rows zero."""
        heads, qb = q.shape[1], q.shape[2]
        groups = heads // k.shape[1]
        kk = k[0, :, : n + qb].double().repeat_interleave(groups, 0)
        vv = v[0, :, : n + qb].double().repeat_interleave(groups, 0)
        scores = q[0].double() @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5
        keep = torch.ones(qb, n + qb, dtype=torch.bool)
        keep = keep.tril(n) if causal else keep
        out = (scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vv).transpose(0, 1)
        out[q_real:] = 0
        return out[None]

    torch.manual_seed(0)
    results = []
    cases = [(2, 3, 7, 5, 300, 32, 4, 64), (1, 4, 16, 16, 1000, 16, 8, 64), (2, 2, 5, 5, 0, 16, 2, 64),
             (2, 2, 33, 20, 64, 32, 3, 64), (2, 4, 40, 33, 150, 16, 1, 256)]
    for dtype in (torch.float16, torch.float32):
        for kv_heads, groups, qb, q_real, n, dim, splits, min_chunk in cases:
            q = torch.randn(1, qb, kv_heads * groups, dim, dtype=dtype).transpose(1, 2)  # HF strides
            cap = n + qb + 9
            k = torch.randn(1, kv_heads, cap, dim, dtype=dtype)
            v = torch.randn(1, kv_heads, cap, dim, dtype=dtype)
            k[:, :, n + qb:] = float("nan")  # slots past the final block: never read
            v[:, :, n + qb:] = float("nan")
            meta = split_meta(n, q_real, splits, min_chunk=min_chunk)
            out = final_block_attention(q, k, v, dim ** -0.5, torch.tensor(meta, dtype=torch.int32), splits)
            want = expected(q, k, v, n, q_real)
            rel = float((out.double() - want).norm() / want.norm())
            wrong = float((out.double() - expected(q, k, v, n, q_real, causal=False)).norm() / want.norm())
            results.append({"dtype": str(dtype), "meta": meta, "rel": rel, "open_tail_rel": wrong,
                            "finite": bool(torch.isfinite(out).all()), "shape": list(out.shape),
                            "pad_zero": bool((out[0, q_real:] == 0).all())})
    print(json.dumps(results))
''')


def test_split_kv_kernel_matches_float64_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 10
    assert any(r["meta"][3] > 1 for r in results) and any(r["meta"][3] == 1 for r in results)
    for r in results:
        tol = 1e-3 if r["dtype"] == "torch.float16" else 1e-5
        assert r["finite"] and r["pad_zero"], r
        assert r["rel"] < tol, r
        assert r["open_tail_rel"] > 10 * tol, r  # negative control: a wrong mask does not pass


TABLE_SCRIPT = PRELUDE + textwrap.dedent('''
    from blockrag.kernels import Segment, empty_segment_table, fill_segment_table, table_attention

    def rotate(x, positions, inv_freq):
        """Rotate-half rotary at ``positions`` (float64 math), dims past 2 * len(inv_freq) unchanged."""
        half = inv_freq.numel()
        angle = positions.double()[:, None] * inv_freq.double()[None]
        c, s = angle.cos(), angle.sin()
        x1, x2 = x[..., :half].double(), x[..., half:2 * half].double()
        out = x.double().clone()
        out[..., :half] = x1 * c - x2 * s
        out[..., half:2 * half] = x2 * c + x1 * s
        return out

    torch.manual_seed(0)
    results = []
    # (kv_heads, groups, layers, layer, dim, half, block lengths, qb, q_real, splits, min_chunk, reencode)
    cases = [(2, 3, 3, 1, 32, 16, [5, 40, 17], 7, 5, 4, 16, True),
             (1, 4, 2, 1, 64, 16, [130, 3, 64, 90], 16, 16, 8, 32, True),
             (2, 2, 1, 0, 32, 16, [33], 9, 4, 2, 16, False),
             (2, 2, 2, 0, 64, 32, [300, 200], 16, 11, 1, 256, True),
             (1, 2, 2, 1, 64, 12, [70, 45, 90], 8, 8, 4, 32, True)]  # rotary width 24 of 64
    for dtype in (torch.float16, torch.float32):
        for kv_heads, groups, layers, layer, dim, half, lengths, qb, q_real, splits, min_chunk, reencode in cases:
            inv_freq = 1.0 / (500.0 ** (torch.arange(half, dtype=torch.float64) / half))
            raw = [torch.randn(layers, kv_heads, t, dim, dtype=torch.float64) for t in lengths]
            offsets = [sum(lengths[:i]) for i in range(len(lengths))]
            n = sum(lengths)
            stored = [rotate(k, torch.arange(t), inv_freq).to(dtype).contiguous() for k, t in zip(raw, lengths)]
            values = [torch.randn(layers, kv_heads, t, dim, dtype=dtype) for t in lengths]
            cap = n + qb + 5
            buf_k = torch.full((layers, 1, kv_heads, cap, dim), float("nan"), dtype=dtype)
            buf_v = torch.full_like(buf_k, float("nan"))
            final_k = torch.randn(layers, kv_heads, qb, dim, dtype=dtype)
            buf_k[:, 0, :, n:n + qb] = final_k
            buf_v[:, 0, :, n:n + qb] = torch.randn(layers, kv_heads, qb, dim, dtype=dtype)
            q = torch.randn(1, qb, kv_heads * groups, dim, dtype=dtype).transpose(1, 2)  # HF strides

            def segments(deltas):
                segs = [Segment(k, v, 0, kv_heads * t * dim, t * dim, t, d)
                        for k, v, t, d in zip(stored, values, lengths, deltas)]
                return segs + [Segment(buf_k, buf_v, n * dim, kv_heads * cap * dim, cap * dim, q_real, 0)]

            def run(deltas):
                table = empty_segment_table(8, splits, half, "cpu")
                fill_segment_table(table, segments(deltas), q_real, inv_freq.float(), splits, buf_k, min_chunk, 16)
                return table_attention(q, table, layer, dim ** -0.5, kv_heads, buf_k), table

            # reference: keys rotated to their context positions (or kept at 0..T-1 without re-encoding)
            keys = [rotate(k[layer], torch.arange(t) + (o if reencode else 0), inv_freq)
                    for k, t, o in zip(raw, lengths, offsets)]
            kk = torch.cat([*[k.to(dtype).double() for k in keys], final_k[layer].double()], 1)
            vv = torch.cat([*[v[layer].double() for v in values], buf_v[layer, 0, :, n:n + qb].double()], 1)
            kk, vv = kk.repeat_interleave(groups, 0), vv.repeat_interleave(groups, 0)
            scores = q[0].double() @ kk.transpose(-1, -2) * dim ** -0.5
            keep = torch.ones(qb, n + qb, dtype=torch.bool).tril(n)
            want = (scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vv).transpose(0, 1)[None]
            want[:, q_real:] = 0
            out, table = run(offsets if reencode else [0] * len(lengths))
            rel = float((out.double() - want).norm() / want.norm())
            unrotated = float((run([0] * len(lengths))[0].double() - want).norm() / want.norm())
            results.append({"dtype": str(dtype), "rel": rel, "unrotated_rel": unrotated, "reencode": reencode,
                            "splits": int(table.meta[3]), "finite": bool(torch.isfinite(out).all()),
                            "pad_zero": bool((out[0, q_real:] == 0).all())})
    print(json.dumps(results))
''')


def test_table_attention_reads_segments_in_place_and_rotates_the_query():
    """Blocks read where they are stored (keys at their own positions 0..T-1), the final block in a buffer of
    NaNs around it, several layers, GQA, partial rotary, splits across block boundaries: equal to float64
    attention over keys rotated to their context positions; the same table with the query not rotated back
    (every delta 0) is far off (negative control)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", TABLE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 10
    assert any(r["splits"] > 1 for r in results) and any(r["splits"] == 1 for r in results)
    for r in results:
        tol = 2e-3 if r["dtype"] == "torch.float16" else 1e-5
        assert r["finite"] and r["pad_zero"], r
        assert r["rel"] < tol, r
        if r["reencode"]:
            assert r["unrotated_rel"] > 10 * tol, r  # negative control: keys left at their stored positions


def test_element_offsets_address_each_layer_like_an_index():
    import torch

    from blockrag.kernels import element_offsets

    tensors = [torch.zeros(4, 2, 5, 8, dtype=torch.float16),
               torch.zeros(4, 3, 6, 16, dtype=torch.float16)[:, 1:],  # a slice: offset storage
               torch.zeros(2, 4, 5, 8, dtype=torch.float16).transpose(0, 1)]  # layers not outermost in memory
    base = tensors[0]
    got, align = element_offsets(tensors, base, "cpu", per_layer=True)
    addresses = torch.tensor([[t[layer].data_ptr() for t in tensors] for layer in range(4)])
    assert got.shape == (4, 3) and got.dtype == torch.int64
    assert torch.equal(got * 2 + base.data_ptr(), addresses)
    assert align == 8  # 16 bytes of float16: the caching allocator's addresses and these strides all allow it
    one, _ = element_offsets(tensors, base, "cpu")
    assert torch.equal(one, got[:1])  # one row: layer 0
    assert not torch.equal(got[1:], one.expand(3, -1))  # negative control: later layers are elsewhere
    odd, odd_align = element_offsets([base.view(-1)[1:]], base, "cpu")  # one element in: 2-byte aligned
    assert odd.tolist() == [[1]] and odd_align == 1
    with pytest.raises(ValueError, match="one dtype"):
        element_offsets([base, base.float()], base, "cpu")


def test_segment_table_offsets_count_from_the_anchor_and_bad_anchors_are_refused():
    import torch

    from blockrag.kernels import Segment, empty_segment_table, fill_segment_table

    keys = torch.zeros(2, 1, 2, 64, 16, dtype=torch.float16)
    values = torch.zeros_like(keys)
    block_k, block_v = torch.zeros(2, 2, 8, 16, dtype=torch.float16), torch.zeros(2, 2, 8, 16, dtype=torch.float16)
    segments = [Segment(block_k, block_v, 0, 2 * 8 * 16, 8 * 16, 8, 3),
                Segment(keys, values, 8 * 16, 2 * 64 * 16, 64 * 16, 4, 0)]
    table = empty_segment_table(4, 2, 8, "cpu")
    fill_segment_table(table, segments, 4, torch.ones(8), 2, keys)
    base = keys.data_ptr()
    assert table.k[:2].tolist() == [(block_k.data_ptr() - base) // 2, 8 * 16]
    assert table.v[:2].tolist() == [(block_v.data_ptr() - base) // 2, (values.data_ptr() - base) // 2 + 8 * 16]
    with pytest.raises(ValueError, match="dtype"):
        fill_segment_table(table, segments, 4, torch.ones(8), 2, keys.float())
    with pytest.raises(ValueError, match="16-byte"):
        fill_segment_table(table, segments, 4, torch.ones(8), 2, keys.view(-1)[1:])


FP8_SCRIPT = PRELUDE + textwrap.dedent('''
    from blockrag.assemble import block_offsets, gather_plans
    from blockrag.kernels import gather_rotate
    from blockrag.kv import KVBlock

    class Spec:
        inv_freq = 1.0 / (1e4 ** (torch.arange(8) / 8))

    torch.manual_seed(0)
    plain = [KVBlock(keys=torch.randn(2, 3, t, 16), values=torch.randn(2, 3, t, 16), token_ids=tuple(range(t)),
                     fingerprint="f", key=str(t)) for t in (5, 9, 3)]
    blocks = [b.quantize() if i != 1 else b for i, b in enumerate(plain)]  # fp8 around a plain block: two plans
    cap = sum(b.num_tokens for b in blocks)
    keys, values = torch.zeros(2, 3, cap, 16), torch.zeros(2, 3, cap, 16)
    for plan in gather_plans(blocks, [b.keys for b in blocks], [b.values for b in blocks], block_offsets(blocks),
                             [0, 0, 0], Spec, torch.device("cpu")):
        gather_rotate(plan, 0, keys, values)
    def scaled(x, scale):
        return x if scale is None else x.float() * scale[..., None, None]

    want_k = torch.cat([scaled(b.keys, b.key_scale) for b in blocks], 2)
    want_v = torch.cat([scaled(b.values, b.value_scale) for b in blocks], 2)
    swapped = torch.cat([scaled(b.values, b.key_scale) for b in blocks], 2)
    print(json.dumps({"k": float((keys - want_k).abs().max()), "v": float((values - want_v).abs().max()),
                      "swapped": float((values - swapped).abs().max())}))
''')


def test_fp8_gather_reads_every_blocks_scales_from_one_upload():
    """The gather dequantises fp8 blocks with each block's own key and value scales (uploaded as one tensor) and
    copies a plain block between them (its own plan); scaling the values by the key scales instead is far off
    (negative control)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", FP8_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["k"] < 1e-6 and result["v"] < 1e-6, result
    assert result["swapped"] > 1e-2, result
