"""CCCL's similarity vectors and scorer: Branch 1 (Eqs. (13)-(16)), Branch 2 (Eqs. (17)-(20)), MLP (Eq. (28)), F (Eq. (32)).

Pairwise functions take a block of I images and C captions and return [I, C, P] similarity vectors (P = 1 for
the cosine variant, "w/o VSF"). Branch 2 materialises attended vectors, [I, C, R, d] and [I, C, L, d], for the
block it is given only: callers keep blocks small (CCCL.score splits its input by a pair budget).
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import attention_weights, region_word_scores
from .functional import l2_normalize, masked_mean, sigmoid_head


class VectorSimilarity(nn.Module):
    """VSF(a, b, W) = W |a - b|^2 / ||W |a - b|^2||_2, CCCL Eq. (15), W in R^{P x d}. a, b [..., d] -> [..., P].

    use_vsf=False ("w/o VSF"): the cosine of a and b instead, as a [..., 1] vector.
    normalize_inputs=True (default): a and b are l2-normalised first, as in SGRAF's code, which the paper names as
    the source of the VSF. Eq. (15) as printed (False) compares raw vectors: when one side is much longer than the
    other, |a - b|^2 is nearly the same for every partner and the scores of all pairs collapse together (observed
    on SynthScenes: no learning).
    bias=True: W has a bias, as SGRAF's sim_tranloc_w / sim_tranglo_w (SGRAF model.py:311-312), which also feeds
    its (already l2-normalised) vectors in unchanged: normalize_inputs=False there.
    """

    def __init__(self, dim: int, sim_dim: int = 256, use_vsf: bool = True, normalize_inputs: bool = True,
                 bias: bool = False):
        super().__init__()
        self.use_vsf = use_vsf
        self.normalize_inputs = normalize_inputs
        self.weight = nn.Linear(dim, sim_dim, bias=bias) if use_vsf else None
        self.out_dim = sim_dim if use_vsf else 1

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.use_vsf:
            return (l2_normalize(a) * l2_normalize(b)).sum(-1, keepdim=True)
        if self.normalize_inputs:
            a, b = l2_normalize(a), l2_normalize(b)
        return l2_normalize(self.weight((a - b) ** 2))

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a [I, d], b [C, d] -> [I, C, P]."""
        return self(a[:, None, :], b[None, :, :])


GLOBAL_POOLS = ("max+mean", "max", "mean")


def global_pool(x: torch.Tensor, mask: torch.Tensor | None, how: str = "max+mean") -> torch.Tensor:
    """CCCL Eq. (13): v^ = max-pool + average-pool over the items (real ones only). x [B, N, d] -> [B, d].

    how='max' is "w/o A-Pool", 'mean' is "w/o M-Pool". An item set with no real item pools to 0.
    """
    if how not in GLOBAL_POOLS:
        raise ValueError(f"unknown pooling {how!r}: use one of {GLOBAL_POOLS}")
    m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
    out = 0
    if "max" in how:
        mx = x.masked_fill(~m[..., None], float("-inf")).max(dim=1).values
        out = out + torch.where(m.any(1)[:, None], mx, torch.zeros_like(mx))
    if "mean" in how:
        out = out + masked_mean(x, m[..., None], dim=1)
    return out


class GlobalEmbedding(nn.Module):
    """v^S = W_v (max + mean pooling of V) + b_v, CCCL Eqs. (13)-(14) (one of these per modality: the paper's
    Eq. (14) prints W_v twice but lists W_v and W_t, so each modality has its own layer)."""

    def __init__(self, dim: int, pooling: str = "max+mean"):
        super().__init__()
        if pooling not in GLOBAL_POOLS:
            raise ValueError(f"unknown pooling {pooling!r}: use one of {GLOBAL_POOLS}")
        self.fc = nn.Linear(dim, dim)
        self.pooling = pooling

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(global_pool(x, mask, self.pooling))


