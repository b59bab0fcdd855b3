"""DAN (Nam, Ha, Kim, Dual Attention Networks for Multimodal Reasoning and Matching, CVPR 2017), Sec. 3-4.
(The paper is not in /work/shared/papers: its equations are cited by section and name, not by number.)

One attention step, shared by the visual and the textual attention (Sec. 3.2):
    h_n = tanh(W_x x_n) * tanh(W_m m)          (* element-wise; m the memory of the previous step)
    alpha_n = softmax_n(w_h . h_n)             (over the real items only)
    context = sum_n alpha_n x_n
The visual step then applies v = tanh(P context); the textual one keeps u = context.
m-DAN (Sec. 4.2, the matching model) runs K steps with a separate memory per modality,
m_v^(k) = m_v^(k-1) + v^(k), m_u^(k) = m_u^(k-1) + u^(k), and scores S = sum_{k=0..K} v^(k) . u^(k).
The pair-independent part tanh(W_x x_n) is computed once per item (`project_items`), so a joint-memory variant
(r-DAN's m^(k) = m^(k-1) + v^(k) * u^(k), Sec. 4.1) can broadcast one memory per pair over the items.
"""
from __future__ import annotations

import torch
from torch import nn

from .functional import inner_products


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim counting only mask==True entries; 0 on masked ones, and an all-masked row is all 0
    (no NaN forward or backward)."""
    if mask is None:
        return torch.softmax(logits, dim=-1)
    mask = mask.expand_as(logits)
    any_real = mask.any(dim=-1, keepdim=True)
    # -inf on padding, but 0 everywhere on a row without real items, so the softmax never sees a row of -inf
    logits = logits.masked_fill(~mask, float("-inf")).masked_fill(~any_real, 0.0)
    return torch.softmax(logits, dim=-1) * mask.to(logits.dtype)


class DANAttention(nn.Module):
    """DAN Sec. 3.2, visual / textual attention: weights over items [..., N, F] guided by a memory [..., M].

    `project_items(x)` = tanh(W_x x), pair-independent; `weights(items_proj, mask, memory)` = alpha [..., N]
    (memory's leading dims broadcast against items_proj's); `forward` returns (sum_n alpha_n x_n, alpha).
    """

    def __init__(self, item_dim: int, memory_dim: int, hidden: int = 512):
        super().__init__()
        if min(item_dim, memory_dim, hidden) < 1:
            raise ValueError(f"DANAttention sizes must be >= 1, got {item_dim}, {memory_dim}, {hidden}")
        self.item = nn.Linear(item_dim, hidden)  # W_v / W_u
        self.memory = nn.Linear(memory_dim, hidden)  # W_{v,m} / W_{u,m}
        self.score = nn.Linear(hidden, 1)  # w_{v,h} / w_{u,h}

    def project_items(self, items: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.item(items))

    def weights(self, items_proj: torch.Tensor, mask: torch.Tensor | None, memory: torch.Tensor) -> torch.Tensor:
        # h_n = tanh(W_x x_n) * tanh(W_m m): [..., N, hidden]
        h = items_proj * torch.tanh(self.memory(memory)).unsqueeze(-2)
        return masked_softmax(self.score(h).squeeze(-1), mask)  # alpha_n = softmax_n(w_h . h_n)

    def forward(self, items: torch.Tensor, mask: torch.Tensor | None, memory: torch.Tensor,
                items_proj: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.project_items(items) if items_proj is None else items_proj
        alpha = self.weights(proj, mask, memory)
        return torch.einsum("...n,...nf->...f", alpha.to(items.dtype), items), alpha


def masked_item_mean(items: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(1/N) sum_n x_n over the real items (DAN: v^(0) and u^(0) start from the mean); [..., N, F] -> [..., F]."""
    if mask is None:
        return items.mean(dim=-2)
    m = mask.to(items.dtype).unsqueeze(-1)
    return (items * m).sum(-2) / m.sum(-2).clamp_min(1.0)


class MDAN(nn.Module):
    """m-DAN's two attention stacks (Sec. 4.2): per-item step vectors, ([I, K+1, d], [C, K+1, d]).

    images [I, R, F] (regions; region_mask [I, R] or None), words [C, L, d] (text features; word_mask [C, L]).
    Visual: v^(0) = tanh(P^(0) mean_n v_n), v^(k) = tanh(P^(k) Att_v^(k)(v_n; m_v^(k-1))); m_v^(0) = v^(0),
    m_v^(k) = m_v^(k-1) + v^(k). Textual: u^(0) = mean_t u_t, u^(k) = Att_u^(k)(u_t; m_u^(k-1)), same memory update.
    S(v, u) = sum_k v^(k) . u^(k) is then the dot product of the flattened step vectors.
    """

    def __init__(self, feature_dim: int, embed_dim: int, hidden: int = 512, steps: int = 2):
        super().__init__()
        if steps < 1:
            raise ValueError(f"DAN needs at least one attention step (K >= 1), got {steps}")
        self.steps = steps
        self.visual = nn.ModuleList(DANAttention(feature_dim, embed_dim, hidden) for _ in range(steps))
        self.textual = nn.ModuleList(DANAttention(embed_dim, embed_dim, hidden) for _ in range(steps))
        self.proj = nn.ModuleList(nn.Linear(feature_dim, embed_dim) for _ in range(steps + 1))  # P^(0..K)

    def encode_images(self, regions: torch.Tensor, region_mask: torch.Tensor | None = None) -> torch.Tensor:
        v = torch.tanh(self.proj[0](masked_item_mean(regions, region_mask)))  # v^(0) = tanh(P^(0) (1/N) sum_n v_n)
        out, memory = [v], v
        for k in range(self.steps):
            context, _ = self.visual[k](regions, region_mask, memory)
            v = torch.tanh(self.proj[k + 1](context))  # v^(k) = tanh(P^(k) sum_n alpha_n v_n)
            memory = memory + v  # m-DAN: separate visual memory
            out.append(v)
        return torch.stack(out, dim=1)

    def encode_captions(self, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        u = masked_item_mean(words, word_mask)  # u^(0) = (1/T) sum_t u_t
        out, memory = [u], u
        for k in range(self.steps):
            u, _ = self.textual[k](words, word_mask, memory)  # u^(k) = sum_t alpha_t u_t
            memory = memory + u  # m-DAN: separate textual memory
            out.append(u)
        return torch.stack(out, dim=1)


def dan_similarity(image_steps: torch.Tensor, caption_steps: torch.Tensor) -> torch.Tensor:
    """m-DAN (Sec. 4.2): S = sum_k v^(k) . u^(k) for every pair, [I, K+1, d] x [C, K+1, d] -> [I, C]."""
    return inner_products(image_steps.flatten(1), caption_steps.flatten(1))  # float32 under autocast
