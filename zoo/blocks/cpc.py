"""CCCL's context-perceived embeddings (Sec. 3.2, Eqs. (1)-(12)).

- ContextPerceivedCell: CCCL Eqs. (1)-(7), a one-head gated self-attention with a residual.
- box_position_tuple / BoxPositionEmbedding: CCCL Eq. (9) (absolute region positions).
- VisualContextEmbedding: CCCL Eqs. (8)-(10); TextContextEmbedding: CCCL Eqs. (11)-(12).
Masks: every region is real; padded words (mask False) are never attended to and their outputs are 0.
"""
from __future__ import annotations

import math

import torch
from torch import nn

POSITION_TUPLES = ("corners_area_aspect", "corners_size")
RESIDUAL_GAINS = ("learned", "one")
FC_INITS = ("xavier", "default")
POSITION_FUSIONS = ("product", "sum")


def xavier_zero_(fc: nn.Linear) -> None:
    """Xavier-uniform weight, zero bias (SCAN's EncoderImagePrecomp and SGRAF's init_weights)."""
    r = math.sqrt(6.0) / math.sqrt(fc.in_features + fc.out_features)
    nn.init.uniform_(fc.weight, -r, r)
    nn.init.zeros_(fc.bias)


class ContextPerceivedCell(nn.Module):
    """CPC(Y) = softmax(Q^ K^T^ / sqrt(d_K)) V + Y, CCCL Eqs. (1)-(7).

    Q, K, V = Y W_Q, Y W_K, Y W_V (Eq. 1, no bias as printed); U = Q o K (Eq. 3);
    G_Q = sigmoid(U W_Q^G + b_Q^G), G_K = sigmoid(U W_K^G + b_K^G) (Eq. 4);
    Q^ = Q o G_Q, K^ = K o G_K (Eq. 5: the paper prints G_V for the key gate, a typo for G_K);
    A^ = softmax(Q^ K^^T / sqrt(d_K)) V (Eq. 6, one head, d_K = d_V = d); CPC(Y) = A^ + Y (Eq. 7).
    Y [B, N, d], mask [B, N] (True = real item; None = all real) -> [B, N, d], 0 at padded positions.

    residual_gain='learned' (default): CPC(Y) = alpha A^ + Y with a learnable scalar alpha started at 0, so the
    cell starts as the identity and lets the context in as training finds it useful (ReZero's gate). 'one' is Eq. (7)
    as printed (alpha = 1, fixed). Why: at alpha = 1 the attention of a random cell collapses onto one region and
    the residual makes every region of an image alike (SynthScenes: within-image cosine 0.56 -> 0.67, rsum 133
    with the cell against 276 without; README "Why CCCL was slow"). The learned alpha stays small (|alpha| < 0.1).
    """

    def __init__(self, dim: int, residual_gain: str = "learned"):
        super().__init__()
        if residual_gain not in RESIDUAL_GAINS:
            raise ValueError(f"unknown CPC residual_gain {residual_gain!r}: use one of {RESIDUAL_GAINS}")
        self.residual_gain = residual_gain
        # alpha of CPC(Y) = alpha A^ + Y; a buffer at 1 for Eq. (7) as printed (not trained)
        if residual_gain == "learned":
            self.alpha = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("alpha", torch.ones(()), persistent=False)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.gate_q = nn.Linear(dim, dim)
        self.gate_k = nn.Linear(dim, dim)
        self.dim = dim

    def attention(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax weights [B, N, N] of Eq. (6), V [B, N, d]); row i: how much item i reads every item."""
        q, k, v = self.q(y), self.k(y), self.v(y)  # Eq. (1)
        u = q * k  # Eq. (3)
        q_hat = q * torch.sigmoid(self.gate_q(u))  # Eqs. (4)-(5)
        k_hat = k * torch.sigmoid(self.gate_k(u))
        logits = torch.matmul(q_hat, k_hat.transpose(-1, -2)) / math.sqrt(self.dim)  # Eq. (6)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
            # a row whose every key is masked (an all-padding caption) would be NaN: give it a harmless 0 logit
            logits = logits.masked_fill(~mask.any(-1)[:, None, None], 0.0)
        return torch.softmax(logits, dim=-1), v

    def forward(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        weights, v = self.attention(y, mask)
        out = self.alpha.to(y.dtype) * torch.matmul(weights, v) + y  # Eqs. (6)-(7), alpha = 1 as printed
        if mask is not None:
            out = out * mask[..., None].to(out.dtype)
        return out


def box_position_tuple(boxes: torch.Tensor, kind: str = "corners_area_aspect") -> torch.Tensor:
    """The six-tuple s_i of CCCL Eq. (9)'s input, from normalised boxes [..., 4] = (x1, y1, x2, y2) in [0, 1].

    The paper prints four entries (x1/W, y1/H, x2 over the *height* -- a typo for x2/W -- and the area ratio
    w*h/(W*H)) of a "six-tuple". Our completion, kind='corners_area_aspect' (default):
        (x1/W, y1/H, x2/W, y2/H, w*h/(W*H), w/(w+h))
    i.e. the printed entries, y2/H (the missing partner of x2/W) and a bounded aspect ratio (0.5 = square; the
    only entry a linear layer could not derive from the others besides the area).
    kind='corners_size': (x1/W, y1/H, x2/W, y2/H, w/W, h/H), the other common 6-d box code.
    Boxes served by the datamodule are already divided by the image width/height (W = H = 1).
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = (x2 - x1).clamp_min(0), (y2 - y1).clamp_min(0)
    if kind == "corners_area_aspect":
        aspect = torch.where(w + h > 0, w / (w + h).clamp_min(1e-8), torch.full_like(w, 0.5))
        return torch.stack([x1, y1, x2, y2, w * h, aspect], -1)
    if kind == "corners_size":
        return torch.stack([x1, y1, x2, y2, w, h], -1)
    raise ValueError(f"unknown position tuple {kind!r}: use one of {POSITION_TUPLES}")


