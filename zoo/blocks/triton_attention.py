"""A fused Triton kernel for the per-pair part of CASC Eqs. (4)-(7), after the region-word contraction.

For one length group of the fast scorer (zoo/blocks/fast_attention.py) the PyTorch path makes ~20 passes over
the [I, R, n, l] cosine tensor (activation, query norms, exp, sums, weighted sums, Gram quadratic forms,
pooling). This kernel reads each pair's [R, l] cosine tile once and writes two numbers, S_I2T and S_T2I, with
the same formulas (l2-family normalisations only, every recipe's):

  I2T (regions attend over words):  f_j = lambda_1 / |act[:, j]|,  E = exp(act * f - max_j),  w = E * |t_j|,
      cos_r = (w x)_r / sqrt(max(w U w^T, (sum_j E)^2 eps^2)),  pooled over regions (mean or LogSumExp)
  T2I (words attend over regions):  f_r = lambda_2 / |act[r, :]|,  E = exp(act * f - max_r),  w = E * |v_r|,
      cos_j = (w x)_j / sqrt(max(w^T G w, (sum_r E)^2 eps^2)),  pooled over words

with U, G the unit-vector Grams of the caption's words and the image's regions. One program per pair; the
contraction itself stays a (cuBLAS) matrix product. Everything is float32 (`tl.dot` with input_precision
"ieee", not tf32).

Opt-in: `ZOO_KERNEL=triton` or `cross_attention_similarity(..., kernel="triton")`. It is NOT the default:
it has been tested only in Triton's interpreter on the CPU (TRITON_INTERPRET=1, what CI runs) and
never measured on a GPU, so the measured PyTorch path stays the default until `make bench --kernel triton`
on a GPU says otherwise. On CPU tensors only the interpreter runs it (slowly: tests only).
"""
from __future__ import annotations

import functools

import torch

from .functional import EPS

try:  # optional: CUDA builds of torch bring it; `pip install triton` for the CPU interpreter (tests)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = tl = None

L2_NORMS = {"l2": 0, "clipped_l2": 1, "relu_l2": 2}  # activation code: none, LeakyReLU(0.1), ReLU


def available() -> bool:
    return triton is not None


def _pool(per, valid, count, temp, LSE: tl.constexpr):
    """CASC Eq. (7) over the real entries of `per`: LogSumExp with temperature `temp`, or the mean of `count`."""
    if LSE:
        v = tl.where(valid, per * temp, -float("inf"))
        m = tl.max(v, axis=0)
        pooled = (m + tl.log(tl.sum(tl.exp(v - m), axis=0))) / temp
    else:
        pooled = tl.sum(tl.where(valid, per, 0.0), axis=0) / count
    return pooled


if triton is not None:  # a device function the kernel calls (jit-compiled, or interpreted under TRITON_INTERPRET=1)
    _pool = triton.jit(_pool)


