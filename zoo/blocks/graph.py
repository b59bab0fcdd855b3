"""CCCL Branch 3 (Sec. 3.3.3, Eqs. (21)-(27)): affinity graphs, residual GCN, context GRU.

Everything up to the GCN output is per image / per caption. The GRU is pair-dependent: the image's GRU^V reads
the *caption's* Branch-1 vector t^S first, then the image's nodes (and GRU^T reads v^S, then the words), so it
runs once per scored pair. `pair_gru_last_state` batches these recurrences over a whole block of pairs: the
input projections W_ih x + b_ih of every node are computed once per image / caption (`gru_input_projection`),
the first step (from h_0 = 0) once per item of the first vector's side, and only the h W_hh products run per
pair. `slow_pair_gru_last_state` is the per-pair reference (nn.GRU on each pair's sequence).
"""
from __future__ import annotations

import math

import torch
from torch import nn

EDGE_NORMS = ("softmax", "mean", "none")


class AffinityGraph(nn.Module):
    """W_ij = (W_1 x_i)^T (W_2 x_j), CCCL Eq. (21) (visual) and Eq. (22) (textual, W'_1, W'_2). x [B, N, d] -> [B, N, N]."""

    def __init__(self, dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, dim, bias=False)
        self.w2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.w1(x), self.w2(x).transpose(-1, -2))


def edge_weights(affinity: torch.Tensor, edges: torch.Tensor, how: str = "softmax") -> torch.Tensor:
    """The edge weight matrix W_e from affinities [B, N, N] and the edge set edges [B, N, N] (bool).

    Eq. (23) for text: W_e^T = W^T o W^D, i.e. only dependency arcs are edges (a pair without an arc gets weight
    exactly 0). The paper does not normalise the raw affinities (unbounded dot products); we state ours:
    'softmax' (default): over each node's edges (ResidualGCN scales affinities by 1/sqrt(d) first), so every
    node's weights sum to 1 and a node without edges gets none; 'mean': affinity / (number of edges of the node) (VSRN's R / N); 'none': as printed.
    """
    if how == "softmax":
        has = edges.any(-1, keepdim=True)
        # a node without edges gets finite dummy logits (an all -inf row is NaN, forward and backward), then 0
        logits = affinity.masked_fill(~edges, float("-inf")).masked_fill(~has, 0.0)
        return torch.where(has, torch.softmax(logits, dim=-1), torch.zeros_like(affinity))
    if how == "mean":
        return affinity * edges / edges.sum(-1, keepdim=True).clamp_min(1)
    if how == "none":
        return affinity * edges
    raise ValueError(f"unknown edge normalisation {how!r}: use one of {EDGE_NORMS}")


def dependency_edges(adjacency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W^D as a bool edge set: the parser's arcs [C, L, L] between real words (mask [C, L])."""
    return (adjacency > 0) & mask[:, :, None] & mask[:, None, :]


def full_edges(mask: torch.Tensor) -> torch.Tensor:
    """A fully connected graph over the real items (self loops included), as for the visual graph."""
    return mask[:, :, None] & mask[:, None, :]


class ResidualGCN(nn.Module):
    """H^ = H + W_R (W_e H W_G), CCCL Eq. (24), applied `layers` times with the same edge weights (Eq. 25).

    W_R is printed as an N x N matrix, which cannot be a parameter for captions of varying length: we read it as
    a d x d projection (VSRN's residual weight), H^ = H + (W_e H W_G) W_R. Affinities (Eqs. 21-22) come from the
    input nodes and are scaled by 1/sqrt(d) before the edge normalisation (see edge_weights).
    """

    def __init__(self, dim: int, layers: int = 1, edge_norm: str = "softmax"):
        super().__init__()
        if edge_norm not in EDGE_NORMS:
            raise ValueError(f"unknown edge normalisation {edge_norm!r}: use one of {EDGE_NORMS}")
        self.affinity = AffinityGraph(dim)
        self.w_g = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        self.w_r = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        self.edge_norm = edge_norm
        self.dim = dim

    def edge_weights(self, h: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        aff = self.affinity(h)
        if self.edge_norm == "softmax":
            aff = aff / math.sqrt(self.dim)
        return edge_weights(aff, edges, self.edge_norm)

    def forward(self, h: torch.Tensor, edges: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        we = self.edge_weights(h, edges)
        for w_g, w_r in zip(self.w_g, self.w_r):
            h = h + w_r(torch.matmul(we, w_g(h)))
        if mask is not None:
            h = h * mask[..., None].to(h.dtype)
        return h


def gru_input_projection(gru: nn.GRU, x: torch.Tensor) -> torch.Tensor:
    """W_ih x + b_ih of a one-layer nn.GRU for any [..., d] (pair-independent, computed once per item)."""
    return nn.functional.linear(x, gru.weight_ih_l0, gru.bias_ih_l0)


def gru_step(gru: nn.GRU, gi: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """One nn.GRU step from precomputed input gates gi [..., 3d] and state h [..., d] (None = zeros)."""
    d = gru.hidden_size
    gh = gru.bias_hh_l0 if h is None else nn.functional.linear(h, gru.weight_hh_l0, gru.bias_hh_l0)
    i_r, i_z, i_n = gi.split(d, -1)
    h_r, h_z, h_n = gh.split(d, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n if h is None else (1 - z) * n + z * h


def pair_gru_last_state(gru: nn.GRU, first_gi: torch.Tensor | None, node_gi: torch.Tensor,
                        lengths: torch.Tensor | None = None) -> torch.Tensor:
    """CCCL Eq. (26) for every pair of a block: last state of GRU([x_a, n_b1, ..., n_bN_b]) -> [A, B, d].

    first_gi [A, 3d]: input projection of the first vector of each sequence (the other modality's Branch-1
    vector); node_gi [B, N, 3d]: input projections of the nodes; lengths [B] real nodes (None = all N).
    first_gi None ("w/o C-GRU"): sequences of nodes only, -> [1, B, d] (pair-independent).
    """
    b, n, _ = node_gi.shape
    h = None if first_gi is None else gru_step(gru, first_gi, None)[:, None, :]  # [A, 1, d]: once per item of A
    shortest = n if lengths is None else int(lengths.min())
    for k in range(n):
        new = gru_step(gru, node_gi[None, :, k], h)  # [A, B, d] (or [1, B, d])
        if k >= shortest:  # a sequence that has ended keeps its state
            old = new.new_zeros(()) if h is None else h
            new = torch.where((k < lengths)[None, :, None], new, old)
        h = new
    if h is None:  # no nodes and no first vector
        return node_gi.new_zeros(1, b, gru.hidden_size)
    return h.expand(-1, b, -1)


def slow_pair_gru_last_state(gru: nn.GRU, first: torch.Tensor | None, nodes: torch.Tensor, length: int) -> torch.Tensor:
    """Reference for one pair: nn.GRU over [first, nodes[:length]] (first None: nodes only) -> [d]."""
    seq = nodes[:length] if first is None else torch.cat([first[None], nodes[:length]])
    if seq.shape[0] == 0:
        return nodes.new_zeros(gru.hidden_size)
    out, _ = gru(seq[None])
    return out[0, -1]


class ContextGRU(nn.Module):
    """The two GRUs of CCCL Eq. (26) (GRU^V over {t^S, v^_1..v^_n}, GRU^T over {v^S, t^_1..t^_m}), hidden size d."""

    def __init__(self, dim: int):
        super().__init__()
        self.image_gru = nn.GRU(dim, dim, batch_first=True)
        self.text_gru = nn.GRU(dim, dim, batch_first=True)
