"""SCAN-style cross attention between image regions and words (CASC Sec. III-B, Eqs. (3)-(7)).

`cross_attention_similarity` is the entry point methods use: it runs the fast path
(`fast_attention.cross_attention_similarity`: captions bucketed by exact length, one shared contraction,
softmax folded into the cosine) unless the slow reference is asked for (`reference=True`, inside
`with reference_scoring():`, or with the environment variable ZOO_REFERENCE_SCORING=1). The reference is
`region_word_scores` + `i2t_similarity` / `t2i_similarity` below, unchanged, and the fast path is tested
against it (tests/test_speed.py).

All pairwise functions take images [I, R, d], captions [C, L, d] and caption lengths [C] and return
similarities [I, C]. They never materialise the attended vectors of every (image, caption) pair:
cos(q, sum_k a_k c_k) = sum_k a_k (q . c_k) / (|q| sqrt(a^T G a)), with G the Gram matrix of the
context items, so memory is O(I*C*R*L) rather than O(I*C*R*L*d). `attend` is the paired version that
does materialise attended vectors (needed by CASC Eq. (10) and CCCL Eqs. (17)-(19)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .functional import (aggregate, l2_normalize, lengths_to_mask, masked_mean, normalize_scores,  # noqa: F401
                         reference_scoring, safe_sqrt, use_reference, wide)  # (reference_scoring: re-exported)


@dataclass
class RegionWordScores:
    """Everything the two attention directions share for one block of (image, caption) pairs."""

    cosine: torch.Tensor  # [I, C, R, L] s_ij, CASC Eq. (3)
    region_norms: torch.Tensor  # [I, R]
    word_norms: torch.Tensor  # [C, L] (0 on padding)
    word_mask: torch.Tensor  # [C, L] True on real words
    region_unit: torch.Tensor  # [I, R, d] l2-normalised regions
    word_unit: torch.Tensor  # [C, L, d] l2-normalised words (0 on padding)


def region_word_scores(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> RegionWordScores:
    """CASC Eq. (3): cosine similarity s_ij of every region i and word j, for every image-caption pair."""
    if images.dim() != 3 or captions.dim() != 3 or images.shape[-1] != captions.shape[-1]:
        raise ValueError(f"expected images [I, R, d] and captions [C, L, d], got {tuple(images.shape)} and {tuple(captions.shape)}")
    dtype = torch.promote_types(images.dtype, captions.dtype)  # encoders under autocast may disagree
    images, captions = images.to(dtype), captions.to(dtype)
    word_mask = lengths_to_mask(lengths, captions.shape[1])
    captions = captions * word_mask[..., None].to(dtype)  # padding never leaks into a score
    region_unit, word_unit = l2_normalize(images), l2_normalize(captions)
    # the big contraction may run in bf16/fp16 under autocast; everything after it is float32, so that
    # rankings are not flattened into ties by a 3-significant-digit score
    cosine = wide(torch.einsum("ird,cld->icrl", region_unit, word_unit))
    return RegionWordScores(cosine, wide(images).norm(dim=-1), wide(captions).norm(dim=-1), word_mask,
                            region_unit, word_unit)


def attention_weights(scores: torch.Tensor, query_mask: torch.Tensor | None, context_mask: torch.Tensor | None,
                      smooth: float, norm: str = "clipped_l2", context_dim: int = -1) -> torch.Tensor:
    """CASC Eqs. (4) and (6): alpha = softmax_context(lambda * norm_query(s)).

    scores [..., Q, K] (context_dim=-1) or [..., K, Q] (context_dim=-2, so T2I needs no transposed copy);
    masks broadcastable to scores, True on real items; None = all real.
    """
    query_dim = -2 if context_dim == -1 else -1
    s = normalize_scores(scores, query_mask, norm, dim=query_dim) * smooth
    if context_mask is not None:
        s = s.masked_fill(~context_mask, float("-inf"))
    return torch.softmax(s, dim=context_dim)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """[N, K, d] -> [N, K, K] dot products, in float32."""
    with torch.autocast(x.device.type, enabled=False):
        x = wide(x)
        return torch.bmm(x, x.transpose(1, 2))


def _attended_cosine(cosine: torch.Tensor, weights: torch.Tensor, context_norms: torch.Tensor,
                     unit_gram: torch.Tensor, context_dim: int = -1) -> torch.Tensor:
    """CASC Eqs. (5) and (7): cos(q, a), a = sum_k alpha_k c_k, without forming a. Returns [..., Q].

    With c_k = |c_k| u_k and w_k = alpha_k |c_k|: cos(q, a) = sum_k w_k cos(q, c_k) / sqrt(w^T U w), where U is
    the Gram matrix of the unit context vectors u_k.
    """
    w = weights * context_norms
    num = (w * cosine).sum(context_dim)
    with torch.autocast(w.device.type, enabled=False):  # float32, see region_word_scores
        w, unit_gram = wide(w), wide(unit_gram)
        uw = torch.matmul(w, unit_gram) if context_dim == -1 else torch.matmul(unit_gram, w)
    sq = (uw * w).sum(context_dim)
    return num / safe_sqrt(sq)


def i2t_similarity(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *, smooth: float = 9.0,
                   norm: str = "clipped_l2", agg: str = "mean", lse_temperature: float = 6.0,
                   scores: RegionWordScores | None = None) -> torch.Tensor:
    """S_I2T(I, T), CASC Eqs. (4)-(5): each region attends over the words (lambda_1); pooled over regions."""
    sc = scores if scores is not None else region_word_scores(images, captions, lengths)
    context_mask = sc.word_mask[None, :, None, :]
    alpha = attention_weights(sc.cosine, None, context_mask, smooth, norm)  # [I, C, R, L]
    word_gram = _gram(sc.word_unit)[None]  # [1, C, L, L]
    per_region = _attended_cosine(sc.cosine, alpha, sc.word_norms[None, :, None, :], word_gram)  # [I, C, R]
    all_regions = torch.ones(1, 1, 1, dtype=torch.bool, device=per_region.device)
    return aggregate(per_region, all_regions, agg, lse_temperature)


def t2i_similarity(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *, smooth: float = 4.0,
                   norm: str = "clipped_l2", agg: str = "mean", lse_temperature: float = 6.0,
                   scores: RegionWordScores | None = None) -> torch.Tensor:
    """S_T2I(I, T), CASC Eqs. (6)-(7): each word attends over the regions (lambda_2); pooled over real words."""
    sc = scores if scores is not None else region_word_scores(images, captions, lengths)
    # layout stays [I, C, R, L]: query = words (last dim), context = regions (dim -2)
    query_mask = sc.word_mask[None, :, None, :]
    alpha = attention_weights(sc.cosine, query_mask, None, smooth, norm, context_dim=-2)  # [I, C, R, L]
    region_gram = _gram(sc.region_unit)[:, None]  # [I, 1, R, R]
    per_word = _attended_cosine(sc.cosine, alpha, sc.region_norms[:, None, :, None], region_gram, -2)  # [I, C, L]
    return aggregate(per_word, sc.word_mask[None], agg, lse_temperature)


def attend(query: torch.Tensor, context: torch.Tensor, *, smooth: float, norm: str = "clipped_l2",
           query_mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None):
    """Paired cross attention: query [B, Q, d] attends over its own context [B, K, d].

    Returns the attended vectors a [B, Q, d] (CASC Eqs. (4)/(6)) and the weights [B, Q, K].
    """
    dtype = torch.promote_types(query.dtype, context.dtype)
    query, context = query.to(dtype), context.to(dtype)
    b, q, _ = query.shape
    k = context.shape[1]
    qm = torch.ones(b, q, dtype=torch.bool, device=query.device) if query_mask is None else query_mask
    km = torch.ones(b, k, dtype=torch.bool, device=query.device) if context_mask is None else context_mask
    context = context * km[..., None].to(context.dtype)
    cos = torch.einsum("bqd,bkd->bqk", l2_normalize(query), l2_normalize(context))
    alpha = attention_weights(cos, qm[:, :, None], km[:, None, :], smooth, norm)
    return torch.bmm(alpha, context), alpha


# ---- CASC Eq. (10): the weights that make the global attention vectors (semantic.py's label head reads them) ----
def pair_attention_weights(cosine: torch.Tensor, word_mask: torch.Tensor, *, smooth_i2t: float, smooth_t2i: float,
                           norm: str = "clipped_l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions' attention weights, exactly as attention.i2t_similarity / t2i_similarity form them.

    cosine [..., R, L] region-word cosines (s_ij, Eq. (3)); word_mask broadcastable to it, True on real words.
    Returns (alpha_i2t, alpha_t2i), both [..., R, L]: alpha_i2t sums to 1 over words (each region attends over
    the words, lambda_1, Eq. (4)); alpha_t2i sums to 1 over regions (each word attends over the regions,
    lambda_2, Eq. (6)).
    """
    alpha_i2t = attention_weights(cosine, None, word_mask, smooth_i2t, norm)
    alpha_t2i = attention_weights(cosine, word_mask, None, smooth_t2i, norm, context_dim=-2)
    return alpha_i2t, alpha_t2i


