"""CASC's global semantic consistency (Sec. III-C/D, Eqs. (10)-(13)) and the simple local/global scorers
of its ablation rows (Tables I/II).

Global attention vectors (Eq. (10)) of an image-caption pair are convex combinations of the pair's regions
and words: A^I = (1/l) sum_j a^V_j = sum_r w^I_r v_r with w^I_r = mean over real words j of the T2I weight
alpha_{j->r}; A^T = (1/k) sum_i a^T_i = sum_l w^T_l t_l with w^T_l = mean over regions i of alpha_{i->l}.
Because the weights sum to one and the label head's first layer is affine, W1 A + b1 = sum w (W1 v) + b1:
regions and words are projected to the head's hidden size once, and scoring a block of pairs never forms
d-dim attended vectors (memory O(I*C*(R+L)) weights + O(I*C*hidden) instead of O(I*C*d) per direction).
The weights themselves (Eq. (10) from the attention weights of Eqs. (4)/(6)) live with the attention, in
attention.py: the local scorer's fast path hands them out too (cross_attention_similarity(global_weights=True)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import RegionWordScores, block_global_weights, paired_global_weights
from .functional import l2_normalize, masked_mean, wide


# ---- the label head (Sec. III-C2, released code d -> 512 -> K, tanh between) ------------------------------------
class LabelHead(nn.Module):
    """Two fully connected layers with tanh between: global attention vector [.., d] -> label logits [.., K].

    `project` applies the first layer's linear part only; `from_projected` finishes from a convex combination
    of projected vectors (valid because the combination weights sum to 1, so the bias passes through).
    """

    def __init__(self, embed_dim: int, num_labels: int, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fc1.weight)

    def from_projected(self, p: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(p + self.fc1.bias))


def paired_global_vectors(regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, *, smooth_i2t: float,
                          smooth_t2i: float, norm: str = "clipped_l2") -> tuple[torch.Tensor, torch.Tensor]:
    """CASC Eq. (10) for matched pairs (row n with row n): A^I [B, d] and A^T [B, d], convex combinations of the
    pair's regions and real words with the weights of the two attention directions (Eqs. (4)/(6))."""
    w_r, w_l = paired_global_weights(regions, words, lengths, smooth_i2t=smooth_i2t, smooth_t2i=smooth_t2i, norm=norm)
    a_img = torch.einsum("br,brd->bd", w_r.to(regions.dtype), regions)  # Eq. (10), A^I
    a_txt = torch.einsum("bl,bld->bd", w_l.to(words.dtype), words)  # Eq. (10), A^T
    return a_img, a_txt


def label_constraint_loss(head: LabelHead, a_img: torch.Tensor, a_txt: torch.Tensor, targets: torch.Tensor,
                          pos_weight: torch.Tensor | None = None, reduction: str = "mean",
                          alpha: float = 10.0) -> torch.Tensor:
    """CASC Eqs. (11)-(12), the label term: alpha * (BCE(head(A^I), Y) + BCE(head(A^T), Y)) over matched pairs.

    a_img / a_txt [B, d]: any method's per-pair global attended vectors; targets [B, K] the pairs' label sets.
    """
    return alpha * (weighted_label_bce(head(a_img), targets, pos_weight, reduction)
                    + weighted_label_bce(head(a_txt), targets, pos_weight, reduction))


def pair_label_logits(head: LabelHead, w_regions: torch.Tensor, regions_proj: torch.Tensor, w_words: torch.Tensor,
                      words_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Label logits of every pair of a block from A^I and A^T, without forming them: ([I, C, K], [I, C, K]).

    w_regions [I, C, R], regions_proj [I, R, h] (head.project of the regions), w_words [I, C, L],
    words_proj [C, L, h] (head.project of the words, 0 on padding).
    """
    dtype = head.fc1.weight.dtype
    h_img = torch.einsum("icr,irh->ich", w_regions.to(dtype), regions_proj.to(dtype))
    h_txt = torch.einsum("icl,clh->ich", w_words.to(dtype), words_proj.to(dtype))
    return head.from_projected(h_img), head.from_projected(h_txt)


def prediction_cosine(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Cosine between two sigmoid label predictions along the last dim (S_G, released reading)."""
    a, b = torch.sigmoid(wide(logits_a)), torch.sigmoid(wide(logits_b))
    return (l2_normalize(a) * l2_normalize(b)).sum(-1)


def global_label_similarity_pairs(head: LabelHead, sc: RegionWordScores, regions_proj: torch.Tensor,
                                  words_proj: torch.Tensor, *, smooth_i2t: float, smooth_t2i: float,
                                  norm: str = "clipped_l2") -> torch.Tensor:
    """S_G, reading (a) (released code): for each pair, cos(sigmoid(head(A^I)), sigmoid(head(A^T))). [I, C]."""
    w_regions, w_words = block_global_weights(sc, smooth_i2t=smooth_i2t, smooth_t2i=smooth_t2i, norm=norm)
    logits_img, logits_txt = pair_label_logits(head, w_regions, regions_proj, w_words, words_proj)
    return prediction_cosine(logits_img, logits_txt)


# elements of one chunk's per-pair label tensors ([pairs, hidden] and [pairs, K], both modalities): cache-sized on
# the CPU; on a GPU large enough to saturate it and small enough (256 MB each) to stay below the scorer's own
# working set, which is freed before S_G runs, so a block's peak is not raised (zoo.engine.evaluation.auto_blocks)
LABEL_CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}


