"""Region and word encoders (CASC Sec. III-A)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .functional import l2_normalize, use_reference


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
        if use_reference():  # the previous placement, kept as the reference (zoo.blocks.reference_scoring)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
            out = (out[..., : self.embed_dim] + out[..., self.embed_dim :]) / 2
            return l2_normalize(out) if self.normalize else out
        # average the directions and normalise on the packed rows (real words only), then place them into the
        # padded [C, L, d] layout with one gather; padding rows are exact zeros. Same numbers as
        # pad_packed_sequence + slicing, whose backward copies the whole padded tensor once per time step.
        data = out.data
        data = (data[:, : self.embed_dim] + data[:, self.embed_dim :]) / 2
        if self.normalize:
            data = l2_normalize(data)
        index = _padded_index(packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices, tokens.shape[1],
                              data.shape[0]).to(data.device)
        data = torch.cat([data, data.new_zeros(1, data.shape[1])])  # row N = the padding
        return data[index.reshape(-1)].view(tokens.shape[0], tokens.shape[1], -1)


def _padded_index(batch_sizes: torch.Tensor, sorted_indices: torch.Tensor | None,
                  unsorted_indices: torch.Tensor | None, total_length: int, n_rows: int) -> torch.Tensor:
    """[B, total_length] row of each (sequence, step) in a PackedSequence's data; n_rows for padding."""
    batch_sizes = batch_sizes.cpu()
    b = int(batch_sizes[0]) if batch_sizes.numel() else 0
    steps = batch_sizes.shape[0]
    starts = torch.cumsum(batch_sizes, 0) - batch_sizes  # first row of each time step
    rank = torch.arange(b)[:, None]  # position in the length-sorted batch
    t = torch.arange(total_length)[None, :]
    valid = (t < steps) & (rank < batch_sizes[t.clamp(max=steps - 1)])
    index = torch.where(valid, starts[t.clamp(max=steps - 1)] + rank, torch.full_like(rank * t, n_rows))
    if unsorted_indices is not None:
        index = index[unsorted_indices.cpu()]
    return index
