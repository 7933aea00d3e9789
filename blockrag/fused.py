"""Fused Triton kernels for a decoder's small elementwise ops, swapped in only where they give the same numbers.

Inside a CUDA graph of a forward over a few dozen tokens, every elementwise op of an RMSNorm or of
``apply_rotary_pos_emb`` is a kernel of its own; ``rms_norm`` and ``rotate_qk`` do each in one launch. In a
gated MLP (``down(act(gate(x)) * up(x))`` with SiLU), ``silu_mul`` reads the two projections once and writes
the product once (two launches and a rounded intermediate in the eager code): at encoding's thousands of
tokens that is memory traffic, not launches.
Architectures differ in small ways (Gemma's norm multiplies by ``1 + weight``, GPT-NeoX rotates a slice of
the head and passes the rest), so nothing is swapped by name alone: ``FusedOps.verify()`` runs both versions
on the model's real inputs and keeps the fused one per norm class and per modeling module only where the
numbers agree. This module knows nothing about graphs, caches or the engine; it patches a model and restores it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from types import ModuleType

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

__all__ = ["FusedOps", "rms_norm", "rotate_qk", "silu_mul"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rms_norm_kernel(x, weight, out, row_stride, col_stride, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    h = tl.load(x + row * row_stride + cols * col_stride, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(h * h, axis=0) / n
    y = (h * tl.rsqrt(variance + eps)).to(x.dtype.element_ty)  # rounded to the input dtype, as HF does
    w = tl.load(weight + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * n + cols, (w * y.to(tl.float32)).to(out.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm in one launch: ``weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype)``, fp32 math.

    Args:
        x: (..., N) float16 / bfloat16 / float32, any strides.
        weight: (N,) float16 / bfloat16 / float32.
        eps: added to the mean square.
    Returns:
        (..., N) contiguous, of ``torch.result_type`` of weight and x (the dtype ``weight * y`` has in torch).
    """
    n = x.shape[-1]
    rows = x.reshape(-1, n)  # a view where the strides allow one, else a copy (an allocation: fine in capture)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0] == 0:
        return out
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, rows.stride(0), rows.stride(1), n, eps,
                                       BLOCK=block, num_warps=min(16, max(1, block // 512)))
    return out


@triton.jit
def _rotate_head(src, dst, t, t_ok, t_stride, dim_stride, c1, s1, c2, s2,
                 D: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, REST: tl.constexpr,
                 REST_P2: tl.constexpr):
    # one head, a tile of tokens: src rows at t * t_stride, dst rows contiguous (t * D)
    d = tl.arange(0, HALF_P2)
    m = t_ok[:, None] & (d < HALF)[None, :]
    rows = src + t[:, None] * t_stride
    x1 = tl.load(rows + d[None, :] * dim_stride, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(rows + (HALF + d)[None, :] * dim_stride, mask=m, other=0.0).to(tl.float32)
    out_ty = dst.dtype.element_ty
    out = dst + t[:, None] * D
    tl.store(out + d[None, :], (x1 * c1 - x2 * s1).to(out_ty), mask=m)
    tl.store(out + HALF + d[None, :], (x2 * c2 + x1 * s2).to(out_ty), mask=m)
    if REST > 0:  # dims past the rotary ones pass through (GPT-NeoX's partial rotary)
        r = tl.arange(0, REST_P2)
        mr = t_ok[:, None] & (r < REST)[None, :]
        x = tl.load(rows + (2 * HALF + r)[None, :] * dim_stride, mask=mr, other=0.0)
        tl.store(out + 2 * HALF + r[None, :], x.to(out_ty), mask=mr)


@triton.jit
def _rotary_kernel(q, k, cos, sin, q_out, k_out, T, HQ, HK, PER,
                   q_sb, q_sh, q_st, q_sd, k_sb, k_sh, k_st, k_sd, c_sb, c_st, c_sd, s_sb, s_st, s_sd,
                   D: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, REST: tl.constexpr,
                   REST_P2: tl.constexpr, BLOCK_T: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)  # (batch row, tile of BLOCK_T tokens)
    group = tl.program_id(1)  # heads group * PER ..: 0..HQ-1 query heads, HQ..HQ+HK-1 key heads
    tiles = tl.cdiv(T, BLOCK_T)
    b = tile // tiles
    t = (tile % tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    d = tl.arange(0, HALF_P2)
    m = t_ok[:, None] & (d < HALF)[None, :]
    c_rows = cos + b * c_sb + t[:, None] * c_st
    s_rows = sin + b * s_sb + t[:, None] * s_st
    c1 = tl.load(c_rows + d[None, :] * c_sd, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(c_rows + (HALF + d)[None, :] * c_sd, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(s_rows + d[None, :] * s_sd, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(s_rows + (HALF + d)[None, :] * s_sd, mask=m, other=0.0).to(tl.float32)
    for i in range(PER):  # the angles are loaded once for all of the group's heads
        head = group * PER + i
        if head < HQ:
            _rotate_head(q + b * q_sb + head * q_sh, q_out + (b * HQ + head) * T * D, t, t_ok, q_st, q_sd,
                         c1, s1, c2, s2, D, HALF, HALF_P2, REST, REST_P2)
        elif head < HQ + HK:
            kh = head - HQ
            _rotate_head(k + b * k_sb + kh * k_sh, k_out + (b * HK + kh) * T * D, t, t_ok, k_st, k_sd,
                         c1, s1, c2, s2, D, HALF, HALF_P2, REST, REST_P2)


def rotate_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, programs: int = 1024) -> tuple[Tensor, Tensor]:
    """HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` (rotate-half) for queries and keys in one launch.

    ``x * cos + rotate_half(x) * sin`` on the first R dims in fp32 with one rounding; dims R..D are copied, as
    GPT-NeoX's version does (Llama's requires R == D).

    Args:
        q: (B, Hq, T, D) float16 / bfloat16 / float32, any strides (HF passes ``.view(...).transpose(1, 2)``).
        k: (B, Hk, T, D), any strides.
        cos, sin: (B or 1, T, R), any strides; R even, R <= D.
        programs: programs to aim at; past this many (token tile, head) pairs, a program takes several heads.
    Returns:
        (q_embed, k_embed): contiguous (B, Hq, T, D) and (B, Hk, T, D), each of the dtype torch promotes
        x, cos and sin to.
    """
    batch, q_heads, tokens, dim = q.shape
    k_heads, rotary = k.shape[1], cos.shape[-1]
    cos, sin = cos.expand(batch, tokens, rotary), sin.expand(batch, tokens, rotary)  # stride 0 where broadcast
    angle_dtype = torch.promote_types(cos.dtype, sin.dtype)
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, angle_dtype), device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, angle_dtype), device=k.device)
    if q.numel() == 0 or k.numel() == 0:
        return q_out, k_out
    half, rest = rotary // 2, dim - rotary
    # NOTE: a tile of tokens per program: one program per (token, head) left a 16 x 513-token batch at ~25 GB/s.
    # Where there are many tiles (encoding), a program takes several heads: one per (tile, head) moved 4 KB each
    # and re-read the angles for every head.
    block_t = min(16, triton.next_power_of_2(tokens))
    tiles, heads = batch * triton.cdiv(tokens, block_t), q_heads + k_heads
    per = triton.cdiv(heads, min(heads, triton.cdiv(programs, tiles)))
    _rotary_kernel[(tiles, triton.cdiv(heads, per))](
        q, k, cos, sin, q_out, k_out, tokens, q_heads, k_heads, per, *q.stride(), *k.stride(), *cos.stride(),
        *sin.stride(), D=dim, HALF=half, HALF_P2=triton.next_power_of_2(half), REST=rest,
        REST_P2=triton.next_power_of_2(max(1, rest)), BLOCK_T=block_t, num_warps=2 if block_t * dim >= 1024 else 1,
    )
    return q_out, k_out


@triton.jit
def _silu_mul_kernel(gate, up, out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offs, (g * tl.sigmoid(g) * u).to(out.dtype.element_ty), mask=mask)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` in one launch: fp32 math, rounded once to the result dtype.

    Args:
        gate, up: (..., N) of one shape, float16 / bfloat16 / float32 (copied first where not contiguous).
    Returns:
        (..., N) contiguous, of the dtype torch promotes gate and up to.
    """
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = out.numel()
    if n:
        block = 4096
        _silu_mul_kernel[(triton.cdiv(n, block),)](gate.contiguous(), up.contiguous(), out, n, BLOCK=block,
                                                   num_warps=8)
    return out


def _tolerance(*dtypes: torch.dtype) -> float:
    """Relative tolerance of verify() for results computed from tensors of these dtypes."""
    # NOTE: bfloat16 keeps 8 significant bits, so 2**-7 is one of its ulps; the fused norm rounds the normalised
    # value once like HF but from a slightly different fp32 sum, and where that rounding flips, the product with
    # the weight can land two ulps away (seen on a tiny Qwen2: 0.031 off at |x| 2.4, max 3.9). 2**-5 still
    # rejects any wrong formula (those are off by order 1).
    if torch.bfloat16 in dtypes:
        return 2.0**-5
    return 2.0**-7 if torch.float16 in dtypes else 1e-5


def _agree(fused, original, tol: float) -> bool:
    """Whether every fused tensor is within ``tol * max(1, max|original|)`` of the original one, with the same
    shape and dtype. A NaN or inf on either side counts as a mismatch. Reads the results on the host (syncs)."""
    pairs = zip(fused, original) if isinstance(original, (tuple, list)) else [(fused, original)]
    if isinstance(original, (tuple, list)) and len(fused) != len(original):
        return False
    for got, want in pairs:
        if not isinstance(want, Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return False
        if want.numel() == 0:
            continue
        err = (got.float() - want.float()).abs().max().item()
        if not err <= tol * max(1.0, want.float().abs().max().item()):  # `not <=`: NaN fails
            return False
    return True


def _norm_eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, (float, int)) and not isinstance(eps, bool):
            return float(eps)
    return None


def _is_norm_candidate(module: nn.Module) -> bool:
    """Named like an RMSNorm, with a 1-D weight and an epsilon; whether it computes Llama's is for verify()."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and _norm_eps(module) is not None)


def _is_silu(module) -> bool:
    # NOTE: transformers' "silu" activation is nn.SiLU or its own SiLUActivation, depending on the version
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def _is_mlp_candidate(module: nn.Module) -> bool:
    """A gated MLP with a SiLU activation (Llama's layout); whether its forward is ``down(silu(gate(x)) * up(x))``
    is for verify()."""
    return (all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(getattr(module, "act_fn", None)))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class FusedOps:
    """Context manager: while active, verified RMSNorm and gated-MLP modules of ``model`` and the modeling
    modules' ``apply_rotary_pos_emb`` run fused Triton kernels.

    Usage: ``fused = FusedOps(model); with fused: with fused.verify(): warm up; capture; replay``. Only
    ``verify()`` decides: a norm class or modeling module whose fused result matched on every verified call
    (MLP: class) runs fused afterwards; one that never ran under ``verify()`` keeps its original code, and one that
    differed once keeps it for good. Calls the kernels do not cover (tensors not on CUDA, autograd, other
    arguments, shapes that do not fit) always run the original. Decisions outlive the context: entering again
    reuses them.

    Entering is counted: the model is patched on the first entry and restored on the last exit, so one
    instance may be active in several threads at once (``FusedOps.of(model)`` gives the model's shared one).

    NOTE: the rotary function is patched in the modeling module (the attention forward looks it up there at
    call time), so while active it applies to every model of that architecture in the process; nest several
    instances only in LIFO order (share one per model instead).
    """

    _shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _shared_lock = threading.Lock()

    @classmethod
    def of(cls, model: nn.Module) -> FusedOps:
        """The model's shared instance (CUDA tensors only), made on first use; its decisions serve every user."""
        with cls._shared_lock:
            fused = cls._shared.get(model)
            if fused is None:
                fused = cls._shared[model] = cls(model)
            return fused

    def __init__(self, model: nn.Module, allow_cpu: bool = False):
        """Args:
        model: a transformers model (any architecture); nothing is changed until the context is entered.
        allow_cpu: fuse CPU tensors too (for tests under TRITON_INTERPRET=1); otherwise only CUDA ones.
        """
        self.model = model
        self.allow_cpu = allow_cpu
        self._decisions: dict[str, bool] = {}
        self._verifying = False
        self._entered = 0  # active entries; patched while > 0
        self._lock = threading.Lock()
        self._forwards: dict[nn.Module, Callable] = {}  # patched module (norm, MLP) -> its instance-level forward
        self._rotary: dict[ModuleType, Callable] = {}  # modeling module -> its original apply_rotary_pos_emb

    @property
    def decisions(self) -> dict[str, bool]:
        """Verified so far: norm or MLP class name, or ``<modeling module>.apply_rotary_pos_emb`` -> fused or not."""
        return dict(self._decisions)

    @contextlib.contextmanager
    def verify(self) -> Iterator[FusedOps]:
        """While in it, each patched call runs the original and the fused version, compares them on the host
        (a sync) and returns the original result. Run the warm-up forwards in it; a CUDA graph captured inside
        it records the calls as decided so far, without comparing."""
        if not self._entered:
            raise RuntimeError("FusedOps.verify() checks the patched calls, and none is patched: enter the "
                               "FusedOps first (`with fused: with fused.verify(): ...`)")
        self._verifying = True
        try:
            yield self
        finally:
            self._verifying = False

    def __enter__(self) -> FusedOps:
        with self._lock:
            self._entered += 1
            if self._entered == 1:
                self._patch()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._entered -= 1
            if self._entered == 0:
                self._restore()

    def _patch(self) -> None:
        for module in self.model.modules():
            # NOTE: a module that already has an instance-level forward (an accelerate hook moving weights,
            # say) keeps it: the fused forward would skip what that wrapper does.
            if "forward" in vars(module):
                continue
            if _is_norm_candidate(module):
                self._forwards[module] = module.forward = self._norm_forward(module)
            elif _is_mlp_candidate(module):
                self._forwards[module] = module.forward = self._mlp_forward(module)
        for name in sorted({type(module).__module__ for module in self.model.modules()}):
            namespace = sys.modules.get(name)
            original = getattr(namespace, "apply_rotary_pos_emb", None)
            if callable(original):
                self._rotary[namespace] = original
                namespace.apply_rotary_pos_emb = self._rotary_function(f"{name}.apply_rotary_pos_emb", original)

    def _restore(self) -> None:
        for module, forward in self._forwards.items():
            if vars(module).get("forward") is forward:
                del module.forward
        for namespace, original in self._rotary.items():
            namespace.apply_rotary_pos_emb = original
        self._forwards, self._rotary = {}, {}

    def _fusable(self, *tensors: Tensor) -> bool:
        first = tensors[0]
        return (all(t.dtype in _FLOATS and t.device == first.device for t in tensors)
                and (first.is_cuda or self.allow_cpu)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))  # no backward

    def _run(self, key: str, original: Callable, fused: Callable, tol: float):
        """The call's result: original or fused by the decision for ``key``; under verify(), both, compared,
        and the original returned. Under a CUDA graph capture nothing is compared (that needs the host): calls
        run as decided so far."""
        decision = self._decisions.get(key)
        if decision is False:
            return original()
        if not self._verifying or _capturing():
            return fused() if decision else original()
        want = original()
        try:
            got = fused()
        except Exception:  # noqa: BLE001 (a kernel this device cannot build or run: the original it is, for good)
            self._decisions[key] = False
        else:
            self._decisions[key] = _agree(got, want, tol)
        return want

    def _norm_forward(self, module: nn.Module) -> Callable:
        plain = module.forward
        key = type(module).__name__

        @functools.wraps(plain)
        def forward(*args, **kwargs):
            original = functools.partial(plain, *args, **kwargs)
            x, weight = (args[0] if args else None), module.weight
            if not (len(args) == 1 and not kwargs and isinstance(x, Tensor) and x.dim() >= 1
                    and x.shape[-1] == weight.numel() and self._fusable(x, weight)):
                return original()
            fused = functools.partial(rms_norm, x, weight, _norm_eps(module))
            return self._run(key, original, fused, _tolerance(x.dtype, weight.dtype))

        return forward

    def _mlp_forward(self, module: nn.Module) -> Callable:
        plain = module.forward
        key = type(module).__name__

        @functools.wraps(plain)
        def forward(*args, **kwargs):
            original = functools.partial(plain, *args, **kwargs)
            x = args[0] if args else None
            if not (len(args) == 1 and not kwargs and isinstance(x, Tensor) and x.dim() >= 1
                    and self._fusable(x, *module.parameters())):
                return original()

            def fused():
                return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))

            return self._run(key, fused=fused, original=original, tol=_tolerance(x.dtype))

        return forward

    def _rotary_function(self, key: str, plain: Callable) -> Callable:
        @functools.wraps(plain)
        def apply_rotary_pos_emb(*args, **kwargs):
            original = functools.partial(plain, *args, **kwargs)
            # only the exact call (q, k, cos, sin): another unsqueeze_dim or an older signature runs the original
            if not (len(args) == 4 and not kwargs and all(isinstance(a, Tensor) for a in args)
                    and _rotary_fits(*args) and self._fusable(*args)):
                return original()
            return self._run(key, original, functools.partial(rotate_qk, *args), _tolerance(*(a.dtype for a in args)))

        return apply_rotary_pos_emb


def _rotary_fits(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Shapes rotate_qk covers: (B, Hq, T, D), (B, Hk, T, D), (B or 1, T or 1, R) with R even and <= D."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    batch, _, tokens, dim = q.shape
    rotary = cos.shape[-1]
    return (k.shape[0] == batch and k.shape[2:] == q.shape[2:] and cos.shape[0] in (1, batch)
            and cos.shape[1] in (1, tokens) and rotary % 2 == 0 and 0 < rotary <= dim)