def _pair_scores(x_ptr, sx_i, sx_r, sx_c, sx_j, wn_ptr, wg_ptr, rn_ptr, rg_ptr, s1_ptr, s2_ptr, so_i, so_c,
                 n_reg, n_len, lam1, lam2, temp, eps2,
                 ACT: tl.constexpr, DO_I2T: tl.constexpr, DO_T2I: tl.constexpr, LSE_I2T: tl.constexpr,
                 LSE_T2I: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr):
    c = tl.program_id(0)
    i = tl.program_id(1)
    r = tl.arange(0, BR)
    j = tl.arange(0, BL)
    rv = r < n_reg
    jv = j < n_len
    valid = rv[:, None] & jv[None, :]
    x = tl.load(x_ptr + i * sx_i + r[:, None] * sx_r + c * sx_c + j[None, :] * sx_j, mask=valid, other=0.0)
    if ACT == 1:
        act = tl.where(x > 0, x, 0.1 * x)
    elif ACT == 2:
        act = tl.maximum(x, 0.0)
    else:
        act = x
    sq = act * act
    if DO_I2T:
        s = tl.sum(sq, axis=0)  # per word: the query (region) dim
        f = tl.where(s > eps2, lam1 / tl.sqrt(tl.maximum(s, eps2)), 0.0)
        # softmax over the real words; a padded region's row stays finite (0 on real words), never pooled
        z = tl.where(jv[None, :], tl.where(rv[:, None], act * f[None, :], 0.0), -float("inf"))
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        denom = tl.sum(e, axis=1)
        wn = tl.load(wn_ptr + c * n_len + j, mask=jv, other=0.0)
        w = e * wn[None, :]
        num = tl.sum(w * x, axis=1)
        u = tl.load(wg_ptr + c * n_len * n_len + j[:, None] * n_len + j[None, :], mask=jv[:, None] & jv[None, :],
                    other=0.0)
        quad = tl.sum(tl.dot(w, u, input_precision="ieee") * w, axis=1)
        per_region = num / tl.sqrt(tl.maximum(quad, denom * denom * eps2))
        tl.store(s1_ptr + i * so_i + c * so_c, _pool(per_region, rv, n_reg, temp, LSE_I2T))
    if DO_T2I:
        s = tl.sum(sq, axis=1)  # per region: the query (word) dim
        f = tl.where(s > eps2, lam2 / tl.sqrt(tl.maximum(s, eps2)), 0.0)
        z = tl.where(rv[:, None], act * f[:, None], -float("inf"))
        e = tl.exp(z - tl.max(z, axis=0)[None, :])
        denom = tl.sum(e, axis=0)
        rn = tl.load(rn_ptr + i * n_reg + r, mask=rv, other=0.0)
        w = e * rn[:, None]
        num = tl.sum(w * x, axis=0)
        g = tl.load(rg_ptr + i * n_reg * n_reg + r[:, None] * n_reg + r[None, :], mask=rv[:, None] & rv[None, :],
                    other=0.0)
        quad = tl.sum(tl.dot(g, w, input_precision="ieee") * w, axis=0)
        per_word = num / tl.sqrt(tl.maximum(quad, denom * denom * eps2))
        tl.store(s2_ptr + i * so_i + c * so_c, _pool(per_word, jv, n_len, temp, LSE_T2I))


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1 when triton was first imported): kernels run on CPU tensors."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


@functools.lru_cache(maxsize=1)
def _kernel():
    if triton is None:
        raise RuntimeError("kernel='triton' needs the triton package (CUDA builds of torch bring it; on the CPU "
                           "`pip install triton` runs it in Triton's interpreter) or use kernel='torch'")
    return triton.jit(_pair_scores)  # an interpreted function when TRITON_INTERPRET=1


def _block(n: int) -> int:
    return max(16, 1 << (max(1, n) - 1).bit_length())  # a power of two >= 16 (tl.dot's smallest tile)


def group_scores(x: torch.Tensor, wn: torch.Tensor, wg: torch.Tensor | None, rn: torch.Tensor,
                 rg: torch.Tensor | None, cfg) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(S_I2T [I, n], S_T2I [I, n]) of one length group, as fast_attention._group_scores (evaluation only).

    x [I, R, n, l] float32 cosines (any strides), wn [n, l] word norms, wg [n, l, l] unit-word Grams (i2t),
    rn [I, R] region norms, rg [I, R, R] unit-region Grams (t2i); cfg: fast_attention._Config.
    """
    if cfg.norm not in L2_NORMS:
        raise ValueError(f"the Triton kernel covers the l2-family score normalisations {tuple(L2_NORMS)}, "
                         f"not {cfg.norm!r}: use kernel='torch'")
    n_img, n_reg, n, l = x.shape
    s1 = torch.empty(n_img, n, dtype=torch.float32, device=x.device) if cfg.i2t else None
    s2 = torch.empty(n_img, n, dtype=torch.float32, device=x.device) if cfg.t2i else None
    if n_img == 0 or n == 0:
        return s1, s2
    out = s1 if s1 is not None else s2
    dummy = x.new_zeros(1)
    x = x.float()
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError("kernel='triton' on CPU tensors runs only in Triton's interpreter: start Python with "
                           "TRITON_INTERPRET=1 (tests do), or use kernel='torch'")
    kernel = _kernel()
    kernel[(n, n_img)](
        x, *x.stride(), wn.float().contiguous(), wg.float().contiguous() if wg is not None else dummy,
        rn.float().contiguous(), rg.float().contiguous() if rg is not None else dummy,
        s1 if s1 is not None else dummy, s2 if s2 is not None else dummy, out.stride(0), out.stride(1),
        n_reg, l, float(cfg.lambda_i2t), float(cfg.lambda_t2i), float(cfg.lse_temperature), EPS * EPS,
        ACT=L2_NORMS[cfg.norm], DO_I2T=bool(cfg.i2t), DO_T2I=bool(cfg.t2i), LSE_I2T=cfg.agg_i2t == "lse",
        LSE_T2I=cfg.agg_t2i == "lse", BR=_block(n_reg), BL=_block(l))
    return s1, s2
