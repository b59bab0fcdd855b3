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
    `dropout`: on the word embeddings, before the GRU (SGRAF's 0.4, SGRAF model.py:95; 0 = none, CASC).
    """

    def __init__(self, vocab_size: int, word_dim: int = 300, embed_dim: int = 1024, num_layers: int = 1,
                 normalize: bool = True, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers=num_layers, batch_first=True, bidirectional=True)
        self.embed_dim = embed_dim
        self.normalize = normalize

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.dropout is not None:
            x = self.dropout(x)
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


class BatchNormMLP(nn.Module):
    """VSE-infinity's region MLP (official lib/modules/mlp.py:28-45, class MLP): Linear -> BatchNorm1d -> ReLU for
    every layer but the last, which is a plain Linear; applied row-wise to [B, N, D] (BatchNorm statistics over
    all B*N rows, zero-padded rows included, as in the official code). The official module also builds a
    BatchNorm for the last layer that its forward never uses; the zoo leaves it out (the importer drops those
    keys by name).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 2):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim]))
        self.bns = nn.ModuleList(nn.BatchNorm1d(hidden_dim) for _ in range(num_layers - 1))
        self.output_dim = output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        for layer, bn in zip(self.layers[:-1], self.bns):
            x = torch.relu(bn(layer(x)))
        return self.layers[-1](x).view(*shape[:-1], self.output_dim)


