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
        reference = use_reference()
        if not reference and x.device.type == "cpu" and self.rnn.num_layers == 1:
            # CPU: both directions in Python over the packed rows (see _bigru_mean_packed), already averaged
            data = _bigru_mean_packed(self.rnn, packed.data, packed.batch_sizes.tolist())
            if self.normalize:
                data = l2_normalize(data)
            index = _padded_index(packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices,
                                  tokens.shape[1], data.shape[0]).to(data.device)
            data = torch.cat([data, data.new_zeros(1, data.shape[1])])  # row N = the padding
            return data[index.reshape(-1)].view(tokens.shape[0], tokens.shape[1], -1)
        out, _ = self.rnn(packed)
        if reference:  # the previous placement, kept as the reference (zoo.blocks.reference_scoring)
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


def _bigru_mean_packed(rnn: nn.GRU, data: torch.Tensor, batch_sizes: list[int]) -> torch.Tensor:
    """(forward + backward) / 2 of a one-layer bidirectional nn.GRU over PackedSequence rows [N, E] -> [N, H].

    The same equations and weights as nn.GRU (r, z, n gates; h' = (1 - z) n + z h), stepped in Python over the
    packed time steps. Faster on the CPU in training than ATen's packed GRU, whose backward fills a zero
    tensor of the whole input projection for every time step; every split here has a one-concatenation
    backward. Tested against nn.GRU (tests/test_speed.py); the reference path (reference_scoring) uses nn.GRU.
    """
    h_size = rnn.hidden_size
    w_ih = torch.cat([rnn.weight_ih_l0, rnn.weight_ih_l0_reverse])
    b_ih = torch.cat([rnn.bias_ih_l0, rnn.bias_ih_l0_reverse])
    gi = torch.addmm(b_ih, data, w_ih.t())  # input projections of all steps (bf16 under autocast, like a Linear)
    # the recurrence runs in the weights' dtype (float32 under autocast: a bf16 state would round at every step)
    with torch.autocast(data.device.type, enabled=False):
        gi_f, gi_b = gi.to(rnn.weight_hh_l0.dtype).split(3 * h_size, dim=1)
        steps_f, steps_b = gi_f.split(batch_sizes), gi_b.split(batch_sizes)
        out_f = _gru_steps(steps_f, rnn.weight_hh_l0, rnn.bias_hh_l0, batch_sizes, reverse=False)
        out_b = _gru_steps(steps_b, rnn.weight_hh_l0_reverse, rnn.bias_hh_l0_reverse, batch_sizes, reverse=True)
        return (out_f + out_b) / 2


def _gru_steps(gi: tuple[torch.Tensor, ...], w_hh: torch.Tensor, b_hh: torch.Tensor, batch_sizes: list[int],
               reverse: bool) -> torch.Tensor:
    """One GRU direction; gi[t] = [batch_sizes[t], 3H] input projections of step t (length-sorted batch)."""
    h_size = w_hh.shape[1]
    outs: list[torch.Tensor | None] = [None] * len(gi)
    h = None
    w_t = w_hh.t()
    for t in (range(len(gi) - 1, -1, -1) if reverse else range(len(gi))):
        bs = batch_sizes[t]
        if h is None:
            h_prev = gi[t].new_zeros(bs, h_size)
        elif h.shape[0] > bs:  # forward direction: the shortest sequences have ended
            h_prev = h[:bs]
        elif h.shape[0] < bs:  # backward direction: sequences whose last word is step t start from zero
            h_prev = torch.cat([h, h.new_zeros(bs - h.shape[0], h_size)])
        else:
            h_prev = h
        i_r, i_z, i_n = gi[t].chunk(3, 1)
        h_r, h_z, h_n = torch.addmm(b_hh, h_prev, w_t).chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = n + z * (h_prev - n)
        outs[t] = h
    return torch.cat(outs)
