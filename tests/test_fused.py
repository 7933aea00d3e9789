"""Fused RMSNorm and rotary kernels (``blockrag.fused``) on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

Everything runs in one subprocess: the interpreter is chosen when a kernel is defined, so it must be set before
``blockrag.fused`` is imported, and it must not leak into other tests. The subprocess prints one JSON report; the
tests below read their part of it. The interpreter models bf16 casts (not bf16 matrix products, which these
kernels have none of), so bf16 is checked next to float16 and float32.
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
    from torch import nn
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gpt_neox import modeling_gpt_neox
    from transformers.models.llama import modeling_llama

    import blockrag.fused as fused
    from blockrag.testing import build_tokenizer, tiny_model

    torch.set_num_threads(2)
    DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    report = {}

    def err(got, want):
        """max|got - want| / max(1, max|want|), in float64."""
        got, want = got.double(), want.double()
        return float((got - want).abs().max() / max(1.0, float(want.abs().max())))

    # --- rms_norm ------------------------------------------------------------------------------------------
    def norm64(x, weight, eps):
        x = x.double()
        return weight.double() * (x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt())

    torch.manual_seed(0)
    report["norm"] = []
    for name, dtype in DTYPES.items():
        for n in (64, 100, 384):
            hf = modeling_llama.LlamaRMSNorm(n, eps=1e-6).to(dtype)
            gemma = GemmaRMSNorm(n, eps=1e-6).to(dtype)
            with torch.no_grad():
                hf.weight.normal_(1.0, 0.3)
                gemma.weight.copy_(hf.weight)
            wide = modeling_llama.LlamaRMSNorm(n, eps=1e-6)  # a float32 weight with a 16-bit input
            with torch.no_grad():
                wide.weight.copy_(hf.weight.float())
            # rows evenly strided (a view, column stride 2) and leading dims transposed (a copy)
            for layout, x in (("strided", torch.randn(3, 5, 2 * n, dtype=dtype)[..., ::2]),
                              ("transposed", torch.randn(5, 3, n, dtype=dtype).transpose(0, 1))):
                with torch.no_grad():
                    out = fused.rms_norm(x, hf.weight, 1e-6)
                    want = hf(x)
                    mixed, mixed_want = fused.rms_norm(x, wide.weight, 1e-6), wide(x)
                    report["norm"].append({
                        "dtype": name, "n": n, "layout": layout,
                        "ref_err": err(out, norm64(x, hf.weight, 1e-6)), "hf_err": err(out, want),
                        "same_dtype": out.dtype == want.dtype and out.shape == want.shape,
                        "mixed_err": err(mixed, mixed_want),
                        "mixed_dtype": str(mixed.dtype), "mixed_want_dtype": str(mixed_want.dtype),
                        "wrong_eps_err": err(fused.rms_norm(x, hf.weight, 0.5), want),
                        "gemma_err": err(out, gemma(x)),
                    })

    # --- rotate_qk -----------------------------------------------------------------------------------------
    def rotate64(x, cos, sin):
        """x * cos + rotate_half(x) * sin on the first R dims in float64, the rest unchanged."""
        x, r = x.double(), cos.shape[-1]
        cos, sin = cos.double()[:, None], sin.double()[:, None]
        x1, x2, rest = x[..., : r // 2], x[..., r // 2: r], x[..., r:]
        return torch.cat([x1 * cos[..., : r // 2] - x2 * sin[..., : r // 2],
                          x2 * cos[..., r // 2:] + x1 * sin[..., r // 2:], rest], -1)

    report["rotary"] = []
    batch, tokens = 2, 5
    for name, dtype in DTYPES.items():
        for q_heads, k_heads, dim, rotary, angle_batch in ((4, 2, 16, 16, 2), (6, 1, 32, 32, 1), (3, 3, 24, 8, 2)):
            # HF strides: (B, T, H, D) memory seen as (B, H, T, D); keys a slice of a wider row; cos / sin
            # transposed in memory
            q = torch.randn(batch, tokens, q_heads, dim, dtype=dtype).transpose(1, 2)
            k = torch.randn(batch, tokens, k_heads, dim + 4, dtype=dtype)[..., 2: dim + 2].transpose(1, 2)
            cos = torch.randn(angle_batch, rotary, tokens, dtype=dtype).transpose(1, 2)
            sin = torch.randn(angle_batch, rotary, tokens, dtype=dtype).transpose(1, 2)
            hf = modeling_llama if rotary == dim else modeling_gpt_neox  # Llama's needs R == D
            out_q, out_k = fused.rotate_qk(q, k, cos, sin)
            want_q, want_k = hf.apply_rotary_pos_emb(q, k, cos, sin)
            # several heads per program (as for encoding's many tokens): all heads in one, then a partial group
            grouped = [fused.rotate_qk(q, k, cos, sin, programs=programs) for programs in (1, 5)]
            bad_q, bad_k = fused.rotate_qk(q, k, cos, -sin)
            report["rotary"].append({
                "dtype": name, "case": [q_heads, k_heads, dim, rotary, angle_batch],
                "ref_err": max(err(out_q, rotate64(q, cos, sin)), err(out_k, rotate64(k, cos, sin))),
                "hf_err": max(err(out_q, want_q), err(out_k, want_k)),
                "same_dtype": (out_q.dtype, out_k.dtype, out_q.shape, out_k.shape) == (
                    want_q.dtype, want_k.dtype, want_q.shape, want_k.shape),
                "sin_sign_err": max(err(bad_q, want_q), err(bad_k, want_k)),
                "grouped_bitwise": all(torch.equal(gq, out_q) and torch.equal(gk, out_k) for gq, gk in grouped),
            })

    # --- silu_mul ------------------------------------------------------------------------------------------
    report["silu_mul"] = []
    for name, dtype in DTYPES.items():
        for shape in ((3, 7, 100), (2, 4096 + 5)):
            gate, up = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
            out = fused.silu_mul(gate, up)
            want = nn.functional.silu(gate) * up  # what a Llama MLP computes (two roundings in 16 bits)
            ref = nn.functional.silu(gate.double()) * up.double()
            report["silu_mul"].append({
                "dtype": name, "shape": list(shape), "ref_err": err(out, ref), "hf_err": err(out, want),
                "same_dtype": out.dtype == want.dtype and out.shape == want.shape,
                "swapped_err": err(fused.silu_mul(up, gate), want),
                "strided_err": err(fused.silu_mul(gate.mT, up.mT), want.mT),  # transposed views
            })

    # --- FusedOps on tiny models ---------------------------------------------------------------------------
    calls = {"rms_norm": 0, "rotate_qk": 0, "silu_mul": 0}

    def counted(fn):
        def wrapper(*args):
            calls[fn.__name__] += 1
            return fn(*args)
        return wrapper

    # FusedOps looks the kernels up in its module at call time, so counting wrappers there see every fused call
    fused.rms_norm, fused.rotate_qk = counted(fused.rms_norm), counted(fused.rotate_qk)
    fused.silu_mul = counted(fused.silu_mul)
    tokenizer = build_tokenizer()
    ids = tokenizer("Rotary embeddings rotate queries and keys.", return_tensors="pt").input_ids

    def model_of(arch, dtype):
        model = tiny_model(arch, vocab_size=len(tokenizer), dtype=dtype)
        with torch.no_grad():  # norm weights and biases away from their 1 / 0 init, so a wrong weight shows
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(0.2 * torch.randn_like(p))
        return model

    def patched_forwards(model):
        return sorted(n for n, m in model.named_modules() if "forward" in vars(m))

    report["models"] = []
    models = {}
    for arch, name in (("llama", "float32"), ("qwen3", "float32"), ("mistral", "float32"), ("gemma", "float32"),
                       ("phi", "float32"), ("stablelm", "float32"), ("gpt_neox", "float32"),
                       ("llama", "float16"), ("qwen2", "bfloat16")):
        model = models[arch, name] = model_of(arch, DTYPES[name])
        modeling = sys.modules[type(model).__module__]
        original_rotary = modeling.apply_rotary_pos_emb
        with torch.inference_mode():
            before = model(ids).logits
            ops = fused.FusedOps(model, allow_cpu=True)
            with ops:
                inside = {"patched": patched_forwards(model),
                          "rotary": modeling.apply_rotary_pos_emb is not original_rotary}
                with ops.verify():
                    verified = model(ids).logits
                calls.update(rms_norm=0, rotate_qk=0, silu_mul=0)
                active = model(ids).logits
                active_calls = dict(calls)
            after = model(ids).logits
        report["models"].append({
            "arch": arch, "dtype": name, "modeling": modeling.__name__, "decisions": ops.decisions,
            "rms_norm_modules": sum(type(m).__name__.endswith("RMSNorm") for m in model.modules()),
            "mlp_modules": sum(fused._is_mlp_candidate(m) for m in model.modules()),
            "inside": inside, "calls": active_calls,
            "verify_returns_original": torch.equal(verified, before), "active_err": err(active, before),
            "left_after_exit": patched_forwards(model),
            "rotary_restored": modeling.apply_rotary_pos_emb is original_rotary,
            "after_exit_bitwise": torch.equal(after, before),
        })

    # --- what is never fused ---------------------------------------------------------------------------------
    model = models["llama", "float32"]
    with torch.inference_mode():
        before = model(ids).logits
    calls.update(rms_norm=0, rotate_qk=0, silu_mul=0)
    on_cpu = fused.FusedOps(model)  # allow_cpu=False: CPU tensors keep the original code
    with torch.inference_mode(), on_cpu:
        with on_cpu.verify():
            model(ids)
        plain = model(ids).logits
    report["cpu_not_allowed"] = {"decisions": on_cpu.decisions, "calls": dict(calls),
                                 "bitwise": torch.equal(plain, before)}

    ops = fused.FusedOps(model, allow_cpu=True)
    with ops:
        with torch.inference_mode(), ops.verify():
            model(ids)
        calls.update(rms_norm=0, rotate_qk=0, silu_mul=0)
        with_grad = model(ids).logits  # autograd on: parameters require grad, the kernels have no backward
        grad_calls = dict(calls)
        with torch.inference_mode():
            apply = modeling_llama.apply_rotary_pos_emb
            q = torch.randn(1, 5, 4, 16).transpose(1, 2)
            k = torch.randn(1, 5, 2, 16).transpose(1, 2)
            cos, sin = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
            calls.update(rms_norm=0, rotate_qk=0, silu_mul=0)
            by_keyword = apply(q, k, cos, sin, unsqueeze_dim=1)
            keyword_calls = calls["rotate_qk"]
            by_position = apply(q, k, cos, sin)
            position_calls = calls["rotate_qk"]
    report["call_patterns"] = {
        "decisions": ops.decisions, "grad_calls": grad_calls,
        "grad_bitwise": torch.equal(with_grad.detach(), before),
        "keyword_calls": keyword_calls, "position_calls": position_calls,
        "keyword_bitwise": all(torch.equal(a, b) for a, b in zip(by_keyword, apply(q, k, cos, sin, 1))),
    }

    # --- a mismatch is final; verify() returns the original --------------------------------------------------
    class FlakyRMSNorm(modeling_llama.LlamaRMSNorm):
        broken = False

        def forward(self, hidden_states):
            out = super().forward(hidden_states)
            return out + 1 if self.broken else out

    norm = FlakyRMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = torch.randn(3, 64)
    ops = fused.FusedOps(nn.Sequential(norm), allow_cpu=True)
    try:
        with ops.verify():
            pass
        outside = "no error"
    except RuntimeError as error:
        outside = str(error)
    steps = []
    with torch.no_grad():
        reference = norm(x)
        with ops:
            with ops.verify():
                for broken in (False, True, False):
                    norm.broken = broken
                    out = norm(x)
                    steps.append({"decision": ops.decisions["FlakyRMSNorm"],
                                  "original": torch.equal(out, reference + 1 if broken else reference)})
            calls.update(rms_norm=0, rotate_qk=0, silu_mul=0)
            after = norm(x)
    report["flaky"] = {"steps": steps, "calls": dict(calls), "after_bitwise": torch.equal(after, reference),
                       "verify_outside": outside}

    # an MLP of Llama's layout whose forward is another formula (gate and up swapped) is not fused
    class SwappedMLP(modeling_llama.LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    swapped = SwappedMLP(models["llama", "float32"].config)
    x = torch.randn(2, 5, swapped.hidden_size)
    ops = fused.FusedOps(nn.Sequential(swapped), allow_cpu=True)
    with torch.inference_mode():
        reference = swapped(x)
        with ops:
            with ops.verify():
                verified = swapped(x)
            calls.update(rms_norm=0, rotate_qk=0, silu_mul=0)
            after = swapped(x)
    report["swapped_mlp"] = {"decisions": ops.decisions, "calls": dict(calls),
                             "bitwise": torch.equal(after, reference) and torch.equal(verified, reference)}

    # --- entries are counted: patched from the first entry to the last exit ------------------------------
    model = models["llama", "float32"]
    modeling = sys.modules[type(model).__module__]
    plain_rotary = modeling.apply_rotary_pos_emb
    shared = fused.FusedOps.of(model)
    ops = fused.FusedOps(model, allow_cpu=True)
    with ops:
        with ops:
            nested_inner = bool(patched_forwards(model))
        nested_after_inner = bool(patched_forwards(model)) and modeling.apply_rotary_pos_emb is not plain_rotary
    report["nesting"] = {"inner": nested_inner, "after_inner_exit": nested_after_inner,
                         "after_outer_exit": patched_forwards(model) + [modeling.apply_rotary_pos_emb is plain_rotary],
                         "shared_is_one": shared is fused.FusedOps.of(model) and shared is not ops}

    # --- the block encoder runs verified fused kernels (here on the CPU, through the interpreter) -------------
    from blockrag.encoder import BlockEncoder

    encoded = {}
    for arch in ("llama", "qwen3", "gemma"):
        model = models[arch, "float32"]
        fused.FusedOps._shared[model] = fused.FusedOps(model, allow_cpu=True)  # what of() gives on CUDA
        blocks = [tokenizer(t).input_ids for t in ("Keys rotate.", "Blocks are encoded alone, then reused.")]
        plain_blocks = BlockEncoder(model, "fp", fuse=False).encode(blocks, ["a", "b"])
        encoder = BlockEncoder(model, "fp", fuse=True)
        first = encoder.encode(blocks, ["a", "b"])  # verified: the model's own numbers
        calls.update(rms_norm=0, rotate_qk=0, silu_mul=0)
        second = encoder.encode(blocks, ["a", "b"])
        errs = [err(got.keys, want.keys) for got, want in zip(second, plain_blocks)]
        errs += [err(got.values, want.values) for got, want in zip(second, plain_blocks)]
        encoded[arch] = {
            "decisions": fused.FusedOps.of(model).decisions, "calls": dict(calls), "err": max(errs),
            "first_bitwise": all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                                 for a, b in zip(first, plain_blocks)),
            "lengths": [b.num_tokens for b in second], "left_after": patched_forwards(model),
        }
        # negative control: the same blocks encoded with a wrong rotary sign are far off
        wrong = fused.rotate_qk
        fused.rotate_qk = lambda q, k, cos, sin: wrong(q, k, cos, -sin)
        bad = encoder.encode(blocks, ["a", "b"])
        fused.rotate_qk = wrong
        encoded[arch]["wrong_sign_err"] = max(err(got.keys, want.keys) for got, want in zip(bad, plain_blocks))
    report["encoder"] = encoded
    print(json.dumps(report))
''')

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2**-5}  # a few roundings of the output dtype


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_rms_norm_matches_float64_and_llama_norm(report):
    """Hidden sizes 64, 100, 384; strided and transposed inputs; 16-bit and float32; a float32 weight with a
    16-bit input gives a float32 result, as torch's ``weight * y`` does."""
    cases = report["norm"]
    assert len(cases) == 18
    for case in cases:
        tol = TOL[case["dtype"]]
        assert case["same_dtype"], case
        assert case["ref_err"] < tol, case
        assert case["hf_err"] < tol, case
        assert case["mixed_dtype"] == case["mixed_want_dtype"] == "torch.float32", case
        assert case["mixed_err"] < tol, case
        if case["dtype"] == "float32":
            assert case["hf_err"] < 1e-6, case


