"""CCCL's hybrid loss (Sec. 3.4): cross-modal coherence term (Eqs. (29)-(31)) + alignment term (Eqs. (33)-(34))."""
from __future__ import annotations

from itertools import combinations

import torch

from .losses import triplet_ranking_loss


def coherence_loss(scores: dict[str, torch.Tensor] | list[torch.Tensor], reduction: str = "sum") -> torch.Tensor:
    """L_c = sum_{i,j} D(I_i, Z_j), D(I, Z) = sum over branch pairs of D(S^a, S^b), D(x, y) = sqrt((x - y)^2) = |x - y|.

    CCCL Eqs. (29)-(31): every branch score matrix [B, B] covers all b^2 in-batch pairs. |x - y| is written as abs
    (the printed sqrt((x - y)^2) has an infinite slope at x = y). reduction='mean' divides by b^2 (not the paper's).
    With fewer than two branches there is nothing to keep coherent: 0.
    """
    mats = list(scores.values()) if isinstance(scores, dict) else list(scores)
    if len(mats) < 2:
        return mats[0].new_zeros(()) if mats else torch.zeros(())
    total = sum((a - b).abs().sum() for a, b in combinations(mats, 2))
    if reduction == "mean":
        return total / mats[0].numel()
    if reduction != "sum":
        raise ValueError(f"unknown reduction {reduction!r}: use 'sum' or 'mean'")
    return total


def hybrid_loss(fused: torch.Tensor, branch_scores: dict[str, torch.Tensor], margin: float = 0.2,
                coherence_weight: float = 0.5, hardest: bool = True, image_ids: torch.Tensor | None = None,
                reduction: str = "sum") -> dict[str, torch.Tensor]:
    """L = L_t + lambda L_c, CCCL Eqs. (33)-(34): hardest-negative triplet on F (Eq. 32) plus the coherence term.

    Returns the two terms separately ({"triplet", "coherence"}, the latter already multiplied by lambda; no
    coherence entry when lambda = 0, "w/o SC-loss").
    """
    out = {"triplet": triplet_ranking_loss(fused, margin, hardest, image_ids)}
    if coherence_weight:
        out["coherence"] = coherence_weight * coherence_loss(branch_scores, reduction)
    return out
