"""SCAN-style cross attention between image regions and words (CASC Sec. III-B, Eqs. (3)-(7)).

All pairwise functions take images [I, R, d], captions [C, L, d] and caption lengths [C] and return
similarities [I, C]. They never materialise the attended vectors of every (image, caption) pair:
cos(q, sum_k a_k c_k) = sum_k a_k (q . c_k) / (|q| sqrt(a^T G a)), with G the Gram matrix of the
context items, so memory is O(I*C*R*L) rather than O(I*C*R*L*d). `attend` is the paired version that
does materialise attended vectors (needed by CASC Eq. (10) and CCCL Eqs. (17)-(19)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .functional import EPS, aggregate, lengths_to_mask, normalize_scores, safe_sqrt


@dataclass
class RegionWordScores:
    """Everything the two attention directions share for one block of (image, caption) pairs."""

    dots: torch.Tensor  # [I, C, R, L] raw v_i . t_j
    cosine: torch.Tensor  # [I, C, R, L] s_ij, CASC Eq. (3)
    region_norms: torch.Tensor  # [I, R]
    word_norms: torch.Tensor  # [C, L]
    word_mask: torch.Tensor  # [C, L] True on real words
    images: torch.Tensor
    captions: torch.Tensor


def region_word_scores(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> RegionWordScores:
    """CASC Eq. (3): cosine similarity s_ij of every region i and word j, for every image-caption pair."""
    if images.dim() != 3 or captions.dim() != 3 or images.shape[-1] != captions.shape[-1]:
        raise ValueError(f"expected images [I, R, d] and captions [C, L, d], got {tuple(images.shape)} and {tuple(captions.shape)}")
    word_mask = lengths_to_mask(lengths, captions.shape[1])
    captions = captions * word_mask[..., None].to(captions.dtype)  # padding never leaks into a score
    dots = torch.einsum("ird,cld->icrl", images, captions)
    region_norms = images.norm(dim=-1)
    word_norms = captions.norm(dim=-1)
    inv_r = 1.0 / region_norms.clamp_min(EPS)
    inv_w = 1.0 / word_norms.clamp_min(EPS)
    cosine = dots * inv_r[:, None, :, None] * inv_w[None, :, None, :]
    return RegionWordScores(dots, cosine, region_norms, word_norms, word_mask, images, captions)


def attention_weights(scores: torch.Tensor, query_mask: torch.Tensor, context_mask: torch.Tensor,
                      smooth: float, norm: str = "clipped_l2") -> torch.Tensor:
    """CASC Eqs. (4) and (6): alpha = softmax_context(lambda * norm_query(s)).

    scores [..., Q, K]; query_mask broadcastable to [..., Q, 1]; context_mask to [..., 1, K].
    """
    s = normalize_scores(scores, query_mask, norm, dim=-2)
    s = (smooth * s).masked_fill(~context_mask.expand_as(s), float("-inf"))
    return torch.softmax(s, dim=-1)


def _attended_cosine(dots: torch.Tensor, weights: torch.Tensor, context_gram: torch.Tensor,
                     query_norms: torch.Tensor) -> torch.Tensor:
    """CASC Eqs. (5) and (7): cos(q, a) with a = sum_k alpha_k c_k, from dot products only. [..., Q]."""
    num = (weights * dots).sum(-1)
    sq = (torch.matmul(weights, context_gram) * weights).sum(-1)
    return num / (query_norms.clamp_min(EPS) * safe_sqrt(sq))


def i2t_similarity(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *, smooth: float = 9.0,
                   norm: str = "clipped_l2", agg: str = "mean", lse_temperature: float = 6.0,
                   scores: RegionWordScores | None = None) -> torch.Tensor:
    """S_I2T(I, T), CASC Eqs. (4)-(5): each region attends over the words (lambda_1); pooled over regions."""
    sc = scores if scores is not None else region_word_scores(images, captions, lengths)
    n_img, n_reg = sc.region_norms.shape
    query_mask = torch.ones(1, 1, n_reg, 1, dtype=torch.bool, device=sc.dots.device)
    context_mask = sc.word_mask[None, :, None, :]
    alpha = attention_weights(sc.cosine, query_mask, context_mask, smooth, norm)  # [I, C, R, L]
    word_gram = torch.einsum("cld,cmd->clm", sc.captions, sc.captions)[None]  # [1, C, L, L]
    per_region = _attended_cosine(sc.dots, alpha, word_gram, sc.region_norms[:, None, :])  # [I, C, R]
    return aggregate(per_region, query_mask[..., 0], agg, lse_temperature)


def t2i_similarity(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *, smooth: float = 4.0,
                   norm: str = "clipped_l2", agg: str = "mean", lse_temperature: float = 6.0,
                   scores: RegionWordScores | None = None) -> torch.Tensor:
    """S_T2I(I, T), CASC Eqs. (6)-(7): each word attends over the regions (lambda_2); pooled over real words."""
    sc = scores if scores is not None else region_word_scores(images, captions, lengths)
    cos = sc.cosine.transpose(-1, -2)  # [I, C, L, R]: query = words, context = regions
    dots = sc.dots.transpose(-1, -2)
    query_mask = sc.word_mask[None, :, :, None]
    context_mask = torch.ones(1, 1, 1, cos.shape[-1], dtype=torch.bool, device=cos.device)
    alpha = attention_weights(cos, query_mask, context_mask, smooth, norm)  # [I, C, L, R]
    region_gram = torch.einsum("ird,iqd->irq", sc.images, sc.images)[:, None]  # [I, 1, R, R]
    per_word = _attended_cosine(dots, alpha, region_gram, sc.word_norms[None])  # [I, C, L]
    return aggregate(per_word, sc.word_mask[None], agg, lse_temperature)


def attend(query: torch.Tensor, context: torch.Tensor, *, smooth: float, norm: str = "clipped_l2",
           query_mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None):
    """Paired cross attention: query [B, Q, d] attends over its own context [B, K, d].

    Returns the attended vectors a [B, Q, d] (CASC Eqs. (4)/(6)) and the weights [B, Q, K].
    """
    b, q, _ = query.shape
    k = context.shape[1]
    qm = torch.ones(b, q, dtype=torch.bool, device=query.device) if query_mask is None else query_mask
    km = torch.ones(b, k, dtype=torch.bool, device=query.device) if context_mask is None else context_mask
    context = context * km[..., None].to(context.dtype)
    dots = torch.einsum("bqd,bkd->bqk", query, context)
    cos = dots / (query.norm(dim=-1).clamp_min(EPS)[:, :, None] * context.norm(dim=-1).clamp_min(EPS)[:, None, :])
    alpha = attention_weights(cos, qm[:, :, None], km[:, None, :], smooth, norm)
    return torch.bmm(alpha, context), alpha