def test_rms_norm_negative_controls(report):
    """A wrong eps, and Gemma's ``y * (1 + weight)``, are far off the fused Llama formula."""
    for case in report["norm"]:
        assert case["wrong_eps_err"] > 0.05, case
        assert case["gemma_err"] > 0.2, case


def test_rotary_matches_float64_and_hf_on_strided_views(report):
    """Non-contiguous q / k / cos / sin, Hq != Hk, cos broadcast over the batch, partial rotary (GPT-NeoX's
    function), one head or several per program; swapping the sign of sin is far off (negative control)."""
    cases = report["rotary"]
    assert len(cases) == 9
    for case in cases:
        tol = TOL[case["dtype"]]
        assert case["same_dtype"], case
        assert case["ref_err"] < tol, case
        assert case["hf_err"] < tol, case  # HF rounds each of its three ops to 16 bits, the kernel once
        assert case["sin_sign_err"] > 0.5, case
        assert case["grouped_bitwise"], case


EXPECTED = {  # arch -> (RMSNorm class, fused?) or None where the model normalises with LayerNorm
    "llama": ("LlamaRMSNorm", True), "qwen3": ("Qwen3RMSNorm", True), "mistral": ("MistralRMSNorm", True),
    "qwen2": ("Qwen2RMSNorm", True), "gemma": ("GemmaRMSNorm", False), "phi": None, "stablelm": None,
    "gpt_neox": None,
}
GATED_SILU_MLP = {  # arch -> its MLP class where it is a gated MLP with SiLU (Gemma's is GELU; Phi, GPT-NeoX: fc1/fc2)
    "llama": "LlamaMLP", "qwen3": "Qwen3MLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP", "stablelm": "StableLmMLP",
}