class GRULastStateEncoder(nn.Module):
    """VSE++'s text side (Faghri et al. 2018, Sec. 3; official vsepp model.py:187-231, EncoderText): word
    embeddings -> one-direction GRU, the state at the last real word (position length-1), l2-normalised.

    tokens [C, L] (0 = padding), lengths [C] -> [C, d]. `normalize=False` skips the l2; `use_abs` takes |.| after
    it (the official order-embedding switch). The official l2 has no epsilon (a zero state would give NaN); the zoo's
    l2_normalize maps it to zero -- the same numbers on every non-zero vector.
    """

    def __init__(self, vocab_size: int, word_dim: int = 300, embed_dim: int = 1024, num_layers: int = 1,
                 normalize: bool = True, use_abs: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # official init_weights (model.py:203-204)
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers=num_layers, batch_first=True)
        self.normalize, self.use_abs = normalize, use_abs

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h_n = self.rnn(packed)  # [layers, C, d]: the last layer's state at step length-1, in input order
        out = h_n[-1]
        if self.normalize:
            out = l2_normalize(out)
        return out.abs() if self.use_abs else out


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
    backward, and whose weight gradient is formed per time step (see _GRUDirection). Tested against nn.GRU
    (tests/test_speed.py); the reference path (reference_scoring) uses nn.GRU.
    """
    h_size = rnn.hidden_size
    w_ih = torch.cat([rnn.weight_ih_l0, rnn.weight_ih_l0_reverse])
    b_ih = torch.cat([rnn.bias_ih_l0, rnn.bias_ih_l0_reverse])
    gi = torch.addmm(b_ih, data, w_ih.t())  # input projections of all steps (bf16 under autocast, like a Linear)
    # the recurrence runs in the weights' dtype (float32 under autocast: a bf16 state would round at every step)
    with torch.autocast(data.device.type, enabled=False):
        gi_f, gi_b = gi.to(rnn.weight_hh_l0.dtype).split(3 * h_size, dim=1)
        out_f = _gru_steps(gi_f, rnn.weight_hh_l0, rnn.bias_hh_l0, batch_sizes, reverse=False)
        out_b = _gru_steps(gi_b, rnn.weight_hh_l0_reverse, rnn.bias_hh_l0_reverse, batch_sizes, reverse=True)
        return (out_f + out_b) / 2


def _gru_steps(gi_all: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, batch_sizes: list[int],
               reverse: bool) -> torch.Tensor:
    """One GRU direction over packed rows: gi_all [N, 3H] input projections, batch_sizes[t] rows per time step
    (length-sorted batch, as in a PackedSequence). Returns the state of every packed row [N, H]; with a
    gradient through _GRUDirection's hand-written backward.
    """
    if torch.is_grad_enabled() and (gi_all.requires_grad or w_hh.requires_grad or b_hh.requires_grad):
        return _GRUDirection.apply(gi_all, w_hh, b_hh, batch_sizes, reverse)
    return _gru_forward(gi_all, w_hh, b_hh, batch_sizes, reverse, None)


def _step_order(batch_sizes: list[int], reverse: bool) -> list[tuple[int, int]]:
    """(first packed row, rows) of each time step, in the order the direction visits them."""
    starts = [0]
    for bs in batch_sizes[:-1]:
        starts.append(starts[-1] + bs)
    steps = list(zip(starts, batch_sizes))
    return steps[::-1] if reverse else steps


def _gru_forward(gi_all: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, batch_sizes: list[int], reverse: bool,
                 saved: dict | None) -> torch.Tensor:
    """nn.GRU's recurrence (r, z, n gates; h' = (1 - z) n + z h) over packed rows; `saved` receives what the
    backward needs: h_prev, r, z, n and the recurrent part of the n gate, [N, H] each."""
    n_rows, h_size = gi_all.shape[0], w_hh.shape[1]
    out = gi_all.new_empty(n_rows, h_size)
    if saved is not None:
        for k in ("h_prev", "r", "z", "n", "h_n"):
            saved[k] = gi_all.new_empty(n_rows, h_size)
    w_t = w_hh.t()
    h = None
    for start, bs in _step_order(batch_sizes, reverse):
        if h is None:
            h_prev = gi_all.new_zeros(bs, h_size)
        elif h.shape[0] > bs:  # forward direction: the shortest sequences have ended
            h_prev = h[:bs]
        elif h.shape[0] < bs:  # backward direction: sequences whose last word is this step start from zero
            h_prev = torch.cat([h, h.new_zeros(bs - h.shape[0], h_size)])
        else:
            h_prev = h
        i_r, i_z, i_n = gi_all[start : start + bs].chunk(3, 1)
        h_r, h_z, h_n = torch.addmm(b_hh, h_prev, w_t).chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = n + z * (h_prev - n)
        out[start : start + bs] = h
        if saved is not None:
            for k, v in (("h_prev", h_prev), ("r", r), ("z", z), ("n", n), ("h_n", h_n)):
                saved[k][start : start + bs] = v
    return out


class _GRUDirection(torch.autograd.Function):
    """One GRU direction over packed rows with a hand-written backward.

    Autograd through the per-step addmm computes the recurrent weight gradient once per time step, a full
    [3H, H] product from only batch_sizes[t] rows (on the CPU ~20-30 ms each at H = 1024, whatever the rows):
    here the backward collects every step's gate gradients and forms it with one [3H, N] x [N, H] product.
    Tested against nn.GRU (values and gradients, tests/test_speed.py).
    """

    @staticmethod
    def forward(ctx, gi_all, w_hh, b_hh, batch_sizes, reverse):
        saved: dict = {}
        out = _gru_forward(gi_all, w_hh, b_hh, batch_sizes, reverse, saved)
        ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
        ctx.save_for_backward(w_hh, saved["h_prev"], saved["r"], saved["z"], saved["n"], saved["h_n"])
        return out

    @staticmethod
    def backward(ctx, d_out):
        w_hh, h_prev, r, z, n, h_n = ctx.saved_tensors
        d_gates = d_out.new_empty(d_out.shape[0], 3 * w_hh.shape[1])  # d(pre-activations) of r, z, n
        d_gh = torch.empty_like(d_gates)  # the same for the recurrent part (n's is scaled by r)
        carry = None  # d loss / d h of the step visited before this one in the forward pass
        for start, bs in reversed(_step_order(ctx.batch_sizes, ctx.reverse)):
            sl = slice(start, start + bs)
            dh = d_out[sl]
            if carry is not None:
                k = min(bs, carry.shape[0])
                dh = dh.clone()
                dh[:k] += carry[:k]
            zs, ns, rs = z[sl], n[sl], r[sl]
            dn = dh * (1 - zs) * (1 - ns * ns)
            dz = dh * (h_prev[sl] - ns) * zs * (1 - zs)
            dr = dn * h_n[sl] * rs * (1 - rs)
            d_gates[sl] = torch.cat([dr, dz, dn], 1)
            d_gh[sl] = torch.cat([dr, dz, dn * rs], 1)
            carry = torch.addmm(dh * zs, d_gh[sl], w_hh)  # d h_prev
        d_w = d_gh.t() @ h_prev  # one product for every step
        return d_gates, d_w, d_gh.sum(0), None, None


class BiLSTMTextEncoder(nn.Module):
    """DAN Sec. 3.1: word embeddings -> bidirectional LSTM, u_t = the sum of the two directions' states (no norm).

    tokens [C, L] (0 = padding), lengths [C] -> [C, L, d]; padded positions are exactly 0.
    """

    def __init__(self, vocab_size: int, word_dim: int = 512, embed_dim: int = 512):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.rnn = nn.LSTM(word_dim, embed_dim, batch_first=True, bidirectional=True)
        self.embed_dim = embed_dim

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])  # zeros on padding
        return out[..., : self.embed_dim] + out[..., self.embed_dim :]
