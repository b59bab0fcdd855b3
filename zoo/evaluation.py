"""Evaluation plumbing shared by every method: collect embeddings, gather across ranks, score in blocks.

Embeddings are dicts of tensors whose first dimension indexes items (images or captions); a method is
free to put anything there (region features, global vectors, word features and lengths, graphs, ...).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from .progress import track

Emb = dict[str, torch.Tensor]


def pad_dim(x: torch.Tensor, dim: int, size: int, value: float = 0) -> torch.Tensor:
    if x.shape[dim] >= size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def cat_embeddings(chunks: list[Emb]) -> Emb:
    """Concatenates per-batch dicts along dim 0, zero-padding every other dim to the largest chunk."""
    out = {}
    for key in chunks[0]:
        parts = [c[key] for c in chunks]
        ndim = parts[0].dim()
        for d in range(1, ndim):
            size = max(p.shape[d] for p in parts)
            parts = [pad_dim(p, d, size) for p in parts]
        out[key] = torch.cat(parts)
    return out


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_padded(x: torch.Tensor) -> torch.Tensor:
    """all_gather of tensors whose sizes differ across ranks (any dim); result concatenated on dim 0."""
    if not _dist_ready():
        return x
    world = dist.get_world_size()
    shape = torch.tensor(x.shape, device=x.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    max_shape = torch.stack(shapes).max(0).values.tolist()
    padded = x
    for d, size in enumerate(max_shape):
        padded = pad_dim(padded, d, size)
    bufs = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded.contiguous())
    parts = []
    for buf, s in zip(bufs, shapes):
        parts.append(buf[: int(s[0])])  # other dims stay padded to the common maximum
    return torch.cat(parts)


def gather_and_order(emb: Emb, ids: torch.Tensor, expected: int, what: str) -> Emb:
    """Gathers one modality from every rank, drops duplicates (sampler padding) and sorts by id."""
    ids = gather_padded(ids)
    emb = {k: gather_padded(v) for k, v in emb.items()}
    order = torch.full((expected,), -1, dtype=torch.long, device=ids.device)
    if ids.numel() and (ids.min() < 0 or ids.max() >= expected):
        raise RuntimeError(f"{what} ids out of range [0, {expected}) during evaluation")
    order[ids] = torch.arange(ids.numel(), device=ids.device)
    if (order < 0).any():
        raise RuntimeError(f"evaluation saw only {int((order >= 0).sum())} of {expected} {what}")
    return {k: v[order] for k, v in emb.items()}


def trim_padding(cap: Emb) -> Emb:
    """Cuts caption tensors down to the longest caption of this block (dims that had the old max length)."""
    if "lengths" not in cap:
        return cap
    old = None
    for k, v in cap.items():
        if k != "lengths" and v.dim() >= 2:
            old = v.shape[1]
            break
    new = int(cap["lengths"].max())
    if old is None or new >= old:
        return cap
    out = {}
    for k, v in cap.items():
        sl = [slice(None)] * v.dim()
        for d in range(1, min(v.dim(), 3)):
            if v.shape[d] == old:
                sl[d] = slice(0, new)
        out[k] = v[tuple(sl)]
    return out


def score_blockwise(score: Callable[[Emb, Emb], torch.Tensor], img: Emb, cap: Emb, image_block: int,
                    caption_block: int, progress: bool = False, desc: str = "scoring") -> torch.Tensor:
    """sims [I, C] from a pairwise scorer, never a Python loop over single captions.

    Captions are visited in length order so each block carries as little padding as possible.
    """
    n_img = next(iter(img.values())).shape[0]
    n_cap = next(iter(cap.values())).shape[0]
    if "lengths" in cap:
        order = torch.argsort(cap["lengths"], descending=True)
        cap = {k: v[order] for k, v in cap.items()}
    else:
        order = None
    sims = None
    blocks = [(a, c) for a in range(0, n_img, image_block) for c in range(0, n_cap, caption_block)]
    for a, c in track(blocks, desc=desc, enabled=progress):
        ib = {k: v[a : a + image_block] for k, v in img.items()}
        cb = trim_padding({k: v[c : c + caption_block] for k, v in cap.items()})
        s = score(ib, cb)
        if sims is None:
            sims = torch.empty(n_img, n_cap, dtype=torch.float32, device=s.device)
        sims[a : a + s.shape[0], c : c + s.shape[1]] = s.float()
    assert sims is not None
    if order is not None:
        out = torch.empty_like(sims)
        out[:, order] = sims
        sims = out
    return sims
