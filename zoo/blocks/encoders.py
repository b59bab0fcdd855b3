"""Region and word encoders (CASC Sec. III-A)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .functional import l2_normalize


class RegionEncoder(nn.Module):
    """CASC Eq. (1): v_i = W_v f_i + b_v, then l2-normalised. [B, R, F] -> [B, R, d]."""

    def __init__(self, feature_dim: int = 2048, embed_dim: int = 1024, normalize: bool = True):
        super().__init__()
        self.fc = nn.Linear(feature_dim, embed_dim)
        self.normalize = normalize
        # Xavier-uniform as in SCAN's EncoderImagePrecomp.
        r = math.sqrt(6.0) / math.sqrt(feature_dim + embed_dim)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.fc(features)
        return l2_normalize(x) if self.normalize else x


class BiGRUTextEncoder(nn.Module):
    """CASC Eq. (2): word embeddings (300-d) -> bidirectional GRU, the two directions averaged, l2-norm.

    tokens [C, L] (0 = padding), lengths [C] -> word features [C, L, d]; padded positions are exactly 0.
    """

    def __init__(self, vocab_size: int, word_dim: int = 300, embed_dim: int = 1024, num_layers: int = 1,
                 normalize: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers=num_layers, batch_first=True, bidirectional=True)
        self.embed_dim = embed_dim
        self.normalize = normalize

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        out = (out[..., : self.embed_dim] + out[..., self.embed_dim :]) / 2
        return l2_normalize(out) if self.normalize else out
