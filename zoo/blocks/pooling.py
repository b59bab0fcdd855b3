"""Set poolings: VSE-infinity's Generalized Pooling Operator (GPO; Chen et al., CVPR 2021, Sec. 3.2, Eqs. 2-5).

GPO pools a variable-size set of vectors [B, K, D] (regions or words) into one [B, D]: each channel is sorted in
descending order over the set, and the k-th largest values are weighted by theta_k, the same weights for every
channel. theta comes from a small BiGRU reading only sinusoidal position encodings of positions 1..n (so the
weights depend on the set size alone), a linear score per position, and a softmax with temperature 0.1 over the
n real positions. Official code: woodfrog/vse_infty `bigru` @ 8600f89, lib/modules/aggr/gpo.py:8-24
(positional_encoding_1d), 27-81 (GPO). Any method can pool with it (`GPO(d_pe, d_hidden)(features, lengths)`).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .functional import lengths_to_mask, use_reference


def positional_encoding_1d(d_model: int, length: int) -> torch.Tensor:
    """[length, d_model] sinusoidal encodings: sin on even dims, cos on odd ones (Vaswani et al.)."""
    if d_model % 2:
        raise ValueError(f"sin/cos positional encodings need an even dimension, got {d_model}")
    pe = torch.zeros(length, d_model)
    position = torch.arange(length, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float) * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


class GPO(nn.Module):
    """Generalized Pooling Operator. forward(features [B, K, D], lengths [B]) -> (pooled [B, D], weights [B, n, 1]).

    n = max(lengths): positions past a set's length get weight 0 and their (sorted-last) values are zeroed.
    Parameter names follow the official module (gru.*, linear.weight), so official weights load by name.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1):
        super().__init__()
        self.d_pe, self.d_hidden, self.temperature = d_pe, d_hidden, temperature
        self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)
        self._pe: dict[int, torch.Tensor] = {}

    def position_encodings(self, length: int) -> torch.Tensor:
        if length not in self._pe:
            self._pe[length] = positional_encoding_1d(self.d_pe, length)
        return self._pe[length]

    def pool_weights(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """theta [B, n, 1] (softmax over the real positions) and the mask [B, n, 1] of real positions."""
        lengths = lengths.long()
        n = int(lengths.max())
        mask = lengths_to_mask(lengths, n).unsqueeze(-1)
        pes = self.position_encodings(n).to(device=lengths.device, dtype=self.linear.weight.dtype)
        pes = pes.unsqueeze(0).expand(lengths.shape[0], n, self.d_pe).masked_fill(~mask, 0)
        packed = pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=n)
        out = (out[..., : self.d_hidden] + out[..., self.d_hidden:]) / 2  # the two directions averaged
        scores = self.linear(out).masked_fill(~mask, -10000.0)  # official: -10000 on padding
        return torch.softmax(scores / self.temperature, dim=1), mask

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if use_reference():  # zoo.blocks.reference_scoring(): the one-set-at-a-time reference (same numbers)
            pooled, ws = slow_gpo(self, features, lengths)
            n = int(lengths.max())
            return pooled, torch.stack([torch.cat([w, w.new_zeros(n - w.shape[0])]) for w in ws])[..., None]
        weights, mask = self.pool_weights(lengths)
        features = features[:, : weights.shape[1]]
        # each channel sorted over the set, padding pushed to the end and zeroed (official gpo.py:67-69)
        ordered = features.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
        ordered = ordered.masked_fill(~mask, 0.0)
        return (ordered * weights.to(ordered.dtype)).sum(1), weights


def slow_gpo(gpo: GPO, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference GPO, one set at a time, no packing and no masks: the BiGRU over that set's n position
    encodings, softmax(score / T) over its n positions, its real rows sorted per channel. For tests."""
    pooled, weights = [], []
    for i in range(features.shape[0]):
        n = int(lengths[i])
        pe = positional_encoding_1d(gpo.d_pe, n).to(features)
        out, _ = gpo.gru(pe[None])
        out = (out[0, :, : gpo.d_hidden] + out[0, :, gpo.d_hidden:]) / 2
        w = torch.softmax(gpo.linear(out)[:, 0] / gpo.temperature, dim=0)
        rows = features[i, :n].sort(dim=0, descending=True).values
        pooled.append((rows * w[:, None]).sum(0))
        weights.append(w)
    return torch.stack(pooled), weights
