"""Numerically safe primitives shared by every block.

Padded words and all-zero vectors are normal here (padding, empty regions), so every norm, square
root and softmax is written so that it stays finite, forward *and* backward, at zero. Sums of squares
are taken in float32 even under fp16/bf16 autocast: in fp16 they overflow (> 65504) for ordinary
1024-d features, and eps^2 = 1e-16 would round to zero.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

EPS = 1e-8

_reference_depth = 0


@contextmanager
def reference_scoring(enabled: bool = True):
    """Inside this block every fast path with a kept slow reference runs the reference instead.

    (cross-attention scoring, and the text encoder's output placement); also ZOO_REFERENCE_SCORING=1.
    """
    global _reference_depth
    _reference_depth += 1 if enabled else 0
    try:
        yield
    finally:
        _reference_depth -= 1 if enabled else 0


def use_reference() -> bool:
    return _reference_depth > 0 or os.environ.get("ZOO_REFERENCE_SCORING", "") not in ("", "0")


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (half types are widened; float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def head_fp32(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """head(x).squeeze(-1) in float32 whatever the autocast (float64 models: float64): a method's last layer.

    Every score that leaves a method goes out in float32 (issue 19): trained scores lie in a narrow band (CCCL's
    sigmoid: 0.479-0.485 on SynthScenes) where bf16's spacing (2^-9 near 0.5) leaves a few distinct values per
    row, and ties count against the model (CCCL rsum 11.2 in bf16 against 44.8 in fp32). The input stays in the
    autocast dtype up to here; the head is small (P x P at most).
    """
    with torch.autocast(x.device.type, enabled=False):
        dt = torch.promote_types(next(head.parameters()).dtype, torch.float32)
        return head(x.to(dt)).squeeze(-1)


def sigmoid_head(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """sigmoid(head(x)).squeeze(-1) in float32 (head_fp32): CCCL's VSF scorer, SGRAF's sim_eval."""
    return torch.sigmoid(head_fp32(head, x))


def inner_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [I, d] . b [C, d] for every pair -> [I, C] in float32 whatever the autocast (the scores of embedding
    methods: VSE++, VSE-infinity, DAN). A bf16 product of unit vectors keeps ~3 significant digits, so matched
    and near-matched pairs would tie (head_fp32)."""
    with torch.autocast(a.device.type, enabled=False):
        dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return a.to(dt) @ b.to(dt).T


def safe_sqrt(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """sqrt(max(x, eps^2)) in float32: finite value and gradient at 0 (plain sqrt has an infinite slope there)."""
    return torch.sqrt(wide(x).clamp_min(eps * eps)).to(x.dtype)


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """x / ||x||_2 along `dim`; a (near-)zero vector (norm < eps) maps to zero with a zero gradient.

    (Clamping the norm alone would leave a 1/eps = 1e8 gradient at zero: finite in float32, Inf in fp16.)
    """
    xf = wide(x)
    sq = (xf * xf).sum(dim, keepdim=True)
    y = xf * torch.rsqrt(sq.clamp_min(eps * eps))
    return torch.where(sq > eps * eps, y, torch.zeros_like(y)).to(x.dtype)


def l1_normalize(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    xf = wide(x)
    return (xf / xf.abs().sum(dim, keepdim=True).clamp_min(eps)).to(x.dtype)


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """[C] lengths -> [C, L] bool mask, True on real tokens."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean of x over `dim` counting only mask==True entries (mask broadcastable to x)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_log_sum_exp(x: torch.Tensor, mask: torch.Tensor, temperature: float, dim: int = -1) -> torch.Tensor:
    """SCAN's LogSumExp pooling: (1/t) log sum_valid exp(t x)."""
    z = (x * temperature).masked_fill(~mask, float("-inf"))
    return torch.logsumexp(z, dim=dim) / temperature


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str = "mean", lse_temperature: float = 6.0,
              dim: int = -1) -> torch.Tensor:
    """Pools per-item similarities into one score: 'mean' (CASC Eq. 5/7 averages) or 'lse' (SCAN)."""
    mask = mask.expand_as(x)
    if how == "mean":
        return masked_mean(x, mask, dim)
    if how == "lse":
        return masked_log_sum_exp(x, mask, lse_temperature, dim)
    raise ValueError(f"unknown aggregation {how!r}: use 'mean' or 'lse'")


SCORE_NORMS = ("clipped_l2", "relu_l2", "l2", "clipped_l1", "l1", "softmax", "none")


def normalize_scores(s: torch.Tensor, query_mask: torch.Tensor | None, how: str = "clipped_l2",
                     dim: int = -2) -> torch.Tensor:
    """Normalises raw region-word scores over the *query* axis before the attention softmax.

    'clipped_l2' is SCAN's (and CASC's): LeakyReLU(0.1) then l2 over the query side; 'relu_l2' is
    CCCL's Eq. (17) (ReLU then l2). Padded query items are zeroed first so they do not enter the norm
    (query_mask None = every query item is real).
    """
    if how == "none":
        return s
    if how == "softmax":
        if query_mask is None:
            return torch.softmax(s, dim=dim)
        qm = query_mask.expand_as(s)
        return torch.softmax(s.masked_fill(~qm, float("-inf")), dim=dim).masked_fill(~qm, 0.0)
    if how.startswith("clipped"):
        s = F.leaky_relu(s, 0.1)
    elif how.startswith("relu"):
        s = F.relu(s)
    if query_mask is not None:
        s = s * query_mask.to(s.dtype)
    if how.endswith("l2"):
        return l2_normalize(s, dim=dim)
    if how.endswith("l1"):
        return l1_normalize(s, dim=dim)
    raise ValueError(f"unknown score normalisation {how!r}: use one of {SCORE_NORMS}")