def test_fused_ops_decisions_and_logits_on_tiny_models(report):
    """Verified once, every architecture's rotary runs fused (partial rotary included) and so does every
    Llama-style norm; Gemma's norm (``1 + weight``) is rejected. Logits with fused ops match the unpatched ones,
    and the fused kernels really ran."""
    runs = report["models"]
    assert {(r["arch"], r["dtype"]) for r in runs} >= {(a, "float32") for a in EXPECTED if a != "qwen2"}
    for run in runs:
        norm = EXPECTED[run["arch"]]
        want = {f"{run['modeling']}.apply_rotary_pos_emb": True}
        if norm is not None:
            want[norm[0]] = norm[1]
        mlp = GATED_SILU_MLP.get(run["arch"])
        if mlp is not None:
            want[mlp] = True
        assert run["decisions"] == want, run
        assert run["mlp_modules"] == (2 if mlp else 0), run
        assert (run["calls"]["silu_mul"] > 0) == (mlp is not None), run
        assert run["verify_returns_original"], run
        assert run["inside"]["rotary"], run
        assert len(run["inside"]["patched"]) == run["rms_norm_modules"] + run["mlp_modules"], run
        assert run["calls"]["rotate_qk"] > 0, run
        fused_norms = norm is not None and norm[1]
        assert (run["calls"]["rms_norm"] > 0) == fused_norms, run
        tol = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}[run["dtype"]]
        assert run["active_err"] < tol, run
    qwen3 = next(r for r in runs if r["arch"] == "qwen3")
    assert qwen3["rms_norm_modules"] == 2 * 4 + 1  # input, post-attention, q_norm, k_norm per layer; final
    assert qwen3["calls"]["rms_norm"] == qwen3["rms_norm_modules"]


