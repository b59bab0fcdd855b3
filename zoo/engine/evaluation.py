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
    """Gathers one modality from every rank, drops duplicates (sampler padding) and sorts by id.

    Items already in id order 0..expected-1 (one process, an unshuffled loader) are returned as they are: no
    copy of the embeddings, which on a GPU are the largest tensors of an evaluation.
    """
    ids = gather_padded(ids)
    emb = {k: gather_padded(v) for k, v in emb.items()}
    if ids.numel() and (ids.min() < 0 or ids.max() >= expected):
        raise RuntimeError(f"{what} ids out of range [0, {expected}) during evaluation")
    if ids.numel() == expected and torch.equal(ids, torch.arange(expected, device=ids.device)):
        return emb
    order = torch.full((expected,), -1, dtype=torch.long, device=ids.device)
    order[ids] = torch.arange(ids.numel(), device=ids.device)
    if (order < 0).any():
        raise RuntimeError(f"evaluation saw only {int((order >= 0).sum())} of {expected} {what}")
    return {k: v[order] for k, v in emb.items()}


def _word_indexed(v: torch.Tensor) -> bool:
    return v.dim() >= 3 or (v.dim() == 2 and not v.is_floating_point())


def trim_padding(cap: Emb) -> Emb:
    """Cuts caption tensors down to the longest caption of this block (dims that had the old max length).

    Word-indexed tensors are [C, L, ...] features/graphs or [C, L] integer/bool ids and masks; a 2-D floating
    tensor is a per-caption vector [C, d] and is never cut, even when d happens to equal the longest length.
    """
    if "lengths" not in cap:
        return cap
    old = None
    for k, v in cap.items():
        if k != "lengths" and _word_indexed(v):
            old = v.shape[1]
            break
    new = int(cap["lengths"].max())
    if old is None or new >= old:
        return cap
    out = {}
    for k, v in cap.items():
        if not _word_indexed(v):
            out[k] = v
            continue
        sl = [slice(None)] * v.dim()
        for d in range(1, min(v.dim(), 3)):
            if v.shape[d] == old:
                sl[d] = slice(0, new)
        out[k] = v[tuple(sl)]
    return out


# ---- block sizes --------------------------------------------------------------------------------------
GPU_PEAK_CAP_BYTES = 16 * 2**30  # a COCO-5K evaluation stays under this on any card, whatever the gallery
CPU_BLOCK_BYTES = 1 * 2**30  # working set of one block on the CPU
WORKING_COPIES = 8  # live float32 [block pairs x R x L] tensors of the fast path (the reference keeps more)


def pair_cost(img: Emb, cap: Emb) -> int:
    """Elements per (image, caption) pair of a pair-dependent scorer: rows of an image x rows of a caption.

    Rows are dim 1 of the first >= 3-d tensor of each side (regions, words); 1 for global vectors. For word
    sequences the mean real length is used (the fast path buckets captions by exact length).
    """
    def rows(emb: Emb, lengths: torch.Tensor | None) -> float:
        for v in emb.values():
            if v.dim() >= 3:
                return float(lengths.float().mean()) if lengths is not None and lengths.numel() else v.shape[1]
        return 1.0

    return max(1, int(round(rows(img, None) * rows(cap, cap.get("lengths")))))


def auto_blocks(img: Emb, cap: Emb, device: torch.device | str | None = None, *, free_bytes: int | None = None,
                allocated_bytes: int | None = None, cap_bytes: int = GPU_PEAK_CAP_BYTES,
                copies: int = WORKING_COPIES) -> tuple[int, int]:
    """(image_block, caption_block) for score_blockwise from the memory available.

    GPU: the block's working set (pairs x pair_cost x 4 bytes x `copies`, plus 3 float32 copies of the block's
    captions and images: packed/unit words, unit regions) gets at most 80 % of the free memory
    (torch.cuda.mem_get_info) and at most cap_bytes minus what is already allocated (embeddings) and the
    [I, C] float32 result, so the evaluation's peak stays under cap_bytes (16 GB). CPU: a 1 GB working set
    (the fast path then walks each block in cache-sized chunks). free_bytes / allocated_bytes override the
    measured figures (tests). Captions get the long side (at least 16 images per block when possible) so that
    length buckets stay large.
    """
    device = torch.device(device) if device is not None else next(iter(img.values())).device
    n_img = next(iter(img.values())).shape[0]
    n_cap = next(iter(cap.values())).shape[0]
    per_pair = pair_cost(img, cap) * 4 * copies
    if device.type == "cuda" or free_bytes is not None:
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(device)[0]
        if allocated_bytes is None:
            allocated_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        result = n_img * n_cap * 4 * 2  # sims, plus its reordered copy
        budget = min(0.8 * free_bytes, cap_bytes - allocated_bytes - result)
    else:
        budget = CPU_BLOCK_BYTES
    # per-item copies a scorer makes of its block's inputs (packed / unit words, unit regions, Grams): 3 each
    per_cap, per_img = 3 * _item_bytes(cap, cap.get("lengths")), 3 * _item_bytes(img, None)
    pairs = max(1, int(budget // per_pair))
    caption_block = max(1, min(n_cap, pairs // min(16, max(1, n_img)), int(budget // 4 // max(1, per_cap))))
    left = budget - caption_block * per_cap
    image_block = max(1, min(n_img, int(left // (caption_block * per_pair + per_img))))
    return image_block, caption_block


def _item_bytes(emb: Emb, lengths: torch.Tensor | None) -> float:
    """float32 bytes of one item's per-row tensors (rows = real words when lengths are given)."""
    total = 0.0
    for k, v in emb.items():
        if k == "lengths" or not v.is_floating_point():
            continue
        per = float(v[0].numel()) if v.shape[0] else 0.0
        if lengths is not None and lengths.numel() and v.dim() >= 3:
            per = per / v.shape[1] * float(lengths.float().mean())
        total += per * 4
    return total


def score_blockwise(score: Callable[[Emb, Emb], torch.Tensor], img: Emb, cap: Emb, image_block: int | None,
                    caption_block: int | None, progress: bool = False, desc: str = "scoring") -> torch.Tensor:
    """sims [I, C] from a pairwise scorer, never a Python loop over single captions.

    Captions are visited in length order so each block carries as little padding as possible (and a scorer
    that buckets by length gets long runs of equal lengths); each block gathers its own captions, so the
    caption embeddings are never copied whole. Block sizes of 0/None are chosen by auto_blocks;
    on a GPU the given sizes are upper bounds, shrunk to what auto_blocks allows, so that no recipe's fixed
    sizes can exceed the memory cap.
    """
    n_img = next(iter(img.values())).shape[0]
    n_cap = next(iter(cap.values())).shape[0]
    device = next(iter(img.values())).device
    if not image_block or not caption_block or device.type == "cuda":
        auto_i, auto_c = auto_blocks(img, cap, device)
        image_block = min(image_block, auto_i) if image_block else auto_i
        caption_block = min(caption_block, auto_c) if caption_block else auto_c
    order = torch.argsort(cap["lengths"], descending=True, stable=True) if "lengths" in cap else None
    sims = None
    blocks = [(a, c) for a in range(0, n_img, image_block) for c in range(0, n_cap, caption_block)]
    for a, c in track(blocks, desc=desc, enabled=progress):
        ib = {k: v[a : a + image_block] for k, v in img.items()}
        if order is None:
            cb = {k: v[c : c + caption_block] for k, v in cap.items()}
        else:
            rows = order[c : c + caption_block]
            cb = trim_padding({k: v.index_select(0, rows.to(v.device)) for k, v in cap.items()})
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
