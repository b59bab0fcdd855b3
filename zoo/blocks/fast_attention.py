"""Fast exact CASC/SCAN cross-attention scoring (CASC Eqs. (3)-(7)); the default path.

Computes the same numbers as the reference functions in `attention.py` (`region_word_scores` +
`i2t_similarity` / `t2i_similarity`, kept as the slow reference and tested against this file), with less work:

1. **Captions bucketed by exact length.** The real words of a block are packed ([W, d], no padding) and
   every group of captions of one length l is scored as a dense [I, R, n, l] tensor: no padding in the
   contraction, no masks, no masked_fill/where passes anywhere after it.
2. **One contraction, shared by both directions.** cos = regions_unit @ words_unit^T is computed once per
   chunk; the score activation (LeakyReLU for 'clipped_l2') and its square are shared by I2T and T2I.
3. **Softmax folded into the cosine.** With E = exp(lambda * s_hat) (un-normalised attention weights) and
   D = sum E, the reference's cos(q, sum_k alpha_k c_k) = num / sqrt(max(sq, eps^2)) with num = sum_k E_k |c_k|
   cos_k / D and sq = (E|c|)^T U (E|c|) / D^2 equals num' / sqrt(max(sq', eps^2 D^2)) on the un-normalised
   E: the division by D over the big tensor is never done. The max-subtraction of softmax is skipped when
   |lambda * s_hat| <= 80 can be proved (then exp neither overflows nor underflows in float32); otherwise
   it is done.
4. **Cache-sized chunks and in-place ops** when no gradient is needed (evaluation on CPU): the [Ic, R, cols]
   working set stays within a few MB, so each elementwise pass runs from cache, and buffers are reused.
5. Everything after the contraction is float32 (the contraction itself follows autocast, e.g. bf16).

The Gram quadratic forms (||sum_k w_k u_k||^2 = w^T U w) are the reference's; only the bookkeeping changed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .functional import EPS, SCORE_NORMS, wide

EPS2 = EPS * EPS
_NO_MAX_BOUND = 80.0  # exp(+-80) is finite and normal in float32: no max-subtraction needed below this

# working-set size (elements of one [Ic, R, m, l] float32 slab) for cache-resident elementwise passes on CPU
CPU_CHUNK_ELEMENTS = 1 << 21  # 8 MB: fits L2+L3; larger chunks = fewer OpenMP regions (matters on a busy machine)


def _check(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, norm: str, agg: str) -> None:
    if images.dim() != 3 or captions.dim() != 3 or images.shape[-1] != captions.shape[-1]:
        raise ValueError(f"expected images [I, R, d] and captions [C, L, d], got {tuple(images.shape)} and "
                         f"{tuple(captions.shape)}")
    if lengths.dim() != 1 or lengths.shape[0] != captions.shape[0]:
        raise ValueError(f"expected lengths [C] for {captions.shape[0]} captions, got {tuple(lengths.shape)}")
    if norm not in SCORE_NORMS:
        raise ValueError(f"unknown score normalisation {norm!r}: use one of {SCORE_NORMS}")
    if agg not in ("mean", "lse"):
        raise ValueError(f"unknown aggregation {agg!r}: use 'mean' or 'lse'")


def length_groups(lengths: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Captions bucketed by exact length: (order, [(start, count, length), ...]) over captions[order].

    `order` sorts by length, longest first (stable), so a block that score_blockwise already sorted keeps
    its order. Each group is a contiguous run of `order`.
    """
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()
    if sorted_lengths and sorted_lengths[-1] < 1:
        raise ValueError("every caption needs at least one word (a length-0 caption has no score)")
    groups, start = [], 0
    while start < len(sorted_lengths):
        l = sorted_lengths[start]
        end = start
        while end < len(sorted_lengths) and sorted_lengths[end] == l:
            end += 1
        groups.append((start, end - start, int(l)))
        start = end
    return order, groups


def _activation(x: torch.Tensor, norm: str) -> torch.Tensor:
    """The activation before the query normalisation (a new tensor), or x itself when there is none."""
    if norm.startswith("clipped"):
        return F.leaky_relu(x, 0.1)
    if norm.startswith("relu"):
        return F.relu(x)
    return x


