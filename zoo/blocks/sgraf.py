"""SGRAF's blocks (Diao et al., AAAI 2021): global self-attention pooling, alignment vectors, SAF and SGR.

Official code: Paranioar/SGRAF `python3.6` @ a19d1a9 (model.py); line numbers below refer to that file. Every
block is batched over a block of I images x C captions ([I, C, ...]); the official code loops over captions
(model.py:335-366) and slices each to its real words, which here is a word mask: padded words never enter a
softmax, a norm or a batch statistic, and padded outputs are exact zeros.

| official (model.py)                 | here                                             |
|-------------------------------------|--------------------------------------------------|
| VisualSA / TextSA (131-227)         | SelfAttentionPool (regions: BatchNorm1d over the 36 region slots) |
| SCAN_attention (384-416)            | sgraf_attended_regions (attention.attention_weights, 'clipped_l2' over the words, softmax x9 over regions) |
| sim_tranloc_w / sim_tranglo_w (346-351) | vsf.VectorSimilarity(normalize_inputs=False, bias=True) (CCCL Eq. (15)) |
| AttentionFiltration (265-293)       | AttentionFiltration (BN(1) statistics per caption, as the caption loop has them) |
| GraphReasoning (230-262)            | GraphReasoning                                   |
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import attention_weights
from .functional import l1_normalize, l2_normalize, masked_mean


class SelfAttentionPool(nn.Module):
    """SGRAF's VisualSA / TextSA (model.py:131-227): g = l2(sum_k w_k x_k), w = softmax_k(W_c (e_l(x_k) * e_g(mean x))).

    e_l = Linear -> [BatchNorm1d(num_items) for images] -> Tanh -> Dropout, e_g = Linear -> [BatchNorm1d(d)] -> Tanh
    -> Dropout, W_c = Linear(d, 1). `num_items` (images only, the official 36) sizes the BatchNorm1d over the item
    axis, so exactly that many items in a fixed order are needed; text (num_items None) has no BatchNorm and pools
    over the real words only. x [B, N, d], mask [B, N] or None -> [B, d].
    """

    def __init__(self, dim: int, dropout: float = 0.4, num_items: int | None = None):
        super().__init__()
        self.num_items = num_items
        bn = num_items is not None
        self.local = nn.Sequential(nn.Linear(dim, dim), *([nn.BatchNorm1d(num_items)] if bn else []), nn.Tanh(),
                                   nn.Dropout(dropout))
        self.glob = nn.Sequential(nn.Linear(dim, dim), *([nn.BatchNorm1d(dim)] if bn else []), nn.Tanh(),
                                  nn.Dropout(dropout))
        self.common = nn.Linear(dim, 1)
        for m in self.modules():  # official init_weights (model.py:152-161): Xavier-uniform, zero bias
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_items is not None and x.shape[1] != self.num_items:
            raise ValueError(f"SGRAF's VisualSA has BatchNorm1d({self.num_items}) over the region axis (fixed in the "
                             f"official code, model.py:308): images need exactly {self.num_items} regions, got "
                             f"{x.shape[1]} (set model.num_regions to the data's region count)")
        m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
        x = x * m[..., None].to(x.dtype)
        ave = masked_mean(x, m[..., None], dim=1)
        w = self.common(self.local(x) * self.glob(ave)[:, None]).squeeze(-1)
        w = torch.softmax(w.masked_fill(~m, float("-inf")), dim=1).masked_fill(~m, 0.0)
        return l2_normalize((w[..., None] * x).sum(1))


def sgraf_attended_regions(regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                           smooth: float = 9.0) -> torch.Tensor:
    """SGRAF's SCAN_attention(words, regions) (model.py:384-416) for a block: [I, R, d], [C, L, d] -> [I, C, L, d].

    a_rl = LeakyReLU_0.1(r . w_l), l2-normalised over the (real) words, softmax over regions of smooth * a, and
    the attended region vector of each word l2-normalised: SCAN's t2i weights (attention.attention_weights,
    'clipped_l2' on the query = word axis). Padded words give zero vectors.
    """
    dots = torch.einsum("ird,cld->icrl", regions, words)  # raw dot products, as the official bmm
    wm = word_mask[None, :, None, :]
    alpha = attention_weights(dots, wm, None, smooth, "clipped_l2", context_dim=-2)  # [I, C, R, L], softmax over R
    att = torch.einsum("icrl,ird->icld", alpha, regions)
    return l2_normalize(att) * word_mask[None, :, :, None].to(att.dtype)


class AttentionFiltration(nn.Module):
    """SAF (model.py:265-283): a = l1_nodes(sigmoid(BN_1(W s_n))), v = l2(sum_n a_n s_n). s [I, C, N, P] -> [I, C, P].

    node_mask [C, N] (True on the global node and real words). In training, BatchNorm1d(1)'s statistics are those
    of each caption's [I, 1 + len] block, as in the official loop over captions (model.py:335-362), and its running
    statistics take one momentum step per caption, in caption order (the closed form of C successive updates).
    """

    def __init__(self, sim_dim: int):
        super().__init__()
        self.attn = nn.Linear(sim_dim, 1)
        self.bn = nn.BatchNorm1d(1)
        nn.init.xavier_uniform_(self.attn.weight)
        nn.init.zeros_(self.attn.bias)

    def _momentum(self) -> float:
        return self.bn.momentum if self.bn.momentum is not None else 0.1

    def start_batch(self, n_captions: int) -> None:
        """Captions scored out of order (in chunks, `positions` given): decay the running statistics once for the
        whole batch of n_captions; each chunk then adds its captions' terms with their weights in caption order."""
        if self.training and self.bn.track_running_stats:
            with torch.no_grad():
                keep = (1 - self._momentum()) ** n_captions
                self.bn.running_mean.mul_(keep)
                self.bn.running_var.mul_(keep)
                self.bn.num_batches_tracked.add_(n_captions)

    def _batch_norm(self, x: torch.Tensor, node_mask: torch.Tensor, positions: torch.Tensor | None = None,
                    n_captions: int | None = None) -> torch.Tensor:
        bn = self.bn
        if not (self.training or not bn.track_running_stats):
            return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        m = node_mask[None].expand_as(x).to(x.dtype)  # [I, C, N]
        n = m.sum((0, 2))  # [C] values per caption
        mean = (x * m).sum((0, 2)) / n
        var = (((x - mean[None, :, None]) ** 2) * m).sum((0, 2)) / n  # biased, for the normalisation
        y = (x - mean[None, :, None]) / torch.sqrt(var[None, :, None] + bn.eps) * bn.weight + bn.bias
        if self.training and bn.track_running_stats:
            with torch.no_grad():
                mom = self._momentum()
                c = x.shape[1]
                if positions is None:  # these captions are the whole batch, in order: decay here
                    k = (1 - mom) ** torch.arange(c - 1, -1, -1, device=x.device, dtype=x.dtype)  # caption c's weight
                    bn.running_mean.mul_((1 - mom) ** c)
                    bn.running_var.mul_((1 - mom) ** c)
                    bn.num_batches_tracked.add_(c)
                else:  # a chunk of a batch of n_captions (start_batch decayed it): weights by caption position
                    k = (1 - mom) ** (n_captions - 1 - positions.to(x.device, x.dtype))
                unbiased = var * n / (n - 1).clamp_min(1)
                bn.running_mean.add_(mom * (k * mean.detach()).sum())
                bn.running_var.add_(mom * (k * unbiased.detach()).sum())
        return y

    def forward(self, sim_emb: torch.Tensor, node_mask: torch.Tensor, positions: torch.Tensor | None = None,
                n_captions: int | None = None) -> torch.Tensor:
        x = self._batch_norm(self.attn(sim_emb).squeeze(-1), node_mask, positions, n_captions)  # [I, C, N]
        a = torch.sigmoid(x) * node_mask[None].to(x.dtype)
        a = l1_normalize(a, dim=-1)
        return l2_normalize((a[..., None] * sim_emb).sum(-2))


class GraphReasoning(nn.Module):
    """One SGR step (model.py:230-252): s' = ReLU(W_g softmax_keys(W_q s (W_k s)^T) s), no residual.

    s [..., N, P], node_mask broadcastable to [..., N] (padded nodes are never keys; their outputs are zero).
    """

    def __init__(self, sim_dim: int):
        super().__init__()
        self.query = nn.Linear(sim_dim, sim_dim)
        self.key = nn.Linear(sim_dim, sim_dim)
        self.out = nn.Linear(sim_dim, sim_dim)
        for m in (self.query, self.key, self.out):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, s: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        edge = torch.matmul(self.query(s), self.key(s).transpose(-1, -2))
        edge = torch.softmax(edge.masked_fill(~node_mask[..., None, :], float("-inf")), dim=-1)
        return torch.relu(self.out(torch.matmul(edge, s))) * node_mask[..., None].to(s.dtype)


__all__ = ["SelfAttentionPool", "sgraf_attended_regions", "AttentionFiltration", "GraphReasoning"]
