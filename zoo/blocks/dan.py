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

The joint-memory reading (`MDAN.joint_scores`, DAN `memory: joint`): r-DAN's one memory per pair,
m^(0) = v^(0) * u^(0), m^(k) = m^(k-1) + v^(k) * u^(k), guides both attentions at step k (through m^(k-1)), and
the score keeps m-DAN's S = sum_k v^(k) . u^(k), which is exactly the sum of m^(K)'s entries (r-DAN reads m^(K)
into an answer classifier; a matching score from it is not in the paper). Every step then depends on the pair.
"""
from __future__ import annotations

import torch
from torch import nn

from .functional import inner_products, wide


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


    # ---- the joint-memory reading (r-DAN's memory in the matching model) -----------------------------------
    def image_items(self, regions: torch.Tensor, region_mask: torch.Tensor | None = None) -> dict:
        """The pair-independent image side of `joint_scores`: v^(0) [I, d] (as m-DAN), and per step k the
        attention's tanh(W_v x_n) [I, K, R, h] and P^(k) x_n without its bias [I, K, R, d] (so that
        P^(k)(sum_n alpha_n x_n) = sum_n alpha_n P^(k) x_n + b costs d, not F, per pair and region)."""
        v0 = torch.tanh(self.proj[0](masked_item_mean(regions, region_mask)))
        proj = torch.stack([att.project_items(regions) for att in self.visual], 1)
        px = torch.stack([regions @ p.weight.T for p in self.proj[1:]], 1)
        return {"v0": v0, "proj": proj, "px": px}

    def caption_items(self, words: torch.Tensor, word_mask: torch.Tensor) -> dict:
        """The pair-independent caption side: u^(0) [C, d] and, per step k, tanh(W_u u_t) [C, L, h] as `proj_k`
        (word-indexed on dim 1, so the evaluation's trim of padded words applies to it)."""
        return {"u0": masked_item_mean(words, word_mask),
                **{f"proj_{k}": att.project_items(words) for k, att in enumerate(self.textual)}}

    def joint_scores(self, img: dict, region_mask: torch.Tensor | None, cap: dict, words: torch.Tensor,
                     word_mask: torch.Tensor, paired: bool = False, return_steps: bool = False):
        """S [I, C] of every image with every caption under one memory per pair (module docstring); paired=True:
        image n with caption n only, [B, 1]. img / cap from image_items / caption_items; words [C, L, d].
        return_steps: also the per-step (v^(k), u^(k)) of every pair, each [I, C, d] (k >= 1; CASC-DAN's A^I, A^T).
        The attention logits w_h . (tanh(W_x x_n) * tanh(W_m m)) are one contraction over h, so no
        [I, C, items, h] tensor is formed."""
        n_i = img["v0"].shape[0]
        if paired and words.shape[0] != n_i:
            raise ValueError(f"paired scoring needs as many captions as images, got {words.shape[0]} and {n_i}")
        u0 = cap["u0"][:, None] if paired else cap["u0"][None]  # [I or 1, C or 1, d]
        memory = img["v0"][:, None] * u0  # m^(0) = v^(0) * u^(0): [I, C, d]
        s = wide(memory).sum(-1)  # S accumulated in at least float32 (under autocast the memory may be bf16)
        r_mask = None if region_mask is None else region_mask[:, None]
        w_mask = word_mask[:, None] if paired else word_mask[None]
        steps = []
        for k in range(self.steps):
            vis, txt = self.visual[k], self.textual[k]
            # visual attention over the regions, guided by the pair's memory
            gv = torch.tanh(vis.memory(memory))  # [I, C, h]
            logits = torch.einsum("irh,ich->icr", img["proj"][:, k] * vis.score.weight[0], gv) + vis.score.bias
            alpha = masked_softmax(logits, r_mask)
            v = torch.tanh(torch.einsum("icr,ird->icd", alpha, img["px"][:, k])
                           + alpha.sum(-1, keepdim=True) * self.proj[k + 1].bias)  # tanh(P^(k) sum alpha x)
            # textual attention over the words, guided by the same memory
            gu = torch.tanh(txt.memory(memory))
            items = cap[f"proj_{k}"] * txt.score.weight[0]
            logits = (torch.einsum("ilh,ich->icl", items, gu) if paired else
                      torch.einsum("clh,ich->icl", items, gu)) + txt.score.bias
            beta = masked_softmax(logits, w_mask)
            u = torch.einsum("icl,ild->icd", beta, words) if paired else torch.einsum("icl,cld->icd", beta, words)
            memory = memory + v * u  # r-DAN: the joint memory
            s = s + wide(v * u).sum(-1)  # S = sum_k v^(k) . u^(k) = the sum of m^(K)'s entries
            if return_steps:
                steps.append((v, u))
        return (s, steps) if return_steps else s


def dan_similarity(image_steps: torch.Tensor, caption_steps: torch.Tensor) -> torch.Tensor:
    """m-DAN (Sec. 4.2): S = sum_k v^(k) . u^(k) for every pair, [I, K+1, d] x [C, K+1, d] -> [I, C]."""
    return inner_products(image_steps.flatten(1), caption_steps.flatten(1))  # float32 under autocast
