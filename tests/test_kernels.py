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

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    import triton.runtime.interpreter as interp

    try:
        int(np.array([1]))
    except TypeError:  # numpy >= 2.4 refuses int() of a 1-element array; the interpreter still does that
        _patch = interp._patch_lang_tensor

        def _patched(tensor, scope):
            _patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        interp._patch_lang_tensor = _patched

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