def local_similarity(regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, vsf_v2t: VectorSimilarity,
                     vsf_t2v: VectorSimilarity, smooth: float = 9.0) -> torch.Tensor:
    """Branch 2, CCCL Eqs. (17)-(20): sim^O = sim^O_{V->T} + sim^O_{T->V}, [I, C, P].

    regions V [I, R, d], words T [C, L, d] with lengths [C]. M_ij = cos(v_i, t_j); Eq. (17) normalises ReLU(M) with
    an l2 norm over the query side (printed self-referentially; read as SCAN's convention) and smooths the softmax
    over the context side with `smooth` (the paper's unvalued lambda of Eq. (17), here 9 as in SCAN/CASC;
    not the loss weight lambda of Eq. (34)). u_i^T = sum_j w_ij t_j (regions attend to words), VSF per region,
    mean over regions (Eq. 18); likewise words attend to regions, mean over real words (Eq. 19); summed (Eq. 20).
    With cosine similarities ("w/o VSF") the two directions are averaged instead, so the score stays in [-1, 1].
    """
    sc = region_word_scores(regions, words, lengths)
    dtype = sc.cosine.dtype
    wm = sc.word_mask
    words = words.to(dtype) * wm[..., None].to(dtype)
    regions = regions.to(dtype)
    # V -> T: query = regions (dim -2), context = words (dim -1)
    alpha = attention_weights(sc.cosine, None, wm[None, :, None, :], smooth, "relu_l2")  # [I, C, R, L]
    u_t = torch.einsum("icrl,cld->icrd", alpha, words)
    s_v2t = vsf_v2t(regions[:, None], u_t).mean(2)  # Eq. (18)
    # T -> V: query = words (dim -1), context = regions (dim -2)
    beta = attention_weights(sc.cosine, wm[None, :, None, :], None, smooth, "relu_l2", context_dim=-2)
    u_v = torch.einsum("icrl,ird->icld", beta, regions)
    s_t2v = masked_mean(vsf_t2v(words[None], u_v), wm[None, :, :, None], dim=2)  # Eq. (19)
    if not vsf_v2t.use_vsf:
        return 0.5 * (s_v2t + s_t2v)
    return s_v2t + s_t2v  # Eq. (20)


class SimilarityScorer(nn.Module):
    """CCCL Eq. (28): S = sigmoid(W_2 max(W_1 s + b_1, 0) + b_2), one MLP shared by the branches.

    The text says the last layer is a softmax, the equation a sigmoid: a softmax over one output is constant,
    so sigmoid. kind='linear' ("w/o MLP"): a separate P -> 1 layer (+ sigmoid) per branch.
    kind='identity' (used with cosine similarities, "w/o VSF"): the [.., 1] cosine is the score.
    """

    def __init__(self, sim_dim: int, branches: tuple[str, ...], kind: str = "mlp"):
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(sim_dim, sim_dim), nn.ReLU(), nn.Linear(sim_dim, 1))
        elif kind == "linear":
            self.heads = nn.ModuleDict({b: nn.Linear(sim_dim, 1) for b in branches})
        elif kind != "identity":
            raise ValueError(f"unknown scorer {kind!r}: use 'mlp', 'linear' or 'identity'")

    def forward(self, sims: torch.Tensor, branch: str) -> torch.Tensor:
        """sims [..., P] -> scores [...], float32 under autocast.

        The MLP (both layers, small: P x P) and the sigmoid run in float32 whatever the autocast
        (functional.sigmoid_head, issue 19); the similarity vectors it reads stay in the autocast dtype.
        """
        if self.kind == "identity":
            return sims.squeeze(-1)
        return sigmoid_head(self.mlp if self.kind == "mlp" else self.heads[branch], sims)


def fuse_scores(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """F(I, Z) = mean of the branch scores, CCCL Eq. (32) (1/3 (S^S + S^O + S^R) with all three branches)."""
    return torch.stack(list(scores.values())).mean(0)


__all__ = ["VectorSimilarity", "global_pool", "GlobalEmbedding", "local_similarity", "SimilarityScorer",
           "fuse_scores"]
