"""Ranking objectives."""
from __future__ import annotations

import torch


def triplet_ranking_loss(sims: torch.Tensor, margin: float = 0.2, hardest: bool = True,
                         image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Hinge triplet ranking loss, CASC Eqs. (8)-(9) (and CCCL Eq. (33)), summed over the batch.

    sims [B, B]: sims[i, c] scores image of pair i against caption of pair c; pair n is positive.
    `hardest=True` keeps only the hardest in-batch negative per positive (VSE++/SCAN); otherwise sums all.
    `image_ids` [B]: pairs sharing an image are not negatives of each other (a caption batch can hold
    two captions of one image; the original code would push them apart).
    """
    if sims.dim() != 2 or sims.shape[0] != sims.shape[1]:
        raise ValueError(f"triplet loss needs a square [B, B] similarity matrix, got {tuple(sims.shape)}")
    pos = sims.diagonal()
    if image_ids is None:
        same = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    else:
        same = image_ids[:, None] == image_ids[None, :]
    cost_caption = (margin + sims - pos[:, None]).clamp_min(0).masked_fill(same, 0)  # image i, negative caption c
    cost_image = (margin + sims - pos[None, :]).clamp_min(0).masked_fill(same, 0)  # caption c, negative image i
    if hardest:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()