def _query_factor(act: torch.Tensor, sq: torch.Tensor | None, norm: str, query_dim: int, smooth: float):
    """lambda / |act|_query for the l2/l1 normalisations (functional.normalize_scores without masks)."""
    if norm.endswith("l2"):
        s = sq.sum(query_dim, keepdim=True)
        return torch.where(s > EPS2, torch.rsqrt(s.clamp_min(EPS2)), torch.zeros_like(s)).mul_(smooth)
    if norm.endswith("l1"):
        return smooth / act.abs().sum(query_dim, keepdim=True).clamp_min(EPS)
    return None


def _logits(x: torch.Tensor, act: torch.Tensor, factor: torch.Tensor | None, norm: str, query_dim: int,
            smooth: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """lambda * normalize_scores(s) over the query dim; `out`: scratch buffer to write to (no-grad path)."""
    if norm == "softmax":
        p = torch.softmax(x, dim=query_dim)
        return p.mul_(smooth) if not torch.is_grad_enabled() else p * smooth
    f = smooth if factor is None else factor
    return torch.mul(act, f, out=out) if out is not None else act * f


def _exp(z: torch.Tensor, dim: int, smooth: float, inplace: bool) -> torch.Tensor:
    """Un-normalised softmax weights exp(z - m): m = 0 when |z| <= |lambda| * 1.01 <= 80 (every normalisation
    keeps |s_hat| <= 1 up to rounding), else the max over `dim` as in torch.softmax."""
    if abs(smooth) * 1.01 > _NO_MAX_BOUND:
        z = z - z.amax(dim, keepdim=True).detach()
        inplace = True
    return z.exp_() if inplace else z.exp()


def _pool(x: torch.Tensor, dim: int, agg: str, t: float) -> torch.Tensor:
    if agg == "mean":
        return x.mean(dim)
    return torch.logsumexp(x * t, dim=dim) / t


def _i2t_group(x, z, word_norms, word_gram, smooth, agg, t, inplace, weights=None):
    """x [I, R, n, l] cosines, z the logits; regions (dim 1) attend over words (dim 3). -> [I, n].

    weights: a list to append CASC Eq. (10)'s word weights to, the mean over regions of the attention
    weights, [I, n, l] (all l words of a length group are real)."""
    e = _exp(z, 3, smooth, inplace)
    denom = e.sum(3)  # [I, R, n]
    if weights is not None:
        weights.append((e / denom.unsqueeze(3)).mean(1))
    e = e.mul_(word_norms) if inplace else e * word_norms  # w_k = E_k |c_k|
    num = (e * x).sum(3)
    # quadratic form per caption c: [I*R, l] @ U_c[l, l]
    uw = torch.einsum("ircj,cjk->irck", e, word_gram)
    quad = (uw.mul_(e) if inplace else uw * e).sum(3)
    per_region = num / torch.sqrt(torch.maximum(quad, denom * denom * EPS2))
    return _pool(per_region, 1, agg, t)


def _t2i_group(x, z, region_norms, region_gram, smooth, agg, t, inplace, weights=None):
    """x [I, R, n, l] cosines, z the logits; words (dim 3) attend over regions (dim 1). -> [I, n].

    weights: a list to append CASC Eq. (10)'s region weights to, the mean over words of the attention weights,
    [I, R, n]."""
    i, r, n, l = x.shape
    e = _exp(z, 1, smooth, inplace)
    denom = e.sum(1)  # [I, n, l]
    if weights is not None:
        weights.append((e / denom.unsqueeze(1)).mean(3))
    rn = region_norms[:, :, None, None]
    e = e.mul_(rn) if inplace else e * rn
    num = (e * x).sum(1)
    uw = torch.bmm(region_gram, e.reshape(i, r, n * l)).view(i, r, n, l)
    quad = (uw.mul_(e) if inplace else uw * e).sum(1)
    per_word = num / torch.sqrt(torch.maximum(quad, denom * denom * EPS2))
    return _pool(per_word, 2, agg, t)


@dataclass(frozen=True)
class _Config:
    i2t: bool
    t2i: bool
    norm: str
    lambda_i2t: float
    lambda_t2i: float
    agg_i2t: str
    agg_t2i: str
    lse_temperature: float


_EMPTY = torch.empty(0)


def _group_scores(x, wn, wg, rn, rg, cfg: _Config, inplace: bool, weights: list | None = None):
    """(S_I2T [I, n], S_T2I [I, n]) of one length group, x [I, R, n, l] its cosines (None for an unasked direction).

    inplace=True (no gradient): scratch tensors are overwritten instead of allocated; x itself is never modified.
    weights: a list that receives Eq. (10)'s weights, word weights [I, n, l] then region weights [I, R, n].
    """
    norm, t = cfg.norm, cfg.lse_temperature
    act = _activation(x, norm)
    sq = act * act if norm.endswith("l2") else None
    own = act is not x  # act is a scratch tensor we may overwrite
    f1 = _query_factor(act, sq, norm, 1, cfg.lambda_i2t) if cfg.i2t else None
    f2 = _query_factor(act, sq, norm, 3, cfg.lambda_t2i) if cfg.t2i else None
    s1 = s2 = None
    if cfg.i2t:
        z = _logits(x, act, f1, norm, 1, cfg.lambda_i2t, out=sq if inplace and sq is not None else None)
        s1 = _i2t_group(x, z, wn, wg, cfg.lambda_i2t, cfg.agg_i2t, t, inplace, weights)
    if cfg.t2i:
        z = _logits(x, act, f2, norm, 3, cfg.lambda_t2i, out=act if inplace and own else None)
        s2 = _t2i_group(x, z, rn, rg, cfg.lambda_t2i, cfg.agg_t2i, t, inplace, weights)
    return s1, s2


def _act_grad(x: torch.Tensor, norm: str) -> torch.Tensor | float:
    if norm.startswith("clipped"):
        return torch.where(x > 0, x.new_ones(()), x.new_full((), 0.1))
    if norm.startswith("relu"):
        return (x > 0).to(x.dtype)
    return 1.0


def _pool_grad(p: torch.Tensor, g: torch.Tensor, dim: int, agg: str, t: float) -> torch.Tensor:
    g = g.unsqueeze(dim)
    if agg == "mean":
        return g.expand_as(p) / p.shape[dim]
    return g * torch.softmax(p * t, dim=dim)


def _direction_grad(x, a, sq, g_out, ctx_norms, gram, ctx_dim: int, query_dim: int, smooth: float, agg: str,
                    t: float):
    """Backward of one direction for one length group (l2-family score normalisations), recomputing its forward.

    Returns (dX through the weighted sum, dA (grad w.r.t. the activation), d ctx_norms, d gram).
    """
    s = sq.sum(query_dim, keepdim=True)
    live = s > EPS2
    f = torch.where(live, torch.rsqrt(s.clamp_min(EPS2)), torch.zeros_like(s)) * smooth
    e = _exp(a * f, ctx_dim, smooth, True)
    denom = e.sum(ctx_dim)
    w = e * ctx_norms
    num = (w * x).sum(ctx_dim)
    i, r, n, l = x.shape
    if ctx_dim == 3:
        tw = torch.einsum("ircj,cjk->irck", w, gram)
    else:
        tw = torch.bmm(gram, w.reshape(i, r, n * l)).view(i, r, n, l)
    quad = (tw * w).sum(ctx_dim)
    floor = denom * denom * EPS2
    clamped = quad < floor
    big_s = torch.maximum(quad, floor)
    p = num * torch.rsqrt(big_s)
    pool_dim = 1 if ctx_dim == 3 else 2  # I2T pools over regions (dim 1 of [I, R, n]), T2I over words
    gp = _pool_grad(p, g_out, pool_dim, agg, t)
    d_num = gp * torch.rsqrt(big_s)
    d_s = -0.5 * p * gp / big_s
    d_quad = torch.where(clamped, torch.zeros_like(d_s), d_s)
    d_denom = torch.where(clamped, d_s * 2 * EPS2 * denom, torch.zeros_like(d_s))
    d_num_u, d_quad_u = d_num.unsqueeze(ctx_dim), d_quad.unsqueeze(ctx_dim)
    dx = d_num_u * w
    dw = d_num_u * x + 2 * d_quad_u * tw  # gram is symmetric
    if ctx_dim == 3:
        d_norms = (dw * e).sum((0, 1))  # [n, l]
        wq = w * d_quad_u
        d_gram = torch.einsum("ircj,irck->cjk", wq, w)
    else:
        d_norms = (dw * e).sum((2, 3), keepdim=True)  # [I, R, 1, 1]
        wq = (w * d_quad_u).reshape(i, r, n * l)
        d_gram = torch.bmm(wq, w.reshape(i, r, n * l).transpose(1, 2))
    dz = (dw * ctx_norms + d_denom.unsqueeze(ctx_dim)) * e
    da = dz * f
    d_f = (dz * a).sum(query_dim, keepdim=True)
    d_s_q = torch.where(live, -0.5 * f / s.clamp_min(EPS2) * d_f, torch.zeros_like(d_f))
    da = da + 2 * a * d_s_q
    return dx, da, d_norms, d_gram


class _GroupScores(torch.autograd.Function):
    """Both directions of one length group with a hand-written backward (l2-family normalisations).

    Autograd through the eager forward keeps ~20 [I, R, n, l] intermediates and runs ~40 passes in the
    backward; this saves only x and recomputes the forward inside the backward, in image chunks.
    """

    @staticmethod
    def forward(ctx, x, wn, wg, rn, rg, cfg: _Config):
        ctx.cfg = cfg
        ctx.save_for_backward(x, wn, wg, rn, rg)
        s1, s2 = [], []
        for sl in _image_slabs(x):
            a, b = _group_scores(x[sl], wn, wg if cfg.i2t else None, rn[sl], rg[sl] if cfg.t2i else None, cfg,
                                 inplace=True)
            s1.append(a)
            s2.append(b)
        return (torch.cat(s1) if cfg.i2t else x.new_empty(0)), (torch.cat(s2) if cfg.t2i else x.new_empty(0))

    @staticmethod
    def backward(ctx, g1, g2):
        x, wn, wg, rn, rg = ctx.saved_tensors
        cfg = ctx.cfg
        dx = torch.empty_like(x)
        d_wn = torch.zeros_like(wn) if cfg.i2t else None
        d_wg = torch.zeros_like(wg) if cfg.i2t else None
        d_rn = torch.zeros_like(rn) if cfg.t2i else None
        d_rg = torch.zeros_like(rg) if cfg.t2i else None
        for sl in _image_slabs(x):  # images are independent: cache-sized slabs on the CPU
            xs = x[sl]
            a = _activation(xs, cfg.norm)
            sq = a * a
            dxs = da_total = None
            if cfg.i2t:
                dxs, da_total, dn, dg = _direction_grad(xs, a, sq, g1[sl], wn, wg, 3, 1, cfg.lambda_i2t, cfg.agg_i2t,
                                                        cfg.lse_temperature)
                d_wn += dn
                d_wg += dg
            if cfg.t2i:
                dxt, da, dn, dg = _direction_grad(xs, a, sq, g2[sl], rn[sl][:, :, None, None], rg[sl], 1, 3,
                                                  cfg.lambda_t2i, cfg.agg_t2i, cfg.lse_temperature)
                dxs = dxt if dxs is None else dxs.add_(dxt)
                da_total = da if da_total is None else da_total.add_(da)
                d_rn[sl] = dn.view(-1, rn.shape[1])
                d_rg[sl] = dg
            dx[sl] = dxs.add_(da_total.mul_(_act_grad(xs, cfg.norm)))
        return dx, d_wn, d_wg, d_rn, d_rg, None


def _image_slabs(x: torch.Tensor) -> list[slice]:
    """Image ranges of x [I, R, n, l] of about CPU_CHUNK_ELEMENTS each on the CPU (one range on a GPU)."""
    per_image = max(1, x[0].numel())
    step = x.shape[0] if x.device.type != "cpu" else max(1, CPU_CHUNK_ELEMENTS // per_image)
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / |x| (0 for a zero vector), |x|) as in functional.l2_normalize and the reference's .norm()."""
    xf = wide(x)
    sq = (xf * xf).sum(-1, keepdim=True)
    unit = torch.where(sq > EPS2, xf * torch.rsqrt(sq.clamp_min(EPS2)), torch.zeros_like(xf)).to(x.dtype)
    return unit, xf.norm(dim=-1)


def cross_attention_similarity(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *,
                               i2t: bool = True, t2i: bool = True, lambda_i2t: float = 9.0,
                               lambda_t2i: float = 4.0, norm: str = "clipped_l2", agg: str = "mean",
                               lse_temperature: float = 6.0, chunk_elements: int | None = None,
                               agg_i2t: str | None = None, agg_t2i: str | None = None,
                               global_weights: bool = False, kernel: str | None = None) -> dict[str, torch.Tensor]:
    """S_I2T and S_T2I (CASC Eqs. (3)-(7)) of every image with every caption: {'i2t': [I, C], 't2i': [I, C]}.

    Same arguments and results as the reference `attention.i2t_similarity` / `t2i_similarity`
    (smooth = lambda_i2t / lambda_t2i). agg_i2t / agg_t2i override `agg` per direction (the CASC authors' code
    pools I2T with LogSumExp and T2I with the mean). chunk_elements: working-set size of one chunk (None = a cache-sized
    default on CPU when no gradient is needed; 0 = whole block; ignored when a gradient is needed: the fused
    backward walks image slabs itself).
    global_weights: also return CASC Eq. (10)'s weights of every pair from the same attention weights (no second
    contraction): 'w_regions' [I, C, R] (mean over real words of the T2I weights) and 'w_words' [I, C, L] (mean
    over regions of the I2T weights, 0 on padding), float32; A^I = sum_r w_r v_r, A^T = sum_l w_l t_l.
    Evaluation only (no gradient), both directions.
    kernel: 'torch' (default) or 'triton' (zoo/blocks/triton_attention.py: one fused kernel per length group
    after the contraction; evaluation with an l2-family normalisation and without global_weights, elsewhere the
    PyTorch path runs); None = the ZOO_KERNEL environment variable, else 'torch'.
    """
    kernel = kernel or os.environ.get("ZOO_KERNEL", "torch")
    if kernel not in ("torch", "triton"):
        raise ValueError(f"kernel must be 'torch' or 'triton', got {kernel!r} (argument or ZOO_KERNEL)")
    agg_i2t, agg_t2i = agg_i2t or agg, agg_t2i or agg
    if global_weights and not (i2t and t2i):
        raise ValueError("global_weights needs both attention directions (i2t=True, t2i=True)")
    if global_weights and norm == "softmax":
        raise ValueError("global_weights is not available for norm='softmax'")
    for a in (agg_i2t, agg_t2i):
        _check(images, captions, lengths, norm, a)
    n_img, n_reg, d = images.shape
    n_cap = captions.shape[0]
    dev = images.device
    dtype = torch.promote_types(images.dtype, captions.dtype)
    images, captions = images.to(dtype), captions.to(dtype)
    out = [k for k, on in (("i2t", i2t), ("t2i", t2i)) if on]
    if n_img == 0 or n_cap == 0 or not out:
        empty = {k: torch.zeros(n_img, n_cap, dtype=torch.float32, device=dev) for k in out}
        if global_weights:
            empty["w_regions"] = torch.zeros(n_img, n_cap, n_reg, dtype=torch.float32, device=dev)
            empty["w_words"] = torch.zeros(n_img, n_cap, captions.shape[1], dtype=torch.float32, device=dev)
        return empty
    grad = torch.is_grad_enabled() and (images.requires_grad or captions.requires_grad)
    if global_weights and grad:
        raise ValueError("global_weights is evaluation-only: call it under torch.no_grad()")
    fused_kernel = None
    if kernel == "triton" and not grad and not global_weights and norm.endswith("l2"):
        from . import triton_attention as fused_kernel  # noqa: N813 - imports triton only when asked for
        chunk_elements = 0  # whole length groups: the kernel walks the pairs itself
    weight_keys = ("w_words", "w_regions") if global_weights else ()
    order, groups = length_groups(lengths)
    # packed real words in sorted order: group g occupies rows [sum of earlier n*l, + n_g * l_g) of `packed`.
    # One index_select (its backward is one index_add), not a slice per group (a full-size zero tensor each).
    n_len = captions.shape[1]
    rows = torch.cat([(order[s : s + n, None] * n_len + torch.arange(l, device=order.device)).reshape(-1)
                      for s, n, l in groups])
    packed = captions.reshape(n_cap * n_len, d).index_select(0, rows)
    word_unit, word_norms = _unit(packed)
    region_unit, region_norms = _unit(images)
    group_sizes = [n * l for _, n, l in groups]
    with torch.autocast(dev.type, enabled=False):
        region_gram = torch.bmm(wide(region_unit), wide(region_unit).transpose(1, 2)) if t2i else None
        word_grams = []
        for (s, n, l), u in zip(groups, wide(word_unit).split(group_sizes)):
            word_grams.append(torch.bmm(u.view(n, l, d), u.view(n, l, d).transpose(1, 2)) if i2t else None)
    # CPU evaluation walks cache-sized slabs; training and GPUs take the whole block
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if (dev.type == "cpu" and not grad) else 0
    cfg = _Config(i2t, t2i, norm, float(lambda_i2t), float(lambda_t2i), agg_i2t, agg_t2i, float(lse_temperature))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n_cap, device=order.device)
    if not grad and chunk_elements > 0:
        # evaluation on the CPU: per length group, image chunks sized so one [ic, R, m, l] slab stays in cache;
        # few, large ops (each op is an OpenMP region: many small ones stall on a busy machine)
        res_dtype = torch.promote_types(dtype, torch.float32)
        res_sorted = {k: torch.empty(n_img, n_cap, dtype=res_dtype, device=dev) for k in out}
        if global_weights:
            res_sorted["w_words"] = torch.zeros(n_img, n_cap, n_len, dtype=res_dtype, device=dev)
            res_sorted["w_regions"] = torch.empty(n_img, n_cap, n_reg, dtype=res_dtype, device=dev)
        col = 0
        for g, (s0, n, l) in enumerate(groups):
            m_step = max(1, min(n, chunk_elements // (n_reg * l)))  # captions per slab (all, unless huge)
            for k in range(0, n, m_step):
                m = min(m_step, n - k)
                cols = slice(col + k * l, col + (k + m) * l)
                words_t = word_unit[cols].T
                wn = word_norms[cols].view(m, l)
                wg = word_grams[g][k : k + m] if i2t else None
                ic = max(1, chunk_elements // (n_reg * m * l))
                for i0 in range(0, n_img, ic):
                    ru = region_unit[i0 : i0 + ic]
                    icc = ru.shape[0]
                    x = wide(ru.reshape(icc * n_reg, d) @ words_t).view(icc, n_reg, m, l)  # CASC Eq. (3)
                    w = [] if global_weights else None
                    with torch.autocast(dev.type, enabled=False):
                        s1, s2 = _group_scores(x, wn, wg, region_norms[i0 : i0 + icc],
                                               region_gram[i0 : i0 + icc] if t2i else None, cfg, inplace=True,
                                               weights=w)
                    if global_weights:
                        res_sorted["w_words"][i0 : i0 + icc, s0 + k : s0 + k + m, :l] = w[0]
                        res_sorted["w_regions"][i0 : i0 + icc, s0 + k : s0 + k + m] = w[1].transpose(1, 2)
                    if i2t:
                        res_sorted["i2t"][i0 : i0 + icc, s0 + k : s0 + k + m] = s1
                    if t2i:
                        res_sorted["t2i"][i0 : i0 + icc, s0 + k : s0 + k + m] = s2
            col += n * l
        return {k: v[:, inverse] for k, v in res_sorted.items()}
    # the whole block at once: training (the fused backward walks image slabs itself) and GPUs
    cos_all = wide(region_unit.reshape(n_img * n_reg, d) @ word_unit.T)  # CASC Eq. (3), [I * R, W]
    # split (not slicing): its backward is one concatenation instead of a full-size zero tensor per group
    parts = cos_all.split(group_sizes, dim=1)
    res = {k: [] for k in (*out, *weight_keys)}
    with torch.autocast(dev.type, enabled=False):
        for (s, n, l), part, wn, wg in zip(groups, parts, word_norms.split(group_sizes), word_grams):
            x = part.view(n_img, n_reg, n, l)
            if grad and len(groups) > 1:
                x = x.contiguous()  # saved for the backward: strided views make every pass there slower
            wn = wn.view(n, l)
            if not grad:
                w = [] if global_weights else None
                if fused_kernel is not None:
                    s1, s2 = fused_kernel.group_scores(x, wn, wg, region_norms, region_gram, cfg)
                else:
                    s1, s2 = _group_scores(x, wn, wg, region_norms, region_gram, cfg, inplace=True, weights=w)
                if global_weights:
                    res["w_words"].append(F.pad(w[0], (0, n_len - l)))
                    res["w_regions"].append(w[1].transpose(1, 2))
            elif norm.endswith("l2"):  # fused forward/backward, see _GroupScores
                s1, s2 = _GroupScores.apply(x, wn, wg if i2t else _EMPTY, region_norms,
                                            region_gram if t2i else _EMPTY, cfg)
            else:
                s1, s2 = _group_scores(x, wn, wg, region_norms, region_gram, cfg, inplace=False)
            if i2t:
                res["i2t"].append(s1)
            if t2i:
                res["t2i"].append(s2)
    return {k: torch.cat(v, dim=1)[:, inverse] for k, v in res.items()}