def test_silu_mul_matches_float64_and_the_eager_mlp_product(report):
    """Odd sizes (a partial last tile), transposed inputs; gate and up swapped is far off (negative control)."""
    cases = report["silu_mul"]
    assert len(cases) == 6
    for case in cases:
        tol = TOL[case["dtype"]]
        assert case["same_dtype"], case
        assert case["ref_err"] < tol, case
        assert case["hf_err"] < tol, case  # the eager product rounds silu(gate) first, the kernel once
        assert case["strided_err"] < tol, case
        assert case["swapped_err"] > 0.1, case


def test_an_mlp_of_another_formula_is_not_fused(report):
    swapped = report["swapped_mlp"]
    assert swapped["decisions"] == {"SwappedMLP": False}, swapped
    assert swapped["calls"]["silu_mul"] == 0 and swapped["bitwise"], swapped


def test_exit_restores_the_model(report):
    for run in report["models"]:
        assert run["left_after_exit"] == [], run
        assert run["rotary_restored"], run
        assert run["after_exit_bitwise"], run


def test_nothing_is_fused_on_cpu_without_allow_cpu(report):
    cpu = report["cpu_not_allowed"]
    assert cpu["decisions"] == {} and cpu["calls"] == {"rms_norm": 0, "rotate_qk": 0, "silu_mul": 0}, cpu
    assert cpu["bitwise"], cpu