class BoxPositionEmbedding(nn.Module):
    """s^_i = sigmoid(W_S s_i + b_S), CCCL Eq. (9): boxes [B, R, 4] -> [B, R, d] in (0, 1)."""

    def __init__(self, dim: int, kind: str = "corners_area_aspect"):
        super().__init__()
        if kind not in POSITION_TUPLES:
            raise ValueError(f"unknown position tuple {kind!r}: use one of {POSITION_TUPLES}")
        self.fc = nn.Linear(6, dim)
        self.kind = kind

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(box_position_tuple(boxes, self.kind).to(self.fc.weight.dtype)))


class VisualContextEmbedding(nn.Module):
    """V = CPC(Q^ o S^), CCCL Eqs. (8)-(10). features [B, R, F], boxes [B, R, 4] -> V [B, R, d].

    use_position=False ("w/o POS", i.e. without box *position*): V = CPC(Q^); use_cpc=False ("w/o V-CPC"):
    the cell is skipped and V = Q^ o S^.
    """

    def __init__(self, feature_dim: int, dim: int, use_position: bool = True, use_cpc: bool = True,
                 position_tuple: str = "corners_area_aspect", *, cpc_gain: str = "learned",
                 position_fusion: str = "product"):
        super().__init__()
        if position_fusion not in POSITION_FUSIONS:
            raise ValueError(f"unknown position_fusion {position_fusion!r}: use one of {POSITION_FUSIONS}")
        self.position_fusion = position_fusion
        self.fc = nn.Linear(feature_dim, dim)  # Eq. (8)
        xavier_zero_(self.fc)
        self.position = BoxPositionEmbedding(dim, position_tuple) if use_position else None  # Eq. (9)
        self.cpc = ContextPerceivedCell(dim, cpc_gain) if use_cpc else None  # Eq. (10)

    def cpc_input(self, features: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Q^ o S^ of Eqs. (8)-(9): what the CPC reads (V itself when there is no CPC)."""
        x = self.fc(features)
        if self.position is not None:
            if boxes is None:
                raise ValueError("the visual embedding uses box position features (CCCL Eq. 9) but no boxes were "
                                 "given: serve them (data.with_boxes: true) or set model.use_box_position: false")
            s_hat = self.position(boxes)
            # 'product': Q^ o S^ of Eq. (10) as printed; 'sum': Q^ + (S^ - 1/2), the position code added to the
            # region (centred so that every region does not gain the same +1/2 vector)
            x = x * s_hat if self.position_fusion == "product" else x + (s_hat - 0.5)
        return x

    def forward(self, features: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        x = self.cpc_input(features, boxes)
        return self.cpc(x) if self.cpc is not None else x


class TextContextEmbedding(nn.Module):
    """T = CPC(E W_E + b_E), CCCL Eqs. (11)-(12). words [C, L, d_E], mask [C, L] -> T [C, L, d] (0 on padding).

    use_cpc=False ("w/o T-CPC"): T = E^ (masked).
    fc_init='xavier' (default): W_E Xavier-uniform, b_E = 0, as the region FC and as SGRAF initialises every linear
    layer (the paper prints no initialisation). 'default' is torch's (uniform bias in +-1/sqrt(d_E)): with small word
    features (a BiGRU's, norm ~0.4) those shared biases dominate E^ and every word of a batch starts alike (mean
    cosine 0.96 after the FC; README "Why CCCL was slow").
    """

    def __init__(self, word_dim: int, dim: int, use_cpc: bool = True, *, cpc_gain: str = "learned",
                 fc_init: str = "xavier"):
        super().__init__()
        if fc_init not in FC_INITS:
            raise ValueError(f"unknown text FC init {fc_init!r}: use one of {FC_INITS}")
        self.fc = nn.Linear(word_dim, dim)  # Eq. (11)
        if fc_init == "xavier":
            xavier_zero_(self.fc)
        self.cpc = ContextPerceivedCell(dim, cpc_gain) if use_cpc else None  # Eq. (12)

    def forward(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.fc(words) * mask[..., None].to(words.dtype)
        return self.cpc(x, mask) if self.cpc is not None else x