def pair_label_cosine(head: LabelHead, w_regions: torch.Tensor, regions_proj: torch.Tensor, w_words: torch.Tensor,
                      words_proj: torch.Tensor, max_elements: int | None = None) -> torch.Tensor:
    """S_G, reading (a), from Eq. (10) weights: cos(sigmoid(head(A^I)), sigmoid(head(A^T))) for every pair, [I, C].

    Same arguments as pair_label_logits; the pairs are walked in chunks of at most `max_elements` elements of
    per-pair label tensors (None = LABEL_CHUNK_ELEMENTS for the device), so a block's memory does not grow with
    K and the hidden size, and on the CPU each chunk stays in cache. Chunking changes no value.
    """
    n_i, n_c = w_regions.shape[:2]
    dev = w_regions.device
    if max_elements is None:
        max_elements = LABEL_CHUNK_ELEMENTS.get(dev.type, LABEL_CHUNK_ELEMENTS["cuda"])
    per_pair = 2 * (head.fc1.out_features + head.fc2.out_features)
    pairs = max(1, max_elements // per_pair)
    cc = max(1, min(n_c, pairs))
    ic = max(1, min(n_i, pairs // cc))
    out = torch.empty(n_i, n_c, dtype=torch.promote_types(w_regions.dtype, torch.float32), device=dev)
    for c0 in range(0, n_c, cc):
        for i0 in range(0, n_i, ic):
            logits_img, logits_txt = pair_label_logits(head, w_regions[i0 : i0 + ic, c0 : c0 + cc],
                                                       regions_proj[i0 : i0 + ic], w_words[i0 : i0 + ic, c0 : c0 + cc],
                                                       words_proj[c0 : c0 + cc])
            out[i0 : i0 + ic, c0 : c0 + cc] = prediction_cosine(logits_img, logits_txt)
    return out


def global_label_similarity_labels(image_logits: torch.Tensor, caption_labels: torch.Tensor) -> torch.Tensor:
    """S_G, reading (b) (printed text): cos(predicted labels of the image [I, K], label vector of the caption [C, K]).

    caption_labels must come from each caption's own words (never the union over its image's captions).
    A caption without any label scores 0 against every image.
    """
    p = l2_normalize(torch.sigmoid(wide(image_logits)))
    y = l2_normalize(wide(caption_labels).to(p.dtype))
    return p @ y.T


# ---- Eq. (11): positively weighted sigmoid BCE -----------------------------------------------------------------
def weighted_label_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None,
                       reduction: str = "mean") -> torch.Tensor:
    """CASC Eq. (11) for one prediction: -[p_c y_c log s(x_c) + (1 - y_c) log(1 - s(x_c))].

    reduction 'mean' (released code: BCEWithLogitsLoss, mean over batch x labels) or 'sum' (Eq. (11)/(12) literally:
    summed over labels and pairs, about B*K times larger).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"label loss reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = wide(logits)
    pw = None if pos_weight is None else pos_weight.to(logits)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits), pos_weight=pw, reduction=reduction)


# ---- Eq. (13): test-time fusion ------------------------------------------------------------------------------------
def local_similarity(s_i2t: torch.Tensor | None, s_t2i: torch.Tensor | None, average: bool = True) -> torch.Tensor:
    """The local term of Eq. (13): 1/2 (S_I2T + S_T2I) (released code) or S_I2T + S_T2I (printed); one direction
    alone when the other is None."""
    if s_i2t is None or s_t2i is None:
        s = s_i2t if s_t2i is None else s_t2i
        if s is None:
            raise ValueError("local_similarity needs at least one direction")
        return s
    return 0.5 * (s_i2t + s_t2i) if average else s_i2t + s_t2i


def fuse(s_local: torch.Tensor | None, s_global: torch.Tensor | None, beta: float) -> torch.Tensor:
    """CASC Eq. (13): beta * S_loc + (1 - beta) * S_G (either term alone when the other is absent)."""
    if s_global is None:
        return s_local
    if s_local is None:
        return s_global
    return beta * s_local + (1.0 - beta) * s_global


# ---- ablation scorers (Tables I/II rows 1, 3) ---------------------------------------------------------------------
def max_local_similarity(sc: RegionWordScores) -> torch.Tensor:
    """Row 1 "Local" (no attention, DVSA-style): mean over regions of the best-matching real word's cosine. [I, C]."""
    cos = sc.cosine.masked_fill(~sc.word_mask[None, :, None, :], float("-inf"))
    return cos.max(dim=-1).values.mean(dim=-1)


def mean_region_vector(regions: torch.Tensor) -> torch.Tensor:
    """The l2-normalised mean of an image's regions, [I, R, d] -> [I, d] (row 3's image side; zoo.search's
    default first-stage vector)."""
    return l2_normalize(wide(regions).mean(dim=1))


def mean_word_vector(words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The l2-normalised mean of a caption's real words, [C, L, d] -> [C, d] (row 3's caption side)."""
    mask = torch.arange(words.shape[1], device=words.device)[None, :] < lengths[:, None]
    return l2_normalize(masked_mean(wide(words), mask[..., None], dim=1))


def mean_pooled_cosine(regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row 3 "Global": cosine of the mean of the regions and the mean of the real words. [I, C]."""
    return mean_region_vector(regions) @ mean_word_vector(words, lengths).T