def test_only_inference_calls_of_the_exact_pattern_are_fused(report):
    """With autograd on, and for a rotary call with an extra argument, the original runs even once verified."""
    calls = report["call_patterns"]
    assert all(calls["decisions"].values()) and len(calls["decisions"]) == 3, calls
    assert calls["grad_calls"] == {"rms_norm": 0, "rotate_qk": 0, "silu_mul": 0} and calls["grad_bitwise"], calls
    assert calls["keyword_calls"] == 0 and calls["keyword_bitwise"], calls
    assert calls["position_calls"] == 1, calls  # positive control: the same call without the keyword is fused


def test_a_mismatch_is_final_and_verify_returns_the_original(report):
    flaky = report["flaky"]
    assert [s["decision"] for s in flaky["steps"]] == [True, False, False], flaky
    assert all(s["original"] for s in flaky["steps"]), flaky
    assert flaky["calls"]["rms_norm"] == 0 and flaky["after_bitwise"], flaky
    assert "enter the FusedOps first" in flaky["verify_outside"], flaky


def test_entries_are_counted_and_the_shared_instance_is_one_per_model(report):
    nesting = report["nesting"]
    assert nesting["inner"] and nesting["after_inner_exit"], nesting
    assert nesting["after_outer_exit"] == [True], nesting  # nothing left patched, the rotary restored
    assert nesting["shared_is_one"], nesting


def test_block_encoder_runs_verified_fused_kernels(report):
    """The encoder's first batch verifies (and returns the model's own numbers); later batches run the fused
    kernels within float32 rounding of the unfused encoder; Gemma's norm stays its own; nothing stays patched.
    A wrong rotary sign in the fused kernel is far off (negative control)."""
    for arch, run in report["encoder"].items():
        assert run["first_bitwise"], (arch, run)
        assert run["calls"]["rotate_qk"] > 0, (arch, run)
        assert (run["calls"]["rms_norm"] > 0) == (arch != "gemma"), (arch, run)
        assert run["err"] < 1e-5, (arch, run)
        assert run["wrong_sign_err"] > 1e-2, (arch, run)
        assert run["left_after"] == [], (arch, run)
        assert all(run["decisions"].values()) == (arch != "gemma"), (arch, run)