def global_attention_weights(cosine: torch.Tensor, word_mask: torch.Tensor, *, smooth_i2t: float,
                             smooth_t2i: float, norm: str = "clipped_l2") -> tuple[torch.Tensor, torch.Tensor]:
    """CASC Eq. (10) as weights: (w_regions [..., R], w_words [..., L]) with A^I = sum_r w_r v_r, A^T = sum_l w_l t_l.

    w_regions = mean over real words of the T2I weights; w_words = mean over regions of the I2T weights (0 on
    padded words). Each sums to 1.
    """
    alpha_i2t, alpha_t2i = pair_attention_weights(cosine, word_mask, smooth_i2t=smooth_i2t, smooth_t2i=smooth_t2i,
                                                  norm=norm)
    mask = word_mask.expand_as(cosine)
    w_regions = masked_mean(alpha_t2i, mask, dim=-1)  # [..., R]
    w_words = alpha_i2t.mean(dim=-2)  # [..., L]
    return w_regions, w_words


def block_global_weights(sc: RegionWordScores, *, smooth_i2t: float, smooth_t2i: float,
                         norm: str = "clipped_l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (10) weights for every (image, caption) pair of a block: ([I, C, R], [I, C, L])."""
    return global_attention_weights(sc.cosine, sc.word_mask[None, :, None, :], smooth_i2t=smooth_i2t,
                                    smooth_t2i=smooth_t2i, norm=norm)


def paired_global_weights(regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, *, smooth_i2t: float,
                          smooth_t2i: float, norm: str = "clipped_l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (10) weights of matched pairs (row n of regions with row n of words): ([B, R], [B, L])."""
    dtype = torch.promote_types(regions.dtype, words.dtype)
    mask = torch.arange(words.shape[1], device=words.device)[None, :] < lengths[:, None]
    words = words.to(dtype) * mask[..., None].to(dtype)
    cosine = wide(torch.einsum("brd,bld->brl", l2_normalize(regions.to(dtype)), l2_normalize(words)))
    return global_attention_weights(cosine, mask[:, None, :], smooth_i2t=smooth_i2t, smooth_t2i=smooth_t2i,
                                    norm=norm)


# ---- fast path / slow reference switch (lives in functional.py so that encoders can honour it too) -------
def cross_attention_similarity(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *,
                               i2t: bool = True, t2i: bool = True, lambda_i2t: float = 9.0, lambda_t2i: float = 4.0,
                               norm: str = "clipped_l2", agg: str = "mean", lse_temperature: float = 6.0,
                               reference: bool | None = None, agg_i2t: str | None = None,
                               agg_t2i: str | None = None, global_weights: bool = False,
                               kernel: str | None = None) -> dict[str, torch.Tensor]:
    """CASC Eqs. (3)-(7) for every image-caption pair: {'i2t': S_I2T [I, C], 't2i': S_T2I [I, C]} (asked ones).

    agg_i2t / agg_t2i: per-direction pooling (None = agg).
    global_weights (evaluation, both directions): also CASC Eq. (10)'s weights 'w_regions' [I, C, R] and
    'w_words' [I, C, L] from the same attention weights (see fast_attention.cross_attention_similarity).
    kernel: the fast path's per-pair implementation, 'torch' or 'triton' (None = ZOO_KERNEL, else 'torch').
    reference: True = the slow reference path, False = the fast path, None = fast unless reference_scoring()
    or ZOO_REFERENCE_SCORING=1 say otherwise.
    """
    if reference is None:
        reference = use_reference()
    if not reference:
        from .fast_attention import cross_attention_similarity as fast

        return fast(images, captions, lengths, i2t=i2t, t2i=t2i, lambda_i2t=lambda_i2t, lambda_t2i=lambda_t2i,
                    norm=norm, agg=agg, lse_temperature=lse_temperature, agg_i2t=agg_i2t, agg_t2i=agg_t2i,
                    global_weights=global_weights, kernel=kernel)
    sc = region_word_scores(images, captions, lengths)
    kw = dict(norm=norm, lse_temperature=lse_temperature, scores=sc)
    out = {}
    if i2t:
        out["i2t"] = i2t_similarity(None, None, None, smooth=lambda_i2t, agg=agg_i2t or agg, **kw)
    if t2i:
        out["t2i"] = t2i_similarity(None, None, None, smooth=lambda_t2i, agg=agg_t2i or agg, **kw)
    if global_weights:
        out["w_regions"], out["w_words"] = block_global_weights(sc, smooth_i2t=lambda_i2t, smooth_t2i=lambda_t2i,
                                                                norm=norm)
    return out
